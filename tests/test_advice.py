"""trainer.dataset.advice: each code fires on a constructed bad case and stays quiet on a good picture."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from trainer.dataset.advice import BLUR_THRESHOLD, Advice, image_advice, sharpness


def textured(size=(1024, 1024), seed=0) -> Image.Image:
    """A photo-like picture: a 1/f ("natural") colour texture with a dozen hard-edged discs on it."""
    width, height = size
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.fftfreq(width)[None, :]
    radius = np.hypot(fx, fy)
    radius[0, 0] = 1.0
    spectrum = (rng.normal(size=(height, width)) + 1j * rng.normal(size=(height, width))) / radius
    texture = np.real(np.fft.ifft2(spectrum))
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    rgb = np.stack([texture * rng.uniform(120, 200) + rng.uniform(0, 50) for _ in range(3)], -1)
    image = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y, r = rng.integers(0, width), rng.integers(0, height), rng.integers(20, 150)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def filling_mask(size=(1024, 1024), box=(0.1, 0.05, 0.9, 0.98)) -> Image.Image:
    width, height = size
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse([box[0] * width, box[1] * height, box[2] * width, box[3] * height], fill=255)
    return mask


def codes(image, mask=None) -> list[str]:
    return [advice.code for advice in image_advice(image, mask)]


def on_plain(colour, size=(1024, 1024)) -> Image.Image:
    """The textured subject pasted as an ellipse onto a plain background."""
    image = Image.new("RGB", size, colour)
    image.paste(textured(size), (0, 0), filling_mask(size, (0.2, 0.1, 0.8, 0.95)))
    return image


def test_good_picture_gets_no_advice():
    assert codes(textured(), filling_mask()) == []


@pytest.mark.parametrize("seed", range(3))
def test_good_picture_without_mask_gets_no_advice(seed):
    assert codes(textured(seed=seed)) == []


def test_advice_is_a_frozen_dataclass_with_sentences():
    image = textured((600, 200)).filter(ImageFilter.GaussianBlur(4))
    advice = image_advice(image, filling_mask((600, 200), (0.45, 0.4, 0.55, 0.6)))
    assert [a.code for a in advice] == ["small", "blurry", "elongated", "small_subject"]
    for item in advice:
        assert isinstance(item, Advice) and item.message.endswith(".") and len(item.message) < 400
        with pytest.raises(dataclasses.FrozenInstanceError):
            item.code = "x"


def test_small():
    assert codes(textured((900, 900))) == ["small"]  # 0.81 Mpx
    assert "small" not in codes(textured((1000, 1000)))
    message = image_advice(textured((800, 600)), None)[0].message
    assert "800x600" in message and "1 megapixel" in message


@pytest.mark.parametrize("radius", [3, 4, 8])
def test_blurry(radius):
    image = textured(seed=radius).filter(ImageFilter.GaussianBlur(radius))
    assert codes(image, filling_mask()) == ["blurry"]


@pytest.mark.parametrize("radius", [0, 0.5, 1])
def test_slight_softness_is_not_blurry(radius):
    image = textured(seed=7)
    if radius:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    assert "blurry" not in codes(image, filling_mask())


def test_blur_is_judged_at_1024_px_on_any_picture_size():
    sharp_big = textured((2048, 2048), seed=3)
    assert sharpness(sharp_big) >= BLUR_THRESHOLD
    assert sharpness(sharp_big.filter(ImageFilter.GaussianBlur(6))) < BLUR_THRESHOLD  # radius 3 at 1024 px


def test_sharp_subject_on_smooth_background_is_not_blurry():
    picture = textured(seed=5).filter(ImageFilter.GaussianBlur(6))  # out-of-focus background
    subject = filling_mask(box=(0.3, 0.3, 0.7, 0.7))
    picture.paste(textured(seed=6), (0, 0), subject)
    assert "blurry" not in codes(picture)
    assert "blurry" not in codes(picture, subject)


def test_blur_is_judged_on_the_subject_when_masked():
    picture = textured(seed=8)
    subject = filling_mask()
    picture.paste(picture.filter(ImageFilter.GaussianBlur(5)), (0, 0), subject)  # blurry subject, sharp rest
    assert "blurry" in codes(picture, subject)
    assert "blurry" not in codes(picture)  # the sharp background would hide it


def test_elongated():
    assert "elongated" in codes(textured((3000, 1000)))  # 3:1
    assert "elongated" in codes(textured((700, 1900)))  # tall
    assert "elongated" not in codes(textured((2000, 1000)))  # 2:1 is fine
    message = image_advice(textured((3000, 1000)), None)[-1].message
    assert "wide" in message and "3.0:1" in message


def test_small_subject():
    tiny_subject = filling_mask(box=(0.4, 0.4, 0.7, 0.7))  # ~7% of the frame
    assert codes(textured(), tiny_subject) == ["small_subject"]
    assert "fill the frame" in image_advice(textured(), tiny_subject)[0].message
    half_grey = Image.new("L", (1024, 1024), 128)  # grey counts in proportion: 50%
    assert "small_subject" not in codes(textured(), half_grey)
    assert "small_subject" in codes(textured(), Image.new("L", (1024, 1024), 40))


def test_transparency_counts_as_the_mask():
    cut_out = textured().convert("RGBA")
    cut_out.putalpha(filling_mask(box=(0.4, 0.4, 0.6, 0.6)))
    assert codes(cut_out) == ["small_subject"]
    cut_out.putalpha(filling_mask())
    assert codes(cut_out) == []


@pytest.mark.parametrize("colour, word", [((255, 255, 255), "white"), ((250, 248, 252), "white"), ((0, 0, 0), "black")])
def test_flat_background(colour, word):
    image = on_plain(colour)
    advice = image_advice(image, None)
    assert [a.code for a in advice] == ["flat_background"]
    assert word in advice[0].message and "transparent PNG" in advice[0].message


def test_flat_background_not_when_masked_or_busy():
    assert "flat_background" not in codes(on_plain((255, 255, 255)), filling_mask())
    assert "flat_background" not in codes(on_plain((128, 128, 128)))  # a grey backdrop is not a white cut-out
    assert "flat_background" not in codes(textured())
