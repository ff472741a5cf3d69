"""Advice on the training pictures, from what practitioners found when training a Flux LoRA from one image or a few.

Advice never blocks training: it is shown next to the picture. Each check is a small pure function of the
image (and its mask) that returns an ``Advice`` or None; ``image_advice`` runs them all for one picture, and
``set_advice`` the checks of a set of several (mixed shapes, one much smaller, near-duplicates).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Sequence

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
# A set: shapes further apart than 1.5x (a 3:2 landscape next to a 1:1 or a 2:3 portrait), an image with a quarter of
# the others' pixels or less (upscaled 2x or more on each side to the shared training area), and two pictures whose
# 64-bit difference hashes differ in at most 6 bits (re-saves, small crops, brightness changes of the same shot).
MIXED_ASPECT_SPREAD = 1.5
SMALLER_SHARE = 0.25
NEAR_DUPLICATE_BITS = 6


@dataclass(frozen=True)
class Advice:
    # small, blurry, elongated, small_subject, flat_background; a set's: mixed_aspect, much_smaller, near_duplicate
    code: str
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


# --- a set of several pictures -----------------------------------------------------------------------------


def set_advice(images: Sequence) -> list[Advice]:
    """What is worth telling about a set as a whole (each picture's own advice is ``image_advice``). ``images``: the
    set's pictures, each with ``name`` and ``image`` (``trainer.dataset.imageset.SetImage``)."""
    if len(images) < 2:
        return []
    checks = (check_mixed_aspects(images), *check_much_smaller(images), *check_near_duplicates(images))
    return [advice for advice in checks if advice is not None]


def check_mixed_aspects(images: Sequence) -> Advice | None:
    ratios = [(item.image.width / item.image.height, item.name) for item in images]
    (low, tallest), (high, widest) = min(ratios), max(ratios)
    if high / low <= MIXED_ASPECT_SPREAD:
        return None
    return Advice(
        "mixed_aspect",
        f"The set mixes shapes: '{widest}' is {_shape(high)} and '{tallest}' is {_shape(low)}. Each picture trains "
        "at its own shape (no square crop), which works, but the previews use the first picture's shape and the LoRA "
        "learns its framing from all of them: crop them to similar shapes if you want one framing.",
    )


def check_much_smaller(images: Sequence) -> list[Advice]:
    out = []
    pixels = [item.image.width * item.image.height for item in images]
    for index, item in enumerate(images):
        others = float(np.median(pixels[:index] + pixels[index + 1:]))
        if pixels[index] <= SMALLER_SHARE * others:
            out.append(Advice(
                "much_smaller",
                f"'{item.name}' is {item.image.width}x{item.image.height}, {others / pixels[index]:.0f} times fewer "
                "pixels than the others: it is upscaled to the set's shared training size, so the LoRA learns its "
                "softness next to their detail. Use a larger original, or leave it out.",
            ))
    return out


def check_near_duplicates(images: Sequence) -> list[Advice]:
    hashes = [difference_hash(item.image) for item in images]
    out = []
    for (i, a), (j, b) in combinations(enumerate(hashes), 2):
        if bin(a ^ b).count("1") <= NEAR_DUPLICATE_BITS:
            out.append(Advice(
                "near_duplicate",
                f"'{images[i].name}' and '{images[j].name}' are nearly the same picture: the second adds no new view, "
                "it only doubles that one's weight. Replace one with another angle, pose or expression.",
            ))
    return out


def difference_hash(image: Image.Image, side: int = 8) -> int:
    """64 bits: is each pixel of a 9x8 greyscale thumbnail brighter than its right neighbour? Equal for re-saves,
    small resizes and brightness changes of one picture; far apart for different pictures."""
    small = np.asarray(image.convert("L").resize((side + 1, side), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def _shape(ratio: float) -> str:
    if ratio >= 1:
        return f"wide ({ratio:.2g}:1)"
    return f"tall (1:{1 / ratio:.2g})"
