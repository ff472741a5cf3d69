"""Image sizing, mask → loss weights, and the flow-matching math against diffusers' own helpers."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from trainer.training import flow
from trainer.dataset.prepare import latent_weights, prepare_image, training_size


@pytest.mark.parametrize("size,resolution,expected", [
    ((1024, 1024), 512, (512, 512)),
    ((512, 1024), 512, (352, 720)),  # aspect kept, about 512x512 pixels of area
    ((1024, 768), 512, (576, 432)),
    ((4000, 3000), 1024, (1168, 880)),
])
def test_training_size_keeps_area_and_aspect(size, resolution, expected):
    w, h = training_size(*size, resolution)
    assert (w, h) == expected
    assert w % 16 == 0 and h % 16 == 0
    assert w * h <= resolution * resolution
    assert abs((w / h) - (size[0] / size[1])) / (size[0] / size[1]) < 0.06


def test_prepare_image_scales_pixels_and_mask_together():
    image = Image.new("RGB", (200, 400), (255, 0, 0))
    mask = Image.new("L", (200, 400), 0)
    mask.paste(255, (0, 0, 200, 200))  # top half is subject
    prepared = prepare_image(image, mask, 128)
    assert prepared.size == training_size(200, 400, 128)
    assert prepared.pixels.shape[1] == 3 and prepared.pixels.max() == 1.0 and prepared.pixels.min() == -1.0
    m = prepared.mask[0, 0]
    assert m[: m.shape[0] // 2 - 2].min() == 1.0 and m[m.shape[0] // 2 + 2:].max() == 0.0


def test_gray_mask_is_proportional_weight_and_background_floor_applies():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1.0  # top half subject
    mask[..., 8:, :8] = 0.5  # bottom-left gray
    w = latent_weights(mask, 2, 2)
    assert torch.allclose(w[0, 0], torch.tensor([[1.0, 1.0], [0.5, 0.0]]))
    floored = latent_weights(mask, 2, 2, background_weight=0.1)
    assert torch.allclose(floored[0, 0], torch.tensor([[1.0, 1.0], [0.55, 0.1]]))
    # area averaging: an 8x8 block half covered gives 0.5
    half = torch.zeros(1, 1, 8, 8)
    half[..., :, :4] = 1
    assert latent_weights(half, 1, 1).item() == pytest.approx(0.5)


def test_pack_and_ids_match_diffusers():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 12, 8)
    packed = flow.pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 12, 8))
    assert torch.equal(flow.unpack_latents(packed, 12, 8), x)
    ours = flow.latent_image_ids(12, 8, "cpu", torch.float32)
    theirs = FluxPipeline._prepare_latent_image_ids(2, 6, 4, "cpu", torch.float32)
    assert torch.equal(ours, theirs)


def test_resolution_shift_matches_the_sampler():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for tokens in (256, 1024, 2304, 4096):
        assert flow.resolution_shift(tokens) == pytest.approx(calculate_shift(tokens, 256, 4096, 0.5, 1.15))


def test_sigmas_are_shifted_logit_normal():
    g = torch.Generator().manual_seed(0)
    plain = flow.sample_sigmas(20000, 0.0, g, "cpu")
    g = torch.Generator().manual_seed(0)
    shifted = flow.sample_sigmas(20000, 1.0, g, "cpu")
    assert 0 < plain.min() and plain.max() < 1
    assert plain.median().item() == pytest.approx(0.5, abs=0.02)  # logit-normal(0, 1) is centred
    assert (shifted > plain).all()  # larger images train at more noise


def test_noising_and_target():
    x, n = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    assert torch.allclose(flow.noisy_latents(x, n, torch.tensor([0.0])), x)
    assert torch.allclose(flow.noisy_latents(x, n, torch.tensor([1.0])), n)
    assert torch.equal(flow.velocity_target(x, n), n - x)


def test_masked_loss_ignores_the_background_and_normalises_by_area():
    pred, target = torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4)
    target[..., :, 2:] = 3.0  # error only in the right half
    weights = torch.zeros(1, 1, 4, 4)
    weights[..., :, :2] = 1.0  # left half is the subject
    assert flow.masked_mse(pred, target, weights).item() == 0.0
    weights_right = 1 - weights
    assert flow.masked_mse(pred, target, weights_right, normalize=True).item() == pytest.approx(9.0)
    assert flow.masked_mse(pred, target, weights_right, normalize=False).item() == pytest.approx(4.5)
    assert flow.masked_mse(pred, target, None).item() == pytest.approx(4.5)
