"""The one-image dataset: which mask the trainer uses, decided in one place.

Order of precedence: a mask the user gave > the transparency of the image itself > an automatic
cut-out (background removal). A mask that covers (nearly) the whole frame is no mask: it is dropped so the
run is plainly unmasked rather than silently normalised.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from trainer.dataset.images import alpha_mask

FULL_FRAME = 0.995  # mean coverage above which a mask masks nothing


def training_mask(image: Image.Image, given: Image.Image | None = None, auto: bool = True,
                  model: str = "u2netp", point: tuple[float, float] | None = None) -> Image.Image | None:
    """The "L" mask to train with (white = subject), or None for an unmasked run. ``point`` (x, y): a pixel on the
    subject, for the automatic mask (``trainer.dataset.masking.auto_mask``)."""
    if given is not None:
        mask = given.convert("L")
    else:
        mask = alpha_mask(image)
        if mask is None and auto:
            from trainer.dataset.masking import auto_mask

            mask = auto_mask(image, model=model, point=point)
    if mask is None or mask_coverage(mask) >= FULL_FRAME:
        return None
    return mask


def mask_coverage(mask: Image.Image) -> float:
    return float(np.asarray(mask.convert("L"), dtype=np.float32).mean() / 255.0)


def cut_out(image: Image.Image, model: str = "u2netp", point: tuple[float, float] | None = None) -> Image.Image:
    """The image as RGBA with the automatic mask as its alpha (and the mask's warning, if any, in its info)."""
    from trainer.dataset.masking import WARNING_KEY, auto_mask, mask_warning

    out = image.convert("RGB").convert("RGBA")
    mask = auto_mask(image, model=model, point=point)
    out.putalpha(mask)
    if mask_warning(mask):
        out.info[WARNING_KEY] = mask_warning(mask)
    return out
