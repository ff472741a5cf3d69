"""From an image (and its mask) to the training size and per-latent-pixel loss weights.

The image is resized to the training area with its aspect ratio kept (sides multiples of 16, so the
latent packs into 2x2 patches); the mask becomes per-latent-pixel loss weights by area averaging, so a
gray or edge pixel weighs in proportion.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

SIDE_MULTIPLE = 16  # VAE downsamples 8x, then 2x2 packing


def training_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """Width and height with about ``resolution**2`` pixels, the image's aspect, sides multiples of 16."""
    scale = math.sqrt(resolution * resolution / (width * height))
    w = max(SIDE_MULTIPLE, int(width * scale) // SIDE_MULTIPLE * SIDE_MULTIPLE)
    h = max(SIDE_MULTIPLE, int(height * scale) // SIDE_MULTIPLE * SIDE_MULTIPLE)
    return w, h


@dataclass(frozen=True)
class TrainingImage:
    pixels: torch.Tensor  # (1, 3, H, W) in [-1, 1]
    mask: torch.Tensor | None  # (1, 1, H, W) in [0, 1]; 1 = subject

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[-1], self.pixels.shape[-2]


def prepare_image(image: Image.Image, mask: Image.Image | None, resolution: int) -> TrainingImage:
    size = training_size(image.width, image.height, resolution)
    # Scale to cover the size, centre-crop the few pixels that rounding to 16 leaves over.
    rgb = ImageOps.fit(image.convert("RGB"), size, Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    mask_tensor = None
    if mask is not None:
        m = ImageOps.fit(mask.convert("L").resize(image.size, Image.Resampling.BILINEAR), size, Image.Resampling.BILINEAR)
        mask_tensor = torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)[None, None]
    return TrainingImage(pixels=pixels.contiguous(), mask=mask_tensor)


def latent_weights(mask: torch.Tensor, latent_height: int, latent_width: int,
                   background_weight: float = 0.0) -> torch.Tensor:
    """Per-latent-pixel loss weights: the mask area-averaged to latent size, floored at ``background_weight``."""
    coverage = F.interpolate(mask.float(), size=(latent_height, latent_width), mode="area")
    return background_weight + (1.0 - background_weight) * coverage.clamp(0.0, 1.0)
