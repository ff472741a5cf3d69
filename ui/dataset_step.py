"""Step 1 and 2 of the page: upload one image, see its size and advice, get (or give) its mask.

Uploads arrive as files and are decoded by ``trainer.images`` only (allow-listed formats, pixel cap,
decompression bombs refused) — never by Gradio's own image decoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from trainer.advice import image_advice
from trainer.dataset import training_mask
from trainer.errors import UserError
from trainer.images import alpha_mask, load_image, load_mask


@dataclass(frozen=True)
class Dataset:
    """What the user has given so far: one image and the mask training will use (None = unmasked)."""
    image: Image.Image
    mask: Image.Image | None
    mask_source: str  # "uploaded mask", "transparency", "automatic", "none"


def build_dataset(image_file: str | None, mask_file: str | None, use_mask: bool, mask_model: str) -> Dataset | None:
    """Raises UserError with a message for the page; None when nothing is uploaded."""
    if not image_file:
        return None
    image = load_image(image_file)
    if not use_mask:
        return Dataset(image, None, "none")
    given = load_mask(mask_file, size=image.size) if mask_file else None
    mask = training_mask(image, given, auto=True, model=mask_model)
    if given is not None:
        source = "uploaded mask"
    elif alpha_mask(image) is not None:
        source = "transparency"
    else:
        source = "automatic"
    return Dataset(image, mask, source if mask is not None else "none")


def overlay(dataset: Dataset) -> Image.Image:
    """The image with the background dimmed and tinted, so what will be trained stands out."""
    rgb = np.asarray(dataset.image.convert("RGB"), dtype=np.float32)
    if dataset.mask is None:
        return Image.fromarray(rgb.astype(np.uint8))
    m = np.asarray(dataset.mask.convert("L"), dtype=np.float32)[..., None] / 255.0
    background = rgb * 0.25 + np.array([40, 0, 60], dtype=np.float32) * 0.75
    return Image.fromarray((rgb * m + background * (1 - m)).clip(0, 255).astype(np.uint8))


def describe(dataset: Dataset) -> str:
    w, h = dataset.image.size
    lines = [f"**{w}×{h}** ({w * h / 1e6:.2f} megapixels)"]
    source = {
        "uploaded mask": "Mask: **your mask** (white is trained).",
        "transparency": "Mask: **the image's transparency** (opaque pixels are trained).",
        "automatic": "Mask: **automatic background removal**; the dimmed part is not trained.",
        "none": "Mask: **none**, the whole image is trained (the background will be learned too).",
    }[dataset.mask_source]
    lines.append(source)
    for advice in image_advice(dataset.image, dataset.mask):
        lines.append(f"⚠️ {advice.message}")
    return "  \n".join(lines)


def on_dataset_change(image_file, mask_file, use_mask, mask_model):
    """Gradio handler: (dataset state, overlay image, description markdown)."""
    try:
        dataset = build_dataset(image_file, mask_file, use_mask, mask_model)
    except UserError as err:
        return None, None, f"❌ {err}"
    if dataset is None:
        return None, None, "Upload one image (PNG, JPEG or WEBP). A transparent PNG's transparency is used as its mask."
    return dataset, overlay(dataset), describe(dataset)
