"""Which mask the trainer uses, where it came from, and what to warn about: decided in one place.

Order of precedence: a mask the user gave > the transparency of the image itself > an automatic
cut-out (background removal). A mask that covers (nearly) the whole frame is no mask: it is dropped so the
run is plainly unmasked rather than silently normalised. The page (step 1) and the CLI (``train``, ``mask``) both
ask ``choose_mask``, so they agree on the mask, its source and its warning.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from trainer.dataset.images import alpha_mask

FULL_FRAME = 0.995  # mean coverage above which a mask masks nothing
MaskSource = Literal["uploaded mask", "transparency", "automatic", "none"]


@dataclass(frozen=True)
class MaskChoice:
    """The mask to train with ("L", white = subject; None = unmasked), where it came from, the automatic mask's
    own warning (it is unsure, or a click found nothing) — None for a mask the user gave — and which network made
    an automatic one ("u2net (automatic, refined)"; None otherwise)."""
    mask: Image.Image | None
    source: MaskSource
    warning: str | None = None
    network: str | None = None


def choose_mask(image: Image.Image, given: Image.Image | None = None, auto: bool = True, model: str | None = None,
                point: tuple[float, float] | None = None, stage=None) -> MaskChoice:
    """``given``: the user's own mask (already sized to the image); ``auto``: make one when neither it nor the image's
    transparency is there, with ``model`` (default: the default network, u2netp unless the runtime names another);
    ``point`` (x, y): a pixel on the subject, for the automatic mask; ``stage(fraction, what)``: the automatic mask's
    progress (see ``auto_mask_result``)."""
    source: MaskSource
    warning = network = None
    if given is not None:
        mask, source = given.convert("L"), "uploaded mask"
    else:
        mask, source = alpha_mask(image), "transparency"
        if mask is None and auto:
            from trainer.dataset.masking import auto_mask, mask_network, mask_warning

            mask, source = auto_mask(image, model=model, point=point, stage=stage), "automatic"
            warning, network = mask_warning(mask), mask_network(mask)
    if mask is None or mask_coverage(mask) >= FULL_FRAME:
        return MaskChoice(None, "none")
    return MaskChoice(mask, source, warning, network)


def mask_coverage(mask: Image.Image) -> float:
    return float(np.asarray(mask.convert("L"), dtype=np.float32).mean() / 255.0)


def cut_out(image: Image.Image, model: str | None = None, point: tuple[float, float] | None = None) -> Image.Image:
    """The image as RGBA with the automatic mask as its alpha (and the mask's warning, if any, and the network that
    made it in its info); ``model``: default the default network."""
    from trainer.dataset.masking import NETWORK_KEY, WARNING_KEY, auto_mask, mask_network, mask_warning

    out = image.convert("RGB").convert("RGBA")
    mask = auto_mask(image, model=model, point=point)
    out.putalpha(mask)
    out.info[NETWORK_KEY] = mask_network(mask)
    if mask_warning(mask):
        out.info[WARNING_KEY] = mask_warning(mask)
    return out
