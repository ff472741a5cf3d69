"""The network's soft saliency maps at the working resolution, with test-time augmentation (TTA).

For the U2-Net family (u2netp, u2net) the map is the weighted mean of the network run on the image and its
mirror image at 320 px (the training size) and at 512 px (finer detail). The other models give rembg's single
prediction. Everything here needs a loaded model
(``sessions``); the clean-up and refinement that follow do not.
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np
from PIL import Image

from .resolution import _work_size
from .sessions import _free_session, _get_session, default_mask_model

# The square input size each network is run at (rembg resizes to it anyway; resizing once, straight from the
# full-resolution image, avoids a second resampling that measurably changes u2netp's answer on thin strokes).
_NET_INPUT = {"u2netp": 320, "u2net": 320, "isnet-anime": 1024, "birefnet-general": 1024}

# Test-time augmentation (TTA) for the U2-Net family: its saliency map is the weighted mean of the network run
# on the image and its mirror image at 320 px (the training size) and at 512 px (finer detail), all resized
# straight from the full-resolution image to the square input. Weights tuned on the dev split of masking_eval
# (see RESULTS.md there for the variants tried). The ONNX files fix the input at 320x320, so the larger input
# runs on an in-memory copy of the graph with free height and width (the same weights; U2-Net is fully
# convolutional and its upsampling takes its sizes from the tensors).
_TTA = {"u2netp": ((320, 0.6), (512, 0.4)), "u2net": ((320, 0.6), (512, 0.4))}
_TTA_FLIP = True
_MEAN = np.array((0.485, 0.456, 0.406), np.float32)
_STD = np.array((0.229, 0.224, 0.225), np.float32)


def _predict(sess, model: str, rgb: np.ndarray) -> np.ndarray:
    n = _NET_INPUT.get(model, 1024)
    square = Image.fromarray(rgb).resize((n, n), Image.Resampling.LANCZOS)
    return np.asarray(sess.predict(square)[0].convert("L"), dtype=np.float32) / 255.0


def _run_u2net(sess, rgb: np.ndarray, side: int, flip: bool) -> np.ndarray:
    """The raw saliency (the network's sigmoid output, not rescaled) of ``rgb`` resized to side x side, with
    rembg's input normalisation."""
    x = np.asarray(Image.fromarray(rgb).resize((side, side), Image.Resampling.LANCZOS), dtype=np.float32)
    if flip:
        x = x[:, ::-1]
    x = x / max(float(x.max()), 1e-6)
    x = ((x - _MEAN) / _STD).transpose(2, 0, 1)[None]
    out = sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)})[0][0, 0]
    return np.ascontiguousarray(out[:, ::-1] if flip else out)


# ``progress(done, total)``: called after each network pass (the page shows it; see ``auto_mask_result``).
Progress = Callable[[int, int], None]


def network_maps(rgb: np.ndarray, model: str | None = None, *, tta: bool = True,
                 progress: Progress | None = None) -> list[tuple[np.ndarray, float]]:
    """The network's soft masks of ``rgb`` (HxWx3 uint8) at the working resolution, float32 in [0, 1], each
    with its weight: one per TTA member (for models with TTA and ``tta``), else the single rembg prediction.
    ``model``: default ``default_mask_model()``."""
    model = model or default_mask_model()
    sess = _get_session(model)
    h, w = _work_size(rgb)
    members = _TTA.get(model) if tta else None
    free = _free_session(model) if members else None
    if free is None:
        out = [(cv2.resize(_predict(sess, model, rgb), (w, h), interpolation=cv2.INTER_LINEAR), 1.0)]
        if progress:
            progress(1, 1)
        return out
    flips = (False, True) if _TTA_FLIP else (False,)
    out, total = [], len(members) * len(flips)
    for side, weight in members:
        for flip in flips:
            m = np.clip(_run_u2net(free, rgb, side, flip), 0.0, 1.0)
            out.append((cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR), weight / len(flips)))
            if progress:
                progress(len(out), total)
    return out


def network_mask(rgb: np.ndarray, model: str | None = None, *, tta: bool = True,
                 progress: Progress | None = None) -> np.ndarray:
    """The network's soft mask of ``rgb`` (HxWx3 uint8), float32 in [0, 1], at the working resolution
    (longest side <= 512, aspect kept): the weighted mean of the TTA members (see ``network_maps``)."""
    return fuse(network_maps(rgb, model, tta=tta, progress=progress))


def fuse(maps: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """The weighted mean of ``network_maps``' members, float32."""
    total = sum(wt for _, wt in maps)
    return (sum(m * wt for m, wt in maps) / total).astype(np.float32)
