"""The user's mask controls: threshold / soft edge / grow-shrink, painted corrections, the token-grid view,
the mask → loss-weight mapping they feed, and the page's mask step built on them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tests.conftest import subject_image
from trainer.dataset.prepare import latent_weights, prepare_image
from trainer.dataset.mask_tools import (ADD_RGB, REMOVE_RGB, adjust_mask, apply_strokes, thin_share, token_grid,
                                token_grid_view)


def square(size=128, lo=40, hi=88) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[lo:hi, lo:hi] = 255
    return m


def area(mask) -> int:
    return int((np.asarray(mask) >= 128).sum())


# ---- adjust_mask ------------------------------------------------------------------------------------

def test_defaults_change_nothing_and_gray_stays_proportional():
    rng = np.random.default_rng(0)
    m = rng.integers(0, 256, (64, 80)).astype(np.uint8)
    assert np.array_equal(np.asarray(adjust_mask(m)), m)
    gray = np.full((64, 64), 77, np.uint8)  # 30 % gray
    assert np.array_equal(np.asarray(adjust_mask(gray, softness_px=6)), gray)  # feathering a flat gray is a no-op
    assert token_grid(gray, (64, 64)) == pytest.approx(np.full((4, 4), 77 / 255), abs=1e-6)
    weights = latent_weights(torch.from_numpy(gray / 255.0).float()[None, None], 8, 8)
    assert torch.allclose(weights, torch.full_like(weights, 77 / 255), atol=1e-6)
    floored = latent_weights(torch.from_numpy(gray / 255.0).float()[None, None], 8, 8, background_weight=0.1)
    assert torch.allclose(floored, torch.full_like(floored, 0.1 + 0.9 * 77 / 255), atol=1e-6)


def test_threshold_binarises():
    ramp = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    out = np.asarray(adjust_mask(ramp, threshold=0.5))
    assert set(np.unique(out)) == {0, 255}
    assert (out[0] == 255).sum() == 256 - 128  # values >= 127.5, i.e. 128..255


@pytest.mark.parametrize("grow", [1, 3, 8, 20])
def test_grow_and_shrink_move_the_edge_by_the_given_pixels(grow):
    m = square()  # 48 x 48
    grown = np.asarray(adjust_mask(m, grow_px=grow))
    shrunk = np.asarray(adjust_mask(m, grow_px=-grow))
    # a straight edge moves by exactly ``grow`` pixels: the middle row/column widen/narrow by 2 * grow
    assert (grown[64] > 0).sum() == 48 + 2 * grow and (grown[:, 64] > 0).sum() == 48 + 2 * grow
    assert (shrunk[64] > 0).sum() == 48 - 2 * grow and (shrunk[:, 64] > 0).sum() == 48 - 2 * grow
    # round brush: a corner grows to a quarter circle, not to a square corner
    assert grown[40 - grow, 40 - grow] == 0 and grown[40 - grow, 40] == 255
    expected_area = 48 * 48 + 4 * 48 * grow + np.pi * grow * grow
    assert area(grown) == pytest.approx(expected_area, rel=0.03)


def test_grow_and_shrink_are_monotone():
    m = np.asarray(adjust_mask(square(), softness_px=4))  # works on soft masks too
    previous = None
    for g in range(-12, 13, 2):
        out = np.asarray(adjust_mask(m, grow_px=g)).astype(int)
        if previous is not None:
            assert (out >= previous).all(), f"growing by {g} removed pixels"
            assert out.sum() > previous.sum()
        previous = out


def test_softness_feathers_the_edge_and_keeps_the_area():
    m = square()
    soft = np.asarray(adjust_mask(m, softness_px=8)).astype(float)
    assert soft.sum() == pytest.approx(m.astype(float).sum(), rel=0.01)
    row = soft[64]
    assert row[64] == 255 and row[0] == 0
    assert 0 < row[40] < 255 and 0 < row[37] < row[40] < row[43]  # a ramp across the edge
    ramp = np.where((row > 0.16 * 255) & (row < 0.84 * 255))[0]
    assert 6 <= (ramp < 64).sum() <= 10  # the 16-84 % ramp is about softness_px wide


def test_order_is_threshold_then_grow_then_soften():
    m = np.asarray(adjust_mask(square(), softness_px=6))
    out = np.asarray(adjust_mask(m, threshold=0.5, grow_px=4))
    assert set(np.unique(out)) == {0, 255} and (out[64] > 0).sum() == 48 + 8


# ---- painted corrections ------------------------------------------------------------------------------

def _layer(size, box, rgb, alpha=255):
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle(box, fill=(*rgb, alpha))
    return layer


def test_strokes_add_and_remove():
    m = square()
    add = _layer((128, 128), (0, 0, 9, 9), ADD_RGB)
    remove = _layer((128, 128), (50, 50, 59, 59), REMOVE_RGB)
    out = np.asarray(apply_strokes(m, {"background": None, "layers": [add, remove], "composite": None}))
    assert (out[0:10, 0:10] == 255).all() and (out[50:60, 50:60] == 0).all()
    untouched = np.ones_like(m, bool)
    untouched[0:10, 0:10] = untouched[50:60, 50:60] = False
    assert np.array_equal(out[untouched], m[untouched])
    assert np.array_equal(np.asarray(apply_strokes(m, None)), m)
    assert np.array_equal(np.asarray(apply_strokes(m, {"layers": []})), m)


def test_strokes_from_a_smaller_editor_canvas_are_scaled_and_arrays_work():
    m = np.zeros((200, 100), np.uint8)
    layer = np.asarray(_layer((50, 100), (0, 0, 24, 49), ADD_RGB))  # top-left quarter of a half-size canvas
    out = np.asarray(apply_strokes(m, {"layers": [layer]}))
    assert out[:96, :48].min() == 255 and out[104:, :].max() == 0 and out[:, 52:].max() == 0


def test_half_transparent_brush_is_full_strength_and_other_colours_are_ignored():
    m = square()
    out = np.asarray(apply_strokes(m, {"layers": [_layer((128, 128), (0, 0, 9, 9), ADD_RGB, alpha=140)]}))
    assert (out[0:10, 0:10] == 255).all()
    out = np.asarray(apply_strokes(m, {"layers": [_layer((128, 128), (0, 0, 9, 9), (0, 0, 255))]}))
    assert np.array_equal(out, m)  # neither brush: ignored


def test_strokes_found_from_the_composite_when_there_are_no_layers():
    background = Image.new("RGB", (128, 128), (90, 90, 90))
    composite = background.copy()
    ImageDraw.Draw(composite).rectangle((0, 0, 9, 9), fill=ADD_RGB)
    ImageDraw.Draw(composite).rectangle((60, 60, 69, 69), fill=REMOVE_RGB)
    out = np.asarray(apply_strokes(square(), {"background": background, "composite": composite}))
    assert (out[0:10, 0:10] == 255).all() and (out[60:70, 60:70] == 0).all() and out[45, 45] == 255


# ---- what the trainer sees ------------------------------------------------------------------------------

def test_token_grid_values_are_block_means():
    rng = np.random.default_rng(1)
    m = rng.integers(0, 256, (96, 128)).astype(np.uint8)
    grid = token_grid(m, (128, 96))
    assert grid.shape == (6, 8)
    expected = (m.astype(np.float64) / 255).reshape(6, 16, 8, 16).mean(axis=(1, 3))
    assert grid == pytest.approx(expected, abs=1e-5)
    view = np.asarray(token_grid_view(m, (128, 96)))
    assert view.shape == (96, 128)
    assert view[16:32, 32:48].min() == view[16:32, 32:48].max() == round(expected[1, 2] * 255)  # one flat block
    big = np.asarray(token_grid_view(m, (128, 96), display_size=(256, 192)))
    assert big.shape == (192, 256) and big[32, 64] == view[16, 32]
    floored = np.asarray(token_grid_view(np.zeros((96, 128), np.uint8), (128, 96), background_weight=0.1))
    assert (floored == round(0.1 * 255)).all()


def test_token_grid_matches_the_trainers_weights():
    image, mask = subject_image((160, 200))
    prepared = prepare_image(image, mask, 128)
    grid = token_grid(mask, prepared.size)
    weights = latent_weights(prepared.mask, prepared.size[1] // 8, prepared.size[0] // 8)[0, 0]
    per_token = torch.nn.functional.avg_pool2d(weights[None, None], 2)[0, 0].numpy()  # 2x2 latent pixels = 1 token
    assert grid == pytest.approx(per_token, abs=2e-3)


def test_thin_line_vanishes_at_the_token_grid_unless_grown():
    m = np.zeros((128, 128), np.uint8)
    m[:, 61:65] = 255  # a 4-px strap, off the 16-px grid
    grid = token_grid(m, (128, 128))
    assert grid.max() <= 0.25 + 1e-6  # no token is even half subject: the strap weighs a quarter at most
    assert thin_share(m, (128, 128)) == 1.0
    grown = adjust_mask(m, grow_px=6)  # 16 px wide
    grown_grid = token_grid(grown, (128, 128))
    assert grown_grid.max() >= 0.5  # survives: a column of tokens at least half subject
    assert (grown_grid >= 0.5).any(axis=1).all()  # along the whole length
    assert thin_share(grown, (128, 128)) < 1.0
    assert thin_share(square(lo=32, hi=96), (128, 128)) == 0.0 and thin_share(np.zeros((32, 32), np.uint8), (32, 32)) == 0.0


# ---- the page's mask step (handlers, no browser) --------------------------------------------------------

def _dataset(size=(400, 500)):
    from ui.dataset_step import Dataset

    image, mask = subject_image(size)
    return Dataset(image, mask, "uploaded mask"), mask


def test_new_mask_clears_strokes_and_defaults_leave_the_mask_as_given():
    from ui.dataset_step import on_new_mask

    dataset, mask = _dataset()
    refined, preview, editor, full, tokens, summary = on_new_mask(dataset, 0.0, 0, 0, "character-rank4-400", 0.0)
    assert np.array_equal(np.asarray(refined.mask), np.asarray(mask)) and refined.raw_mask is mask
    assert editor["layers"] == [] and editor["background"].size == mask.size
    assert tokens.size == (448, 560)  # the training size of a 400x500 image at 512 px of area
    assert "22 %" in summary and "28×35 tokens" in summary
    assert on_new_mask(None, 0.0, 0, 0, "character-rank4-400", 0.0)[0] is None


def test_controls_and_strokes_change_the_training_mask_and_grow_is_in_training_pixels():
    from ui.dataset_step import on_mask_adjust

    dataset, mask = _dataset((896, 1120))  # twice the training size (448x560)
    stroke = _layer((448, 560), (0, 0, 49, 49), ADD_RGB)  # the editor shows a half-size copy
    refined, _, full, tokens, summary = on_mask_adjust(dataset, 0.0, 0, 4, {"layers": [stroke]},
                                                       "character-rank4-400", 0.1)
    m = np.asarray(refined.mask)
    assert m[:96, :96].min() == 255  # the stroke, scaled to the full-size mask
    row = np.asarray(mask)[560] > 127
    assert (m[560] > 127).sum() == row.sum() + 2 * 8  # grow 4 training px = 8 px of this 2x image
    assert refined.raw_mask is mask  # adjusting again starts from the unadjusted mask
    again, *_ = on_mask_adjust(refined, 0.0, 0, 0, {"layers": []}, "character-rank4-400", 0.0)
    assert np.array_equal(np.asarray(again.mask), np.asarray(mask))
    assert "Background weight 0.1" in summary


def test_thin_subject_gets_a_grow_warning():
    from ui.dataset_step import Dataset, on_mask_adjust

    image = Image.new("RGB", (512, 512), (20, 40, 200))
    m = np.zeros((512, 512), np.uint8)
    m[:, 100:104] = m[200:204, :] = 255
    dataset = Dataset(image, Image.fromarray(m), "uploaded mask")
    *_, summary = on_mask_adjust(dataset, 0.0, 0, 0, None, "character-rank4-400", 0.0)
    assert "Grow the mask" in summary
    *_, summary = on_mask_adjust(dataset, 0.0, 0, 8, None, "character-rank4-400", 0.0)
    assert "Grow the mask" not in summary


def test_mask_controls_flow_into_the_training_config(tmp_path):
    from trainer.config import load_preset
    from ui.dataset_step import loss_settings, mask_defaults
    from ui.training_step import TrainingController

    assert mask_defaults("character-rank4-400") == (0.0, True, 0.0, 0.25)
    assert mask_defaults("style-rank16-2000")[3] == 0.0

    class Manager:
        submitted = []

        def active_for(self, owner):
            return None

        def submit(self, owner, run, token=None):
            self.submitted.append(run)

    manager = Manager()
    dataset, _ = _dataset((160, 200))
    TrainingController(manager, tmp_path).start(
        "alice", dataset, "a photo of [trigger]", "ohwx", "", "character-rank4-400", 4, 10, 4e-4, 5, "tiny-demo",
        loss_settings=loss_settings(0.1, False, 0.2, 0.5))
    cfg = manager.submitted[0].config
    assert (cfg.background_weight, cfg.normalize_mask, cfg.unmasked_probability, cfg.augment_probability) == \
        (0.1, False, 0.2, 0.5)
    TrainingController(manager, tmp_path / "b").start(
        "bob", dataset, "a photo", "", "", "style-rank16-2000", 4, 10, 4e-4, 5, "tiny-demo")  # no settings: the preset's
    assert manager.submitted[1].config.augment_probability == load_preset("style-rank16-2000").config().augment_probability
