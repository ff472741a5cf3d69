"""Background augmentation: the subject pasted onto varied backgrounds, so it is never tied to one.

With one image the subject is always seen on the same background. The masked loss stops the background from
being *learned*, but the subject's look is still learned only in that one context. With probability
``augment_probability`` a step instead trains on the subject composited (with its soft mask) onto another
background — solid colours, gradients, colour noise, blurred blobs of the image's own colours, or the user's
own photos — and trains that step on the **whole** image: the model sees that the subject's edges and colours
belong to it and not to its surroundings, and no single background is repeated often enough to be learned.

Cost: a bank of ``BANK_SIZE`` composites is VAE-encoded **once** before the loop (well under a second on a
GPU); a step picks one of them, so training runs at full speed. The pick uses the loop's separate
``mask_generator``: the main noise stream is unchanged and runs stay deterministic.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

from trainer.config import TrainingConfig
from trainer.training.encode import EncodedExample, encode_image
from trainer.dataset.prepare import TrainingImage
from trainer.errors import UserError
from trainer.runs.folder import BACKGROUNDS_DIR

BANK_SIZE = 12  # 12 latents: varied enough that no background is seen in more than ~1 step in 50 at p=0.25
ENCODE_BATCH = 4
BUILTIN_KINDS = ("solid", "gradient", "noise", "own_colours")
# Every other bank entry is a user photo when there are any: more photos than that would never be used.
MAX_USER_BACKGROUNDS = BANK_SIZE // 2
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


# ---- backgrounds (numpy, H x W x 3 floats 0-255) --------------------------------------------------

def _colour(rng: np.random.Generator) -> np.ndarray:
    """A random colour from the whole range, from near-black to near-white, saturated or gray."""
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(0, 255), rng.uniform(20, 255)]]], dtype=np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def solid(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    return np.broadcast_to(_colour(rng), (height, width, 3)).astype(np.float32)


def gradient(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A linear gradient between two random colours at a random angle."""
    a, b = _colour(rng), _colour(rng)
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    t = x * np.cos(angle) + y * np.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return a * (1 - t[..., None]) + b * t[..., None]


def colour_noise(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour clouds (a few random colours interpolated) plus a little grain."""
    cells = int(rng.integers(2, 7))
    grid = np.stack([_colour(rng) for _ in range(cells * cells)]).reshape(cells, cells, 3)
    clouds = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    grain = rng.normal(0.0, rng.uniform(3, 15), size=(height, width, 3)).astype(np.float32)
    return np.clip(clouds + grain, 0, 255)


def own_colours(width: int, height: int, rng: np.random.Generator, image_rgb: np.ndarray) -> np.ndarray:
    """Blurred blobs in colours taken from the image itself: plausible colours, none of its layout."""
    count = int(rng.integers(4, 9))
    ys = rng.integers(0, image_rgb.shape[0], count)
    xs = rng.integers(0, image_rgb.shape[1], count)
    palette = image_rgb[ys, xs].astype(np.float32)
    small_w, small_h = 32, max(1, round(32 * height / width))
    points = rng.uniform(0, 1, size=(count, 2)) * np.array([small_w, small_h])
    gy, gx = np.mgrid[0:small_h, 0:small_w]
    nearest = np.argmin((gx[..., None] - points[:, 0]) ** 2 + (gy[..., None] - points[:, 1]) ** 2, axis=-1)
    blobs = cv2.resize(palette[nearest], (width, height), interpolation=cv2.INTER_LINEAR)
    sigma = max(width, height) / 16
    return cv2.GaussianBlur(blobs, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def photo(width: int, height: int, rng: np.random.Generator, background: Image.Image) -> np.ndarray:
    """A user-supplied background, scaled to cover, maybe mirrored, slightly blurred (a photo's background
    is usually out of focus behind a subject)."""
    img = ImageOps.fit(background.convert("RGB"), (width, height), Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.float32)
    if rng.uniform() < 0.5:
        arr = arr[:, ::-1]
    sigma = rng.uniform(0.0, 2.5)
    if sigma > 0.3:
        arr = cv2.GaussianBlur(np.ascontiguousarray(arr), (0, 0), sigmaX=sigma, sigmaY=sigma)
    return np.ascontiguousarray(arr)


def make_background(kind: str, width: int, height: int, rng: np.random.Generator, image_rgb: np.ndarray,
                    user_background: Image.Image | None = None) -> np.ndarray:
    if kind == "solid":
        return solid(width, height, rng)
    if kind == "gradient":
        return gradient(width, height, rng)
    if kind == "noise":
        return colour_noise(width, height, rng)
    if kind == "own_colours":
        return own_colours(width, height, rng, image_rgb)
    if kind == "photo" and user_background is not None:
        return photo(width, height, rng, user_background)
    raise ValueError(f"unknown background kind {kind!r}")


def bank_kinds(count: int, user_backgrounds: int) -> list[str]:
    """Which background each bank entry gets: the built-in kinds in turn, every other one a user photo if any."""
    kinds, builtin = [], 0
    for i in range(count):
        if user_backgrounds and i % 2 == 1:
            kinds.append("photo")
        else:
            kinds.append(BUILTIN_KINDS[builtin % len(BUILTIN_KINDS)])
            builtin += 1
    return kinds


def composite(image_rgb: np.ndarray, mask: np.ndarray, background: np.ndarray) -> np.ndarray:
    """``mask * image + (1 - mask) * background``; the mask (H x W, 0-1) is soft, so edges blend."""
    m = mask[..., None].astype(np.float32)
    return image_rgb.astype(np.float32) * m + background.astype(np.float32) * (1.0 - m)


def augmented_pixels(image: TrainingImage, count: int = BANK_SIZE, seed: int = 0,
                     backgrounds: Iterable[Image.Image] = ()) -> torch.Tensor:
    """(count, 3, H, W) in [-1, 1]: the training image's subject on ``count`` varied backgrounds."""
    if image.mask is None:
        raise ValueError("background augmentation needs a mask")
    rgb = ((image.pixels[0].permute(1, 2, 0).float().cpu().numpy() + 1.0) * 127.5).clip(0, 255)
    mask = image.mask[0, 0].float().cpu().numpy().clip(0, 1)
    height, width = mask.shape
    users = list(backgrounds)
    rng = np.random.default_rng(seed)
    out = []
    for i, kind in enumerate(bank_kinds(count, len(users))):
        user = users[(i // 2) % len(users)] if kind == "photo" else None
        background = make_background(kind, width, height, rng, rgb, user)
        out.append(composite(rgb, mask, background))
    stacked = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
    return (stacked / 127.5 - 1.0).clamp(-1, 1).contiguous()


# ---- the bank, and using it in the loop -------------------------------------------------------------

def load_user_backgrounds(paths: Iterable[str | Path]) -> list[Image.Image]:
    """The user's own background photos (upload or ``--background``), decoded by the safe image loader; a bad file
    or too many files is a ``UserError`` that names the problem."""
    from trainer.dataset.images import load_image

    paths = [Path(p) for p in paths]
    if len(paths) > MAX_USER_BACKGROUNDS:
        raise UserError(f"{len(paths)} backgrounds of your own were given; at most {MAX_USER_BACKGROUNDS} are used (every "
                        f"other one of the {BANK_SIZE} augmented versions). Keep the most varied ones.")
    return [load_image(p, what=f"background '{p.name}'").convert("RGB") for p in paths]


def user_backgrounds(run_path: Path | str) -> list[Image.Image]:
    """Backgrounds the user supplied for this run (``dataset/backgrounds/*`` in the run folder), if any."""
    from trainer.dataset.images import load_image

    folder = Path(run_path) / BACKGROUNDS_DIR
    if not folder.is_dir():
        return []
    return [load_image(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in _IMAGE_SUFFIXES]


def enabled(cfg: TrainingConfig, image: TrainingImage) -> bool:
    return cfg.masked and cfg.augment_probability > 0.0 and image.mask is not None


@torch.no_grad()
def with_background_bank(parts, example: EncodedExample, image: TrainingImage, cfg: TrainingConfig,
                         backgrounds: Iterable[Image.Image] | Path | str = (), index: int = 0) -> EncodedExample:
    """``example`` with its bank of augmented latents (encoded once, now, while the VAE encoder is loaded);
    unchanged when augmentation is off or there is no mask. ``backgrounds``: user photos, or a run folder
    whose ``dataset/backgrounds`` holds them (read only when augmentation is on). ``index``: the image's place in
    its set, so each image gets its own backgrounds (the first, or only, one those of the run's seed)."""
    if not enabled(cfg, image) or example.weights is None:
        return example
    if isinstance(backgrounds, (str, Path)):
        backgrounds = user_backgrounds(backgrounds)
    pixels = augmented_pixels(image, BANK_SIZE, cfg.seed + index, backgrounds)
    latents = [encode_image(parts, TrainingImage(pixels=chunk, mask=None)) for chunk in pixels.split(ENCODE_BATCH)]
    return dataclasses.replace(example, augmented=torch.cat(latents))


def augmented_step(example: EncodedExample, cfg: TrainingConfig, generator: torch.Generator) -> bool:
    """Whether this step trains on an augmented image. Draws from ``generator`` only when a bank exists."""
    if example.augmented is None or cfg.augment_probability <= 0.0:
        return False
    return torch.rand((), generator=generator).item() < cfg.augment_probability


def pick(example: EncodedExample, generator: torch.Generator) -> EncodedExample:
    """One bank entry as the step's example, trained on the whole image (no weights)."""
    index = int(torch.randint(0, example.augmented.shape[0], (), generator=generator).item())
    return dataclasses.replace(example, latents=example.augmented[index:index + 1], weights=None, augmented=None)
