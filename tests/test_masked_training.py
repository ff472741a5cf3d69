"""The masked loss teaches the subject and not the background: measured on the tiny model, CPU, deterministic.

A synthetic image (a red disc with a yellow band: the subject; blue/cyan stripes: the background) is trained
twice with the same seed, steps and learning rate: once masked, once unmasked. Before and after training we
ask the model for its one-step reconstruction of the training latent, ``x0_hat = x_t - sigma * v``, at fixed
noise levels and fixed noise, and measure the squared error against the training latent separately over the
subject's latent pixels and the background's. How much that error drops is how far the model moved toward
reproducing that region. The masked run must learn the subject about as well as the unmasked run while its
background moves far less. Also: background augmentation (bank, composites, determinism).
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from trainer.dataset import augment
from trainer.training import flow
from trainer.config import load_preset
from trainer.training.encode import encode_example, encode_prompts, free_encoders
from trainer.dataset.prepare import latent_weights, prepare_image
from trainer.events import Finished, Progress
from trainer.families import family_of_transformer
from trainer.training.loop import train_lora
from trainer.model.loading import load_parts, resolve_model
from trainer.runs.folder import RunFolder
from trainer.training.previews import PreviewRenderer
from trainer.training.job import run_training

SIZE = 128
CAPTION = "a photo of ohwx, a red ball"
EVAL_SIGMAS = (0.3, 0.5, 0.7, 0.9)
EVAL_DRAWS = 2  # noise draws per sigma
STEPS = 60
LEARNING_RATE = 2e-2


def striped_subject() -> tuple[Image.Image, Image.Image]:
    """A red disc with a yellow band (the subject) on blue/cyan stripes (the background), and its exact mask."""
    image = Image.new("RGB", (SIZE, SIZE), (20, 60, 200))
    draw = ImageDraw.Draw(image)
    for y in range(0, SIZE, 16):
        draw.rectangle((0, y, SIZE, y + 7), fill=(40, 200, 220))
    box = (28, 28, 100, 100)
    draw.ellipse(box, fill=(230, 30, 30))
    band = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(band).rectangle((0, 56, SIZE, 72), fill=255)
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    yellow = Image.new("RGB", (SIZE, SIZE), (250, 220, 20))
    image.paste(yellow, (0, 0), Image.fromarray(np.minimum(np.asarray(band), np.asarray(mask))))
    return image, mask


def config(**overrides):
    settings = dict(steps=STEPS, save_every=STEPS, resolution=SIZE, learning_rate=LEARNING_RATE, rank=4,
                    preview_steps=1, preview_at_start=False, trigger="ohwx", caption=CAPTION, sample_prompts=(),
                    model="tiny-demo", seed=3, max_text_tokens=32, background_weight=0.0, normalize_mask=True, unmasked_probability=0.0,
                    augment_probability=0.0)
    return load_preset("quick-test-250").config(**{**settings, **overrides})


@torch.no_grad()
def region_errors(transformer, example, cfg, subject: torch.Tensor, background: torch.Tensor) -> tuple[float, float]:
    """Mean squared error of the one-step reconstruction x0_hat = x_t - sigma * v against the training latent,
    over the subject's and the background's latent pixels; fixed sigmas and noise (independent of training)."""
    x0 = example.latents.float()
    h, w = example.latent_size
    generator = torch.Generator().manual_seed(1234)
    family = family_of_transformer(transformer)  # FLUX.1 or klein: their own packing and conditioning
    total = torch.zeros(h, w)
    count = 0
    for sigma in EVAL_SIGMAS:
        for _ in range(EVAL_DRAWS):
            noise = torch.randn(x0.shape, generator=generator)
            s = torch.tensor([sigma])
            x_t = flow.noisy_latents(x0, noise, s)
            inputs = family.transformer_inputs(transformer, family.pack(x_t.to(example.latents.dtype)), s,
                                               example.caption, example.image_ids, cfg.guidance_scale)
            v = transformer(**inputs, return_dict=False)[0]
            x0_hat = x_t - sigma * family.unpack(v, h, w).float()
            total += (x0_hat - x0).pow(2).mean(dim=(0, 1))
            count += 1
    error = total / count
    return float(error[subject].mean()), float(error[background].mean())


def train_and_measure(tmp_path, masked: bool, **overrides) -> dict:
    cfg = config(masked=masked, **overrides)
    image, mask = striped_subject()
    run = RunFolder.create(tmp_path, cfg, image, mask)
    parts = load_parts(resolve_model(cfg.model))
    train_image = prepare_image(image, mask, cfg.resolution)  # the mask is needed for the regions either way
    run.train_size = train_image.size
    prompts = encode_prompts(parts, cfg.preview_prompts, cfg.max_text_tokens)
    example = encode_example(parts, train_image, cfg.training_caption, prompts, masked, cfg.background_weight)
    example = augment.with_background_bank(parts, example, train_image, cfg)
    free_encoders(parts)
    coverage = latent_weights(train_image.mask, *example.latent_size)[0, 0]
    subject, background = coverage >= 0.999, coverage <= 0.001
    before = region_errors(parts.transformer, example, cfg, subject, background)
    events = list(train_lora(parts, example, cfg, run, PreviewRenderer(parts, prompts), lambda: False))
    assert isinstance(events[-1], Finished) and events[-1].last_step == STEPS
    after = region_errors(parts.transformer, example, cfg, subject, background)
    losses = [e.loss for e in events if isinstance(e, Progress)]
    return {"subject_before": before[0], "subject_after": after[0], "subject_gain": before[0] - after[0],
            "background_before": before[1], "background_after": after[1], "background_gain": before[1] - after[1],
            "first_loss": float(np.mean(losses[:5])), "last_loss": float(np.mean(losses[-5:])),
            "subject_pixels": int(subject.sum()), "background_pixels": int(background.sum())}


def describe(name: str, r: dict) -> str:
    pct = lambda gain, before: f"{100 * gain / before:+.1f}%"
    return (f"{name:>22}: subject {r['subject_before']:.4f} -> {r['subject_after']:.4f} "
            f"({pct(r['subject_gain'], r['subject_before'])})   background {r['background_before']:.4f} -> "
            f"{r['background_after']:.4f} ({pct(r['background_gain'], r['background_before'])})   "
            f"training loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}")


def assert_masked_learns_the_subject(unmasked: dict, subject_ratio: float, background_ratio: float) -> None:
    assert unmasked["subject_gain"] > 0.1 * unmasked["subject_before"], "the unmasked run did not learn measurably"
    assert unmasked["background_gain"] > 0.1 * unmasked["background_before"], "the unmasked run did not learn the background"
    assert subject_ratio >= 0.7, "the masked run learned the subject much less than the unmasked run"
    assert background_ratio <= 0.5, "the masked run's background moved almost as much as the unmasked run's"


def test_masked_training_learns_the_subject_not_the_background(tmp_path):
    started = time.perf_counter()
    unmasked = train_and_measure(tmp_path / "unmasked", masked=False)
    masked = train_and_measure(tmp_path / "masked", masked=True)
    augmented = train_and_measure(tmp_path / "augmented", masked=True, augment_probability=0.25)
    subject_ratio = masked["subject_gain"] / unmasked["subject_gain"]
    background_ratio = masked["background_gain"] / unmasked["background_gain"]
    aug_subject_ratio = augmented["subject_gain"] / unmasked["subject_gain"]
    aug_background_ratio = augmented["background_gain"] / unmasked["background_gain"]
    print()
    print(f"latent pixels: subject {masked['subject_pixels']}, background {masked['background_pixels']}; "
          f"{STEPS} steps, lr {LEARNING_RATE}, seed 3, {time.perf_counter() - started:.1f} s")
    print(describe("unmasked", unmasked))
    print(describe("masked", masked))
    print(describe("masked + augment 0.25", augmented))
    print(f"masked / unmasked: subject gain ratio {subject_ratio:.2f}, background gain ratio {background_ratio:.2f}")
    print(f"augmented / unmasked: subject gain ratio {aug_subject_ratio:.2f}, "
          f"background gain ratio {aug_background_ratio:.2f}")
    assert_masked_learns_the_subject(unmasked, subject_ratio, background_ratio)
    # Augmented steps train whole images (the subject on other backgrounds), so the model also gets better at
    # backgrounds in general; the subject is still learned as well, and the training background less than unmasked.
    assert aug_subject_ratio >= 0.7, "background augmentation cost too much of the subject's learning"
    assert aug_background_ratio <= 0.75, "with augmentation the training background was learned almost fully"


def test_masked_training_learns_the_subject_not_the_background_on_klein(tmp_path, isolated_data_dir,
                                                                         tiny_klein_dir):
    """The same measurement on tiny-klein (FLUX.2 [klein]'s architecture, random weights). Its latents are 2x2
    patches (1/16 of the image), so it trains at 256 px to get the same 16x16 latent as tiny-demo at 128 px."""
    (isolated_data_dir / "models" / "tiny-klein").symlink_to(tiny_klein_dir, target_is_directory=True)
    settings = dict(model="tiny-klein", resolution=2 * SIZE)
    started = time.perf_counter()
    unmasked = train_and_measure(tmp_path / "unmasked", masked=False, **settings)
    masked = train_and_measure(tmp_path / "masked", masked=True, **settings)
    subject_ratio = masked["subject_gain"] / unmasked["subject_gain"]
    background_ratio = masked["background_gain"] / unmasked["background_gain"]
    print()
    print(f"tiny-klein, latent pixels: subject {masked['subject_pixels']}, background {masked['background_pixels']}; "
          f"{STEPS} steps, lr {LEARNING_RATE}, seed 3, {time.perf_counter() - started:.1f} s")
    print(describe("unmasked", unmasked))
    print(describe("masked", masked))
    print(f"masked / unmasked: subject gain ratio {subject_ratio:.2f}, background gain ratio {background_ratio:.2f}")
    assert_masked_learns_the_subject(unmasked, subject_ratio, background_ratio)


# ---- background augmentation ---------------------------------------------------------------------

def test_augmented_images_keep_the_subject_and_vary_the_background():
    image, mask = striped_subject()
    train_image = prepare_image(image, mask, SIZE)
    bank = augment.augmented_pixels(train_image, count=8, seed=5)
    assert bank.shape == (8, 3, SIZE, SIZE) and bank.min() >= -1 and bank.max() <= 1
    assert torch.equal(bank, augment.augmented_pixels(train_image, count=8, seed=5)), "not deterministic"
    assert not torch.equal(bank, augment.augmented_pixels(train_image, count=8, seed=6))
    m = train_image.mask[0, 0]
    subject, background = m == 1.0, m == 0.0
    original = train_image.pixels[0]
    for entry in bank:
        assert torch.allclose(entry[:, subject], original[:, subject], atol=1e-5), "the subject was changed"
        assert (entry[:, background] - original[:, background]).abs().mean() > 0.05, "background not replaced"
    backgrounds = bank[:, :, background]  # (8, 3, n): every entry's background differs from every other's
    for i in range(8):
        for j in range(i + 1, 8):
            assert (backgrounds[i] - backgrounds[j]).abs().mean() > 0.02
    assert augment.bank_kinds(8, 0) == ["solid", "gradient", "noise", "own_colours"] * 2
    photo = Image.new("RGB", (300, 200), (255, 128, 0))
    kinds = augment.bank_kinds(8, 1)
    assert kinds.count("photo") == 4
    with_photo = augment.augmented_pixels(train_image, count=8, seed=5, backgrounds=[photo])
    orange = torch.tensor([255, 128, 0]) / 127.5 - 1
    for entry, kind in zip(with_photo, kinds):
        if kind == "photo":  # the user's background (slightly blurred, maybe mirrored: flat orange stays orange)
            assert (entry[:, background].mean(dim=1) - orange).abs().max() < 0.02


def _tiny_run(tmp_path, **overrides):
    cfg = config(steps=6, save_every=6, resolution=64, **overrides)
    image, mask = striped_subject()
    run = RunFolder.create(tmp_path, cfg, image, mask)
    return run, list(run_training(run))


def test_augmented_run_is_deterministic_and_picks_from_a_cached_bank(tmp_path, monkeypatch):
    import safetensors.torch

    encoded = []
    original = augment.encode_image
    monkeypatch.setattr(augment, "encode_image", lambda parts, image: encoded.append(len(image.pixels))
                        or original(parts, image))
    picks = []
    original_pick = augment.pick
    monkeypatch.setattr("trainer.training.loop.pick_augmented", lambda example, g: picks.append(1) or original_pick(example, g))
    run_a, events_a = _tiny_run(tmp_path / "a", augment_probability=0.5)
    assert isinstance(events_a[-1], Finished) and not events_a[-1].stopped
    assert sum(encoded) == augment.BANK_SIZE, "the bank must be encoded once, before the loop"
    assert 0 < len(picks) < 6  # seed 3: some steps augmented, some not
    run_b, events_b = _tiny_run(tmp_path / "b", augment_probability=0.5)
    a = safetensors.torch.load_file(run_a.checkpoint_path(6))
    b = safetensors.torch.load_file(run_b.checkpoint_path(6))
    assert all(torch.equal(a[k], b[k]) for k in a), "an augmented run is not reproducible"


def test_a_runs_own_backgrounds_reach_the_bank(tmp_path, monkeypatch):
    """Photos stored with the run (page upload or --background) are what the job's bank pastes the subject onto."""
    seen = []
    original = augment.augmented_pixels

    def recording(image, count=augment.BANK_SIZE, seed=0, backgrounds=()):
        backgrounds = list(backgrounds)
        seen.append([b.getpixel((0, 0)) for b in backgrounds])
        return original(image, count, seed, backgrounds)

    monkeypatch.setattr(augment, "augmented_pixels", recording)
    cfg = config(steps=2, save_every=2, resolution=64, augment_probability=0.5)
    image, mask = striped_subject()
    photos = [Image.new("RGB", (96, 72), (255, 128, 0)), Image.new("RGB", (64, 100), (0, 90, 200))]
    run = RunFolder.create(tmp_path, cfg, image, mask, backgrounds=photos)
    assert sorted(p.name for p in (run.path / "dataset" / "backgrounds").iterdir()) == ["00.png", "01.png"]
    events = list(run_training(run))
    assert isinstance(events[-1], Finished) and not events[-1].stopped
    assert seen == [[(255, 128, 0), (0, 90, 200)]]


def test_own_backgrounds_are_checked_and_limited(tmp_path):
    from trainer.errors import UserError

    good = tmp_path / "good.jpg"
    Image.new("RGBA", (80, 64), (10, 20, 30, 128)).convert("RGB").save(good)
    assert [b.mode for b in augment.load_user_backgrounds([good])] == ["RGB"]
    bad = tmp_path / "holiday.png"
    bad.write_bytes(b"%PDF-1.4 not an image")
    with pytest.raises(UserError, match="holiday.png"):
        augment.load_user_backgrounds([good, bad])
    with pytest.raises(UserError, match=f"at most {augment.MAX_USER_BACKGROUNDS}"):
        augment.load_user_backgrounds([good] * (augment.MAX_USER_BACKGROUNDS + 1))


def test_no_bank_without_a_mask_or_with_augmentation_off():
    parts = load_parts(resolve_model("tiny-demo"))
    image, mask = striped_subject()
    prompts = encode_prompts(parts, [CAPTION], 32)
    for cfg, m in ((config(augment_probability=0.0), mask), (config(augment_probability=0.5, masked=False), None),
                   (config(augment_probability=0.5), None)):
        train_image = prepare_image(image, m, 64)
        example = encode_example(parts, train_image, CAPTION, prompts, cfg.masked, 0.0)
        assert augment.with_background_bank(parts, example, train_image, cfg).augmented is None
    cfg = config(augment_probability=0.5)
    train_image = prepare_image(image, mask, 64)
    example = augment.with_background_bank(parts, encode_example(parts, train_image, CAPTION, prompts, True, 0.0),
                                           train_image, cfg)
    assert example.augmented.shape == (augment.BANK_SIZE, *example.latents.shape[1:])
    generator = torch.Generator().manual_seed(0)
    picked = augment.pick(example, generator)
    assert picked.weights is None and picked.augmented is None and picked.latents.shape == example.latents.shape
    assert any(torch.equal(picked.latents[0], entry) for entry in example.augmented)
    assert not augment.augmented_step(dataclasses.replace(example, augmented=None), cfg, generator)
