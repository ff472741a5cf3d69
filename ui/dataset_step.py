"""Step 1 and 2 of the page: upload one image, see its size and advice, get (or give) its mask.

Uploads arrive as files and are decoded by ``trainer.dataset.images`` only (allow-listed formats, pixel cap,
decompression bombs refused) — never by Gradio's own image decoder.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import gradio as gr
import numpy as np
from PIL import Image, ImageOps

from trainer import api
from trainer.errors import UserError


@dataclass(frozen=True)
class Dataset:
    """What the user has given so far: one image and the mask training will use (None = unmasked)."""
    image: Image.Image
    mask: Image.Image | None
    mask_source: str  # "uploaded mask", "transparency", "automatic", "none"
    raw_mask: Image.Image | None = None  # the mask before the user's adjustments (None: ``mask`` is unadjusted)
    mask_warning: str | None = None  # the automatic mask's own warning (it is unsure), shown with the mask
    mask_network: str | None = None  # which network made an automatic mask: "u2net (automatic, refined)"


def build_dataset(image_file: str | None, mask_file: str | None, use_mask: bool, mask_model: str,
                  stage=None) -> Dataset | None:
    """Raises UserError with a message for the page; None when nothing is uploaded. ``stage(fraction, what)``: the
    automatic mask's progress (the page's progress bar)."""
    if not image_file:
        return None
    image = api.load_image(image_file)
    if not use_mask:
        return Dataset(image, None, "none")
    given = api.load_mask(mask_file, size=image.size) if mask_file else None
    choice = api.choose_mask(image, given, auto=True, model=mask_model, stage=stage)
    return Dataset(image, choice.mask, choice.source, mask_warning=choice.warning, mask_network=choice.network)


def on_subject_point(dataset: Dataset | None, mask_model: str, x: float, y: float, *, display_pixels: bool = True):
    """Gradio handler: the user pointed at the subject at (x, y) — a click on the preview (display pixels), or image
    pixels from the API. The automatic mask is made again, looking for the subject there when it had missed it.
    (dataset state, overlay image, description markdown); ``UserError`` when there is no automatic mask to redo."""
    if dataset is None:
        raise UserError("Upload an image first (step 1).")
    if dataset.mask_source != "automatic":
        given = {"uploaded mask": "your own mask", "transparency": "the image's transparency as its mask",
                 "none": "no mask"}[dataset.mask_source]
        raise UserError(f"Clicking the subject redoes the automatic mask, but this image uses {given}. Paint "
                        "corrections in step 2 instead.")
    scale = dataset.image.width / _display_size(dataset.image.size)[0] if display_pixels else 1.0
    result = api.auto_mask_result(dataset.image, mask_model, point=(float(x) * scale, float(y) * scale))
    updated = Dataset(dataset.image, result.mask, "automatic", mask_warning=result.warning,
                      mask_network=result.network)
    return updated, overlay(updated), describe(updated)


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
    if dataset.mask_source == "automatic" and dataset.mask_network:
        # which network made it (u2netp by default, u2net when chosen), so a user comparing them knows which they see
        source = (f"Mask: **automatic background removal** by **{dataset.mask_network}**; the dimmed part is not "
                  "trained.")
    lines.append(source)
    if dataset.mask_source == "automatic":
        lines.append("Wrong subject, or none? **Click the subject** in this picture to look for it there.")
    if dataset.mask_warning:
        lines.append(f"⚠️ {dataset.mask_warning}")
    for advice in api.image_advice(dataset.image, dataset.mask):
        lines.append(f"⚠️ {advice.message}")
    return "  \n".join(lines)


def on_dataset_change(image_file, mask_file, use_mask, mask_model, progress=gr.Progress()):
    """Gradio handler: (dataset state, overlay image, description markdown). ``progress`` (Gradio fills it in) shows
    the automatic mask's stages rather than a bare spinner, whose ETA was far below a loaded CPU's real time."""
    return made_dataset(image_file, mask_file, use_mask, mask_model, progress)[:3]


def made_dataset(image_file, mask_file, use_mask, mask_model, progress=gr.Progress()):
    """(dataset, overlay, description, refusal): ``refusal`` is the image gate's reason when it refused the upload (or
    the own mask), "" otherwise; the page keeps it so Train can say why there is nothing to train."""
    try:
        dataset = build_dataset(image_file, mask_file, use_mask, mask_model,
                                stage=lambda fraction, what: progress(fraction, desc=what))
    except UserError as err:
        return None, None, f"❌ {err}", str(err)
    if dataset is None:
        return (None, None, "Upload one image (PNG, JPEG or WEBP). A transparent PNG's transparency is used as its mask.",
                "")
    return dataset, overlay(dataset), describe(dataset), ""


# ---- step 2: the user's control over the mask ------------------------------------------------------------

DISPLAY_SIDE = 1024  # images sent to the page are at most this long (the mask itself stays full resolution)
GRID_LINE = (255, 255, 255)

MASK_HELP = """Adjust the mask, paint corrections, and see it **as the trainer sees it**. Flux does not see pixels: at
the training size (512 px) each **token covers 16×16 pixels**, and a token's loss weight is the share of it the
mask covers. A strap or a strand of hair 4 px wide covers a quarter of the tokens it crosses, so it weighs a quarter
and is learned weakly — **grow** the mask by a few pixels to keep thin details. Distances are in pixels of the
training size. In the editor, paint **green to add** to the subject and **red to remove** (the eraser undoes strokes).
"""

LOSS_HELP = """**Background weight**: 0 = the background is never trained (the default: with one image, anything trained is
repeated in every output). Small values such as 0.1 keep some context, as ai-toolkit's floor of 0.1 does, at the cost
of learning the background a little. **Normalise by mask area** keeps the step size the same for a small or a large
subject. **Unmasked probability**: the share of steps trained on the whole image (OneTrainer's option). **Background
augmentation**: the share of steps trained on the subject pasted onto other backgrounds (colours, gradients, noise,
its own colours blurred, and your own photos if you add some), so the subject is never tied to one background;
the variations are encoded once before training, so it costs no speed."""


def base_mask(dataset: Dataset) -> Image.Image | None:
    return dataset.raw_mask if dataset.raw_mask is not None else dataset.mask


def preset_resolution(preset: str | None) -> int:
    try:
        return api.load_preset(preset).config().resolution if preset else 512
    except UserError:
        return 512


def refine(dataset: Dataset, threshold: float | None, softness_px: float, grow_px: float, editor_value,
           resolution: int) -> Dataset:
    """The dataset with its mask corrected by the painted strokes, then thresholded, grown/shrunk and feathered.
    ``softness_px`` and ``grow_px`` are pixels at the training size (scaled here to the mask's own size)."""
    base = base_mask(dataset)
    if base is None:
        return dataset
    train_w, _ = api.train_size_for(dataset.image.size, resolution)
    scale = dataset.image.width / train_w
    mask = api.apply_strokes(base, editor_value)
    mask = api.adjust_mask(mask, threshold if threshold else None, float(softness_px or 0) * scale,
                       float(grow_px or 0) * scale)
    return replace(dataset, mask=mask, raw_mask=base)


def _display_size(size: tuple[int, int], side: int = DISPLAY_SIDE) -> tuple[int, int]:
    """The size an image of ``size`` is shown at in the page (longest side at most ``side``)."""
    scale = side / max(size)
    if scale >= 1:
        return size
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _display(image: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    size = _display_size(image.size, side)
    return image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)


def editor_value(dataset: Dataset | None):
    """The editor's start: the image with its (unadjusted) mask shown, no strokes."""
    if dataset is None:
        return None
    shown = overlay(replace(dataset, mask=base_mask(dataset)))
    return {"background": _display(shown).convert("RGBA"), "layers": [], "composite": None}


def token_overlay(dataset: Dataset, resolution: int, background_weight: float = 0.0) -> Image.Image:
    """The image at the training size, each 16x16 token dimmed by its loss weight, with the token grid drawn."""
    size = api.train_size_for(dataset.image.size, resolution)
    rgb = np.asarray(ImageOps.fit(dataset.image.convert("RGB"), size, Image.Resampling.LANCZOS), dtype=np.float32)
    if dataset.mask is None:
        weights = np.ones(rgb.shape[:2], np.float32)
    else:
        weights = np.asarray(api.token_grid_view(dataset.mask, size, background_weight=background_weight),
                             dtype=np.float32) / 255.0
    dim = rgb * 0.25 + np.array([40, 0, 60], dtype=np.float32) * 0.75
    out = rgb * weights[..., None] + dim * (1 - weights[..., None])
    out[::api.TOKEN_PX, :] = out[::api.TOKEN_PX, :] * 0.6 + np.array(GRID_LINE) * 0.4
    out[:, ::api.TOKEN_PX] = out[:, ::api.TOKEN_PX] * 0.6 + np.array(GRID_LINE) * 0.4
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def mask_summary(dataset: Dataset, resolution: int, background_weight: float) -> str:
    if dataset.mask is None:
        return "No mask: the whole image is trained, background included."
    w, h = api.train_size_for(dataset.image.size, resolution)
    lines = [f"The subject covers **{100 * api.mask_coverage(dataset.mask):.0f} %** of the frame. Training size "
             f"{w}×{h} px = {w // api.TOKEN_PX}×{h // api.TOKEN_PX} tokens of {api.TOKEN_PX}×{api.TOKEN_PX} px."]
    # The automatic mask's own warning (unsure, or a click that found nothing) is not repeated here: ``describe``
    # shows it under the step-1 picture, where the click that fixes it is made, and the page showed it twice.
    thin = api.thin_share(dataset.mask, (w, h))
    if thin > 0.25:
        lines.append(f"⚠️ {100 * thin:.0f} % of the subject lies in tokens it covers less than half: thin parts (hair, "
                     "straps, fingers, antennae) weigh little in the loss and are learned weakly. Grow the mask by "
                     "4–8 px to keep them.")
    if background_weight > 0:
        lines.append(f"Background weight {background_weight:g}: the background is trained at {background_weight:g}× "
                     "the subject's weight, so it is learned a little (context, at a cost).")
    return "  \n".join(lines)


def on_mask_adjust(dataset, threshold, softness, grow, editor, preset, background_weight):
    """Gradio handler for the mask controls and the editor:
    (dataset state, step-1 preview, full-resolution mask, token-grid view, summary)."""
    if dataset is None:
        return None, None, None, None, ""
    resolution = preset_resolution(preset)
    dataset = refine(dataset, threshold, softness, grow, editor, resolution)
    bg = float(background_weight or 0.0)
    shown = _display(overlay(dataset))
    return dataset, shown, shown, token_overlay(dataset, resolution, bg), mask_summary(dataset, resolution, bg)


def on_new_mask(dataset, threshold, softness, grow, preset, background_weight):
    """After a new image or base mask: clear the editor's strokes and apply the current controls.
    (dataset state, step-1 preview, editor, full-resolution mask, token-grid view, summary)."""
    dataset, preview, full, tokens, summary = on_mask_adjust(dataset, threshold, softness, grow, None, preset,
                                                             background_weight)
    return dataset, preview, editor_value(dataset), full, tokens, summary


def mask_defaults(preset: str):
    """The preset's loss settings for the mask controls:
    (background weight, normalise by mask area, unmasked probability, background augmentation)."""
    cfg = api.load_preset(preset).config()
    return cfg.background_weight, cfg.normalize_mask, cfg.unmasked_probability, cfg.augment_probability


def loss_settings(background_weight, normalize_mask, unmasked_probability, augment_probability) -> dict:
    """The mask controls as TrainingConfig fields (the page → config direction only). A None (an API call that
    left the setting out) is not set, so the preset's value stands."""
    given = {"background_weight": (background_weight, float), "normalize_mask": (normalize_mask, bool),
             "unmasked_probability": (unmasked_probability, float),
             "augment_probability": (augment_probability, float)}
    return {name: kind(value) for name, (value, kind) in given.items() if value is not None}
