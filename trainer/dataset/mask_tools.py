"""The user's control over the mask: adjust it, paint corrections, and see it as the trainer sees it.

Pure functions on "L" masks (255 = subject, trained; 0 = background; gray = trained in proportion):

* ``adjust_mask``: threshold (binarise), grow (+) / shrink (-) by a distance in pixels, soft edge (feather).
* ``apply_strokes``: add/remove corrections painted in a ``gr.ImageEditor`` (green adds, red removes).
* ``token_grid`` / ``token_grid_view``: the mask area-averaged per Flux token. At the training size each token
  covers 16x16 pixels (8x VAE downsampling, then 2x2 latent patches), so a 4-pixel strap covers a quarter of
  the tokens it crosses and weighs a quarter in the loss; growing the mask by a few pixels keeps it.
"""
from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps

from trainer.dataset.prepare import training_size

TOKEN_PX = 16  # pixels per Flux token side at the training size
ADD_RGB = (0, 200, 0)  # brush colour that adds to the subject (green)
REMOVE_RGB = (220, 0, 0)  # brush colour that removes from the subject (red)
_COLOUR_TOLERANCE = 150.0  # RGB distance within which a stroke counts as one of the two brushes
_MAX_RECTS = 10  # a disk of any radius as the union of at most this many rectangles (see _disk_rects)

MaskLike = Image.Image | np.ndarray


def as_mask_array(mask: MaskLike) -> np.ndarray:
    """An "L" image or an array (uint8 0-255, or float 0-1) → uint8 array, 255 = subject."""
    if isinstance(mask, Image.Image):
        return np.asarray(mask.convert("L"), dtype=np.uint8).copy()
    arr = np.asarray(mask)
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.dtype == np.uint8:
        return arr.copy()
    arr = arr.astype(np.float32)
    if arr.max(initial=0.0) <= 1.0:
        arr = arr * 255.0
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


# ---- adjust ---------------------------------------------------------------------------------------

def adjust_mask(mask: MaskLike, threshold: float | None = None, softness_px: float = 0,
                grow_px: float = 0) -> Image.Image:
    """The mask thresholded, then grown or shrunk, then feathered. Defaults change nothing.

    ``threshold`` (0-1): pixels at or above it become subject, the rest background (None keeps gray values).
    ``grow_px``: move the edge outwards by this many pixels (negative: inwards), with a round brush, so a
    corner stays a corner and a thin line gets ``2 * grow_px`` wider. Works on gray masks too (max/min filter).
    ``softness_px``: width of the soft edge: a Gaussian blur with sigma ``softness_px / 2``, so the edge ramps
    from about 16 % to 84 % over ``softness_px`` pixels; the mask's total area is kept.
    """
    m = as_mask_array(mask)
    if threshold is not None:
        m = np.where(m.astype(np.float32) >= float(threshold) * 255.0, 255, 0).astype(np.uint8)
    radius = int(round(grow_px))
    if radius:
        m = _morph(m, abs(radius), grow=radius > 0)
    if softness_px and softness_px > 0:
        sigma = float(softness_px) / 2.0
        m = cv2.GaussianBlur(m, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    return Image.fromarray(m)


def _disk_rects(radius: int) -> list[tuple[int, int]]:
    """(half-width, half-height) of rectangles whose union is the digital disk of ``radius`` (or, for a large
    radius, a disk within about half a pixel: rectangle corners on the circle at evenly spaced angles)."""
    corners = []
    for y in range(radius + 1):
        x = int(math.floor(math.sqrt(radius * radius - y * y) + 1e-9))
        if corners and corners[-1][0] == x:
            corners[-1] = (x, y)  # same width, taller: keep the tallest
        else:
            corners.append((x, y))
    if len(corners) > _MAX_RECTS:
        picks = np.linspace(0, len(corners) - 1, _MAX_RECTS).round().astype(int)
        corners = [corners[i] for i in sorted(set(picks))]
    return corners


def _morph(m: np.ndarray, radius: int, grow: bool) -> np.ndarray:
    """Grey dilation (grow) or erosion (shrink) by a disk, as max/min over rectangle filters (fast at any size)."""
    op = cv2.dilate if grow else cv2.erode
    border = 0 if grow else 255  # outside the image: nothing to grow from, nothing to shrink towards
    out = None
    for half_w, half_h in _disk_rects(radius):
        kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * half_w + 1, 2 * half_h + 1))
        part = op(m, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=border)
        out = part if out is None else (np.maximum(out, part) if grow else np.minimum(out, part))
    return out


# ---- painted corrections --------------------------------------------------------------------------

def apply_strokes(mask: MaskLike, editor_value: Any) -> Image.Image:
    """The mask with corrections painted in a ``gr.ImageEditor``: green strokes add subject, red strokes remove.

    ``editor_value`` is the editor's value: a dict with ``layers`` (RGBA, transparent where nothing is painted)
    and optionally ``background``/``composite``; images may be PIL images or arrays and any size (they are
    scaled to the mask). A value without a ``layers`` key has its strokes found as the pixels where the
    composite differs from the background. The stroke's opacity is its strength (50 % opacity or more is full strength, so the soft
    rim of a brush gives a soft edge). Strokes the colour of neither brush are ignored.
    """
    m = as_mask_array(mask).astype(np.float32) / 255.0
    if not editor_value:
        return Image.fromarray(as_mask_array(m))
    size = (m.shape[1], m.shape[0])
    layers = [x for x in (editor_value.get("layers") or []) if x is not None]
    strokes = [_rgba(layer, size) for layer in layers]
    if "layers" not in editor_value and editor_value.get("composite") is not None \
            and editor_value.get("background") is not None:
        strokes = [_difference_strokes(editor_value["background"], editor_value["composite"], size)]
    for rgba in strokes:
        strength = np.clip(rgba[..., 3] / 127.5, 0.0, 1.0)
        rgb = rgba[..., :3]
        to_add = np.sum((rgb - np.array(ADD_RGB, np.float32)) ** 2, axis=-1)
        to_remove = np.sum((rgb - np.array(REMOVE_RGB, np.float32)) ** 2, axis=-1)
        painted = (strength > 0) & (np.minimum(to_add, to_remove) < _COLOUR_TOLERANCE ** 2)
        add = painted & (to_add < to_remove)
        remove = painted & (to_remove <= to_add)
        m = np.where(add, m + (1.0 - m) * strength, m)
        m = np.where(remove, m * (1.0 - strength), m)
    return Image.fromarray(as_mask_array(m))


def _rgba(image: Any, size: tuple[int, int]) -> np.ndarray:
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        image = Image.open(image)
    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3 + [np.full_like(arr, 255)], axis=-1)
        elif arr.shape[-1] == 3:
            arr = np.concatenate([arr, np.full(arr.shape[:2] + (1,), 255, arr.dtype)], axis=-1)
        image = Image.fromarray(arr.astype(np.uint8))
    image = image.convert("RGBA")
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def _difference_strokes(background: Any, composite: Any, size: tuple[int, int]) -> np.ndarray:
    bg, comp = _rgba(background, size), _rgba(composite, size)
    changed = np.abs(comp[..., :3] - bg[..., :3]).max(axis=-1) > 24
    out = comp.copy()
    out[..., 3] = np.where(changed, 255.0, 0.0)
    return out


# ---- what the trainer sees ------------------------------------------------------------------------

def mask_at_training_size(mask: MaskLike, train_size: tuple[int, int]) -> np.ndarray:
    """The mask scaled and cropped exactly as ``trainer.dataset.prepare.prepare_image`` does, as floats 0-1."""
    img = Image.fromarray(as_mask_array(mask))
    if img.size != tuple(train_size):
        img = ImageOps.fit(img, tuple(train_size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def token_grid(mask: MaskLike, train_size: tuple[int, int], patch_px: int = TOKEN_PX) -> np.ndarray:
    """(rows, cols) floats 0-1: the mean of the mask over each ``patch_px`` block at the training size."""
    m = mask_at_training_size(mask, train_size)
    h, w = m.shape
    rows, cols = h // patch_px, w // patch_px
    m = m[: rows * patch_px, : cols * patch_px]
    return m.reshape(rows, patch_px, cols, patch_px).mean(axis=(1, 3))


def token_grid_view(mask: MaskLike, train_size: tuple[int, int], patch_px: int = TOKEN_PX,
                    display_size: tuple[int, int] | None = None, background_weight: float = 0.0) -> Image.Image:
    """The token grid as an "L" image, each token one flat block (nearest upsampling), at ``display_size``
    (default: the training size). With ``background_weight`` the blocks show the loss weight, floor included."""
    grid = token_grid(mask, train_size, patch_px)
    grid = background_weight + (1.0 - background_weight) * grid
    img = Image.fromarray(as_mask_array(grid))
    rows, cols = grid.shape
    return img.resize(display_size or (cols * patch_px, rows * patch_px), Image.Resampling.NEAREST)


def train_size_for(image_size: tuple[int, int], resolution: int) -> tuple[int, int]:
    return training_size(image_size[0], image_size[1], resolution)


def thin_share(mask: MaskLike, train_size: tuple[int, int], patch_px: int = TOKEN_PX,
               below: float = 0.5) -> float:
    """Share of the subject's area (at the training size) lying in tokens it covers less than ``below``:
    thin details the loss barely sees. 0 for an empty mask."""
    m = mask_at_training_size(mask, train_size)
    rows, cols = m.shape[0] // patch_px, m.shape[1] // patch_px
    m = m[: rows * patch_px, : cols * patch_px]
    grid = m.reshape(rows, patch_px, cols, patch_px).mean(axis=(1, 3))
    per_pixel = np.repeat(np.repeat(grid, patch_px, axis=0), patch_px, axis=1)
    total = m.sum()
    return float((m * (per_pixel < below)).sum() / total) if total > 0 else 0.0
