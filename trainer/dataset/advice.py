"""Advice on the training picture, from what practitioners found when training a Flux LoRA from one image.

Advice never blocks training: it is shown next to the picture. Each check is a small pure function of the
image (and its mask) that returns an ``Advice`` or None; ``image_advice`` runs them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from trainer.dataset.images import alpha_mask

MIN_PIXELS = 1_000_000  # practitioners recommend sources of at least one megapixel
MAX_ASPECT = 2.5
MIN_SUBJECT_FRACTION = 0.25
# Sharpness: see ``sharpness``. Calibrated on 26 sample photos (skimage's and gradio's, most of them 256-600 px,
# so already soft at 1024) and on synthetic 1/f textures, scaled to 1024 px then blurred: sharp photos score
# 15-1080 (only a microscope image, a colour wheel and a motion-blurred photo score under 12, at 2); a Gaussian
# blur of radius 1 gives 6-210, radius 2 gives 5-30, radius 3 or more at most 9. Textures like the tests' score
# 650-1100 sharp, 20-32 at radius 1, under 9 from radius 1.5.
BLUR_THRESHOLD = 12.0
SHARPNESS_SIDE = 1024
TILE = 32
BORDER_FRACTION = 0.03
FLAT_BORDER_SHARE = 0.9


@dataclass(frozen=True)
class Advice:
    code: str  # small, blurry, elongated, small_subject, flat_background
    message: str  # what is wrong, why it matters with one training image, what to do


def image_advice(image: Image.Image, mask: Image.Image | None) -> list[Advice]:
    """Everything worth telling the user about this training picture, most important first.

    ``mask`` is the "L" mask (white = trained) or None; with None, an image's own transparency is the mask.
    """
    if mask is None:
        mask = alpha_mask(image)
    checks = (
        check_small(image),
        check_blurry(image, mask),
        check_elongated(image),
        check_small_subject(mask),
        check_flat_background(image) if mask is None else None,
    )
    return [advice for advice in checks if advice is not None]


def check_small(image: Image.Image) -> Advice | None:
    width, height = image.size
    if width * height >= MIN_PIXELS:
        return None
    return Advice(
        "small",
        f"The picture is {width}x{height} ({width * height / 1e6:.2f} megapixels), under the 1 megapixel "
        "practitioners recommend: with a single image the LoRA learns its softness and artifacts along with the "
        "subject, so use a larger original if you have one (not an AI-upscaled copy).",
    )


def check_blurry(image: Image.Image, mask: Image.Image | None = None) -> Advice | None:
    if sharpness(image, mask) >= BLUR_THRESHOLD:
        return None
    return Advice(
        "blurry",
        "The picture looks blurry (little fine detail even in its sharpest parts): a LoRA trained on one soft "
        "picture learns the blur and reproduces it, so use a sharper photo or render if you have one.",
    )


def check_elongated(image: Image.Image) -> Advice | None:
    width, height = image.size
    ratio = max(width, height) / min(width, height)
    if ratio <= MAX_ASPECT:
        return None
    return Advice(
        "elongated",
        f"The picture is very {'wide' if width > height else 'tall'} ({ratio:.1f}:1): at the training size of "
        "about a megapixel or less, the subject gets few pixels across its short side, so crop it closer to "
        "the subject, to 2:1 or squarer.",
    )


def check_small_subject(mask: Image.Image | None) -> Advice | None:
    if mask is None:
        return None
    covered = subject_fraction(mask)
    if covered >= MIN_SUBJECT_FRACTION:
        return None
    return Advice(
        "small_subject",
        f"The subject covers only {covered:.0%} of the frame: with a single image every pixel of the subject "
        "counts, so crop closer and fill the frame with the subject.",
    )


def check_flat_background(image: Image.Image) -> Advice | None:
    colour = flat_border_colour(image)
    if colour is None:
        return None
    return Advice(
        "flat_background",
        f"The background is plain {colour}: after hundreds of repeats the LoRA learns that background too and "
        "puts it into its pictures, so upload a transparent PNG of the subject or a mask, or let the app mask "
        "the subject.",
    )


# --- measurements ------------------------------------------------------------------------------------------


def sharpness(image: Image.Image, mask: Image.Image | None = None) -> float:
    """How much fine detail the sharpest parts of the picture (of the subject, with a mask) have.

    Variance of the Laplacian of the greyscale picture scaled to 1024 px on its long side (so a small picture
    is judged as it will look when trained at about that size), per 32x32 tile; the 90th percentile over the
    tiles. Tiles rather than one global variance, so that a
    sharp subject in front of a smooth or out-of-focus background, or flat-coloured artwork with crisp edges,
    is not called blurry.
    """
    grey = image.convert("L")
    scale = SHARPNESS_SIDE / max(grey.size)
    if scale != 1:
        new_size = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
        grey = grey.resize(new_size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    pixels = np.asarray(grey, dtype=np.float32)
    if min(pixels.shape) < 3:
        return 0.0
    lap = (
        pixels[:-2, 1:-1] + pixels[2:, 1:-1] + pixels[1:-1, :-2] + pixels[1:-1, 2:] - 4.0 * pixels[1:-1, 1:-1]
    )
    rows, cols = max(1, lap.shape[0] // TILE), max(1, lap.shape[1] // TILE)
    tile_h, tile_w = lap.shape[0] // rows, lap.shape[1] // cols
    tiles = lap[: rows * tile_h, : cols * tile_w].reshape(rows, tile_h, cols, tile_w)
    variances = tiles.var(axis=(1, 3))
    if mask is not None:
        weights = np.asarray(mask.convert("L").resize((cols, rows), Image.Resampling.BOX), dtype=np.float32)
        on_subject = variances[weights >= 128]
        if on_subject.size:
            variances = on_subject
    return float(np.percentile(variances, 90))


def subject_fraction(mask: Image.Image) -> float:
    """Share of the frame the mask trains on (grey counts in proportion: 50% grey is half a pixel)."""
    return float(np.asarray(mask.convert("L"), dtype=np.float32).mean() / 255.0)


def flat_border_colour(image: Image.Image) -> str | None:
    """"white" or "black" when nearly all of the picture's outer border is that plain colour, else None."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    height, width = rgb.shape[:2]
    band = max(2, round(BORDER_FRACTION * min(width, height)))
    border = np.concatenate(
        [
            rgb[:band].reshape(-1, 3),
            rgb[-band:].reshape(-1, 3),
            rgb[band:-band, :band].reshape(-1, 3),
            rgb[band:-band, -band:].reshape(-1, 3),
        ]
    )
    if (border.min(axis=1) >= 235).mean() >= FLAT_BORDER_SHARE:
        return "white"
    if (border.max(axis=1) <= 20).mean() >= FLAT_BORDER_SHARE:
        return "black"
    return None
