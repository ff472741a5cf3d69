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
under 0.85, or when the search was widened, the mask carries the warning "The automatic mask is unsure: check
it and paint corrections ..." (in ``mask.info``, read with ``mask_warning``), which the page and the CLI show.

About 1.2 s for the network's four passes plus 0.35 s of refinement for a 1024x1024 image on 2 CPU cores. The
last two automatic results are remembered by image content, so a click on the subject right after the upload
does not pay for them again.
Measured against plain rembg in ``masking_eval/`` (see RESULTS.md there).

Models: ``u2netp`` always works offline (``python scripts/fetch_offline_mask_model.py`` installs it); the others
download on first use from rembg's GitHub releases, which needs network access.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from trainer.errors import UserError

MASK_MODELS: tuple[str, ...] = ("u2netp", "birefnet-general", "isnet-anime", "u2net")
DEFAULT_MODEL = "u2netp"

# Working resolution (longest side) of the network's input/output and of GrabCut.
_GC_SIDE = 512

_SESSIONS: dict[str, Any] = {}
_LOCK = threading.Lock()

_PROBE_URL = "https://github.com/danielgatis/rembg/releases"
_PROBE_TIMEOUT_S = 4.0


# ----------------------------------------------------------------------------------------------------------
# Sessions


def _session_class(model: str):
    from rembg.sessions import sessions  # imported lazily: rembg's import takes ~2 s

    return sessions[model]


def model_file(model: str) -> Path | None:
    """Path of the local model file rembg would use for ``model``, or None when it is not present."""
    cls = _session_class(model)
    found = cls.resolve_existing(f"{cls.name()}.onnx")
    return Path(found) if found else None


def _network_reachable() -> bool:
    import requests

    try:
        requests.head(_PROBE_URL, timeout=_PROBE_TIMEOUT_S, allow_redirects=False)
    except Exception:
        return False
    return True


def _download_error(model: str, detail: str = "") -> UserError:
    if detail:
        why = f"the download failed ({detail})"
    else:
        why = "no network was reachable to download it"
    return UserError(
        f"The background-removal model '{model}' is not on this machine: it downloads on first use, and "
        f"{why}. Connect this machine to the internet and try again, or choose 'u2netp', which works offline."
    )


def _get_session(model: str):
    if model not in MASK_MODELS:
        raise UserError(
            f"Unknown background-removal model '{model}'. Choose one of: {', '.join(MASK_MODELS)} "
            f"('u2netp' works offline)."
        )
    with _LOCK:
        sess = _SESSIONS.get(model)
        if sess is not None:
            return sess
        present = model_file(model) is not None
        if not present:
            if model == DEFAULT_MODEL:
                raise UserError(
                    "The offline background-removal model 'u2netp' is missing. Install it with "
                    "`python scripts/fetch_offline_mask_model.py` and try again."
                )
            if not _network_reachable():  # fail fast rather than let the download hang
                raise _download_error(model)
        from rembg import new_session

        try:
            sess = new_session(model)
        except Exception as err:  # requests/pooch errors, a bad checksum, a truncated file ...
            if present:
                raise UserError(
                    f"The background-removal model '{model}' could not be loaded from "
                    f"{model_file(model)} ({type(err).__name__}: {err}). Delete that file and try again "
                    f"('u2netp' works offline)."
                ) from err
            raise _download_error(model, f"{type(err).__name__}: {err}") from err
        _SESSIONS[model] = sess
        return sess


# ----------------------------------------------------------------------------------------------------------
# Network prediction


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    # Alpha is ignored: the colour channels are used as they are.
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def _resize_max(arr: np.ndarray, side: int, interp=cv2.INTER_AREA) -> np.ndarray:
    h, w = arr.shape[:2]
    s = side / max(h, w)
    if s >= 1.0:
        return arr
    return cv2.resize(arr, (max(1, round(w * s)), max(1, round(h * s))), interpolation=interp)


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
_FREE_SESSIONS: dict[str, Any] = {}


def _predict(sess, model: str, rgb: np.ndarray) -> np.ndarray:
    n = _NET_INPUT.get(model, 1024)
    square = Image.fromarray(rgb).resize((n, n), Image.Resampling.LANCZOS)
    return np.asarray(sess.predict(square)[0].convert("L"), dtype=np.float32) / 255.0


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _submessages(buf: bytes, start: int, end: int, field: int) -> list[tuple[int, int]]:
    """(start, end) of each length-delimited ``field`` of the protobuf message in ``buf[start:end]``."""
    out, i = [], start
    while i < end:
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(buf, i)
            if num == field:
                out.append((i, i + n))
            i += n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return out


def free_image_size(onnx_model: bytes) -> bytes:
    """The ONNX model with the height and width of its 4-D inputs and outputs made free (symbolic).

    Each fixed size is a protobuf ``Dimension {dim_value: N}`` (key 0x08 + varint); it is rewritten in place as
    ``Dimension {dim_param: "hh.."}`` of exactly the same byte length, so no enclosing length changes. Only
    the graph's declared input/output shapes change: the weights and operators are untouched."""
    buf = bytearray(onnx_model)
    changed = 0
    for gs, ge in _submessages(buf, 0, len(buf), 7):  # ModelProto.graph
        for field in (11, 12):  # GraphProto.input, GraphProto.output
            for vs, ve in _submessages(buf, gs, ge, field):
                for ts, te in _submessages(buf, vs, ve, 2):  # ValueInfoProto.type
                    for tts, tte in _submessages(buf, ts, te, 1):  # TypeProto.tensor_type
                        for ss, se in _submessages(buf, tts, tte, 2):  # TypeProto.Tensor.shape
                            dims = _submessages(buf, ss, se, 1)  # TensorShapeProto.dim
                            if len(dims) != 4:
                                continue
                            for name, (ds, de) in zip("hw", dims[2:]):
                                if buf[ds] == 0x08 and de - ds >= 3:
                                    buf[ds:de] = bytes([0x12, de - ds - 2]) + name.encode() * (de - ds - 2)
                                    changed += 1
    if not changed:
        raise ValueError("no fixed image size found in the model's inputs")
    return bytes(buf)


def _free_session(model: str):
    """An onnxruntime session of ``model`` that takes any input size (None when that cannot be made)."""
    providers = _get_session(model).inner_session.get_providers()  # (takes _LOCK itself)
    with _LOCK:
        if model in _FREE_SESSIONS:
            return _FREE_SESSIONS[model]
        sess = None
        path = model_file(model)
        if path is not None:
            import onnxruntime as ort

            try:
                sess = ort.InferenceSession(free_image_size(path.read_bytes()), providers=providers)
            except Exception:  # an unexpected file layout: fall back to the fixed-size network only
                sess = None
        _FREE_SESSIONS[model] = sess
        return sess


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


def network_maps(rgb: np.ndarray, model: str = DEFAULT_MODEL, *, tta: bool = True) -> list[tuple[np.ndarray, float]]:
    """The network's soft masks of ``rgb`` (HxWx3 uint8) at the working resolution, float32 in [0, 1], each
    with its weight: one per TTA member (for models with TTA and ``tta``), else the single rembg prediction."""
    sess = _get_session(model)
    h, w = _work_size(rgb)
    members = _TTA.get(model) if tta else None
    free = _free_session(model) if members else None
    if free is None:
        return [(cv2.resize(_predict(sess, model, rgb), (w, h), interpolation=cv2.INTER_LINEAR), 1.0)]
    out = []
    for side, weight in members:
        flips = (False, True) if _TTA_FLIP else (False,)
        for flip in flips:
            m = np.clip(_run_u2net(free, rgb, side, flip), 0.0, 1.0)
            out.append((cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR), weight / len(flips)))
    return out


def network_mask(rgb: np.ndarray, model: str = DEFAULT_MODEL, *, tta: bool = True) -> np.ndarray:
    """The network's soft mask of ``rgb`` (HxWx3 uint8), float32 in [0, 1], at the working resolution
    (longest side <= 512, aspect kept): the weighted mean of the TTA members (see ``network_maps``)."""
    maps = network_maps(rgb, model, tta=tta)
    total = sum(wt for _, wt in maps)
    return (sum(m * wt for m, wt in maps) / total).astype(np.float32)


def _work_size(rgb: np.ndarray) -> tuple[int, int]:
    H, W = rgb.shape[:2]
    s = min(1.0, _GC_SIDE / max(H, W))
    return (max(1, round(H * s)), max(1, round(W * s))) if s < 1.0 else (H, W)


# ----------------------------------------------------------------------------------------------------------
# Cleanup (pure numpy/OpenCV, no network)


def _disk(r: int) -> np.ndarray:
    r = max(1, int(r))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def keep_main_components(binary: np.ndarray, *, secondary_frac: float = 0.25, near_frac: float = 0.08,
                         min_near_frac: float = 0.002) -> np.ndarray:
    """Keep the largest connected component; keep another one if it is large (>= ``secondary_frac`` of the
    largest) or close to the kept ones (within ``near_frac`` of the image diagonal) and not tiny."""
    binary = binary.astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if n <= 2:
        return binary.astype(bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = np.argsort(-areas) + 1
    largest = areas.max()
    keep = np.zeros(n, dtype=bool)
    keep[order[0]] = True
    for lab in order[1:]:
        if stats[lab, cv2.CC_STAT_AREA] >= secondary_frac * largest:
            keep[lab] = True
    h, w = binary.shape
    diag = float(np.hypot(h, w))
    kept = keep[labels]
    dist = cv2.distanceTransform((~kept).astype(np.uint8), cv2.DIST_L2, 3)
    for lab in order[1:]:
        if keep[lab] or stats[lab, cv2.CC_STAT_AREA] < min_near_frac * largest:
            continue
        if dist[labels == lab].min() <= near_frac * diag:
            keep[lab] = True
    return keep[labels]


def enclosed_holes(binary: np.ndarray, *, max_frac: float = 0.05) -> np.ndarray:
    """Background regions fully enclosed by the mask whose area is at most ``max_frac`` of the mask area."""
    binary = binary.astype(bool)
    inv = (~binary).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(inv, connectivity=4)
    if n <= 1:
        return np.zeros_like(binary)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    limit = max_frac * max(int(binary.sum()), 1)
    hole = np.zeros(n, dtype=bool)
    for lab in range(1, n):
        if lab not in border and stats[lab, cv2.CC_STAT_AREA] <= limit:
            hole[lab] = True
    return hole[labels]


def cleanup_mask(prob: np.ndarray, *, threshold: float = 0.5, secondary_frac: float = 0.25,
                 near_frac: float = 0.08, hole_min_p: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Component and hole cleanup of a soft network mask (float in [0, 1]).

    Returns ``(cleaned, holes)``: ``cleaned`` is the soft mask with dropped islands zeroed and enclosed small
    holes filled (set to 1); ``holes`` marks the filled pixels (bool). A hole whose mean network probability is
    under ``hole_min_p`` (the network is sure it is background: a real hole) stays open.
    """
    prob = np.clip(prob.astype(np.float32), 0.0, 1.0)
    binary = prob > threshold
    if not binary.any():
        return prob.copy(), np.zeros(prob.shape, dtype=bool)
    kept = keep_main_components(binary, secondary_frac=secondary_frac, near_frac=near_frac)
    # Zero the dropped islands together with their soft surroundings (the low-confidence halo of an island).
    dropped = binary & ~kept
    cleaned = prob.copy()
    if dropped.any():
        r = max(2, round(0.01 * max(prob.shape)))
        halo = cv2.dilate(dropped.astype(np.uint8), _disk(r)).astype(bool)
        keep_zone = cv2.dilate(kept.astype(np.uint8), _disk(r)).astype(bool)
        cleaned[halo & ~keep_zone] = 0.0
    holes = enclosed_holes(kept)
    if hole_min_p > 0 and holes.any():
        n, labels = cv2.connectedComponents(holes.astype(np.uint8), connectivity=4)
        mean_p = np.bincount(labels.ravel(), prob.ravel(), n) / np.maximum(np.bincount(labels.ravel(), minlength=n), 1)
        holes &= (mean_p >= hole_min_p)[labels]
    cleaned[holes] = 1.0
    return cleaned, holes


# ----------------------------------------------------------------------------------------------------------
# Edge refinement


def _box(x: np.ndarray, r: int) -> np.ndarray:
    return cv2.boxFilter(x, -1, (2 * r + 1, 2 * r + 1), normalize=True, borderType=cv2.BORDER_REFLECT)


def guided_filter_coeffs(guide: np.ndarray, src: np.ndarray, radius: int, eps: float):
    """Colour guided filter (He et al.) coefficients: ``q = (a * I).sum(-1) + b``. ``guide`` HxWx3 float32 in
    [0, 1], ``src`` HxW float32. The coefficients are smooth, so they can be computed at a reduced resolution
    and upsampled ("fast guided filter")."""
    I = guide.astype(np.float32)
    p = src.astype(np.float32)
    mean_I = _box(I, radius)
    mean_p = _box(p, radius)
    cov_Ip = _box(I * p[..., None], radius) - mean_I * mean_p[..., None]
    var = np.empty(I.shape[:2] + (3, 3), np.float32)
    for i in range(3):
        for j in range(i, 3):
            v = _box(I[..., i] * I[..., j], radius) - mean_I[..., i] * mean_I[..., j]
            var[..., i, j] = v
            var[..., j, i] = v
    var += eps * np.eye(3, dtype=np.float32)
    a = np.linalg.solve(var, cov_Ip[..., None])[..., 0]
    b = mean_p - (a * mean_I).sum(-1)
    return _box(a, radius), _box(b, radius)


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    a, b = guided_filter_coeffs(guide, src, radius, eps)
    return (a * guide.astype(np.float32)).sum(-1) + b


# Tuned on the dev split of masking_eval (seeds 101, 102), never on the reported test split.
_P = dict(
    secondary_frac=0.25,  # a detached part at least this fraction of the main one's area is kept ...
    near_frac=0.04,  # ... and so is a smaller one within this distance (x image diagonal)
    hole_min_p=0.3,  # an enclosed hole is filled unless its mean network probability is under this
    gap=0.015,  # gap between the subject and the pixels that teach the background model (x longest side)
    sigma=0.06,  # reach of the local background colour model (x longest side)
    floor=6.0,  # noise floor (RGB units) of the background-distance normalisation
    smooth=18.0,  # local background std (RGB units) under which the background counts as "plain"
    wmin=0.05,  # minimum weight of background evidence for the local model to count
    t_lo=2.0,  # below: pixel looks like the local background
    t_hi=6.0,  # above: pixel is clearly not the local background (colour no shading explains)
    k_min=0.35,  # a background pixel may be down to this fraction of the local background's brightness
    r_in=0.015,  # sure-subject seeds lie this deep inside the confident mask (at most half its thickness)
    r_out=0.04,  # beyond this distance from the mask, background-consistent pixels are sure background
    r_add=0.06,  # clearly-not-background pixels this close to the mask may join the subject
    iters=3,  # GrabCut iterations
    r_sliver=0.004,  # GrabCut removals thinner than ~2x this (x longest side) are ignored
    hole_resid=4.0,  # a background hole's mean unexplained colour (RGB units) is below this ...
    hole_lighter=0.05,  # ... it is at most this much lighter (fraction) ...
    hole_darker=0.6,  # ... and at most this much darker (shadow)
    add_p=0.25,  # network probability from which GrabCut may add a pixel that looks like background
    grow_max=0.5,  # GrabCut may add at most this fraction of the network's area ...
    shrink_max=0.4,  # ... and remove at most this fraction where the background model does not support it
    gf_r=0.004,  # guided filter radius (x longest side of the guide)
    gf_eps=1e-3,  # guided filter regularisation (guide in [0, 1])
)


def _background_model(lab: np.ndarray, bgmask: np.ndarray, sigma: float):
    """Local background colour (normalized convolution of the pixels in ``bgmask``), its variance and the
    weight of the evidence behind it. Two reaches: ``sigma``, and 4 x ``sigma`` where the near evidence is
    too thin (deep inside a large subject). Computed at half resolution: it is smooth by construction."""
    h, w = bgmask.shape
    hs, ws = max(1, h // 2), max(1, w // 2)
    lab_s = cv2.resize(lab, (ws, hs), interpolation=cv2.INTER_AREA)
    m_s = cv2.resize(bgmask.astype(np.float32), (ws, hs), interpolation=cv2.INTER_AREA)
    x1 = lab_s * m_s[..., None]
    x2 = lab_s * x1
    out = []
    for sg in (max(1.0, sigma / 2), max(1.0, 2 * sigma)):
        W = cv2.GaussianBlur(m_s, (0, 0), sg)
        Wd = np.maximum(W, 1e-6)[..., None]
        mean = cv2.GaussianBlur(x1, (0, 0), sg) / Wd
        var = np.maximum(cv2.GaussianBlur(x2, (0, 0), sg) / Wd - mean * mean, 0.0)
        out.append((mean, var, W))
    (m1, v1, W1), (m2, v2, W2) = out
    near = (W1 > _P["wmin"])[..., None]
    mean = np.where(near, m1, m2)
    var = np.where(near, v1, v2)
    W = np.where(near[..., 0], W1, W2)
    up = lambda x: cv2.resize(x, (w, h), interpolation=cv2.INTER_LINEAR)  # noqa: E731
    return up(mean), up(var), up(W)


def _background_holes(resid: np.ndarray, k: np.ndarray, candidates: np.ndarray, P=_P) -> np.ndarray:
    """Regions of ``candidates`` (pixels inside the network's mask that look like the local background) whose
    *mean* colour matches the local background up to a darkening (the subject's shadow): mean residual colour
    ``resid`` (pixel minus ``k`` x background) near zero, mean ``k`` in range. A low-contrast part of the
    subject differs from the background consistently and is kept; a hole showing the background (between
    spokes, branches, limbs) differs only by noise."""
    n, labels = cv2.connectedComponents(candidates.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros(candidates.shape, bool)
    lab_ = labels.ravel()
    cnt = np.bincount(lab_, minlength=n).astype(np.float64)
    cnt[cnt == 0] = 1
    mr = np.stack([np.bincount(lab_, resid[..., c].ravel(), n) / cnt for c in range(3)], -1)
    mk = np.bincount(lab_, k.ravel(), n) / cnt
    ok = (np.linalg.norm(mr, axis=-1) < P["hole_resid"]) & (mk < 1 + P["hole_lighter"]) & (mk > 1 - P["hole_darker"])
    ok[0] = False
    return ok[labels] & candidates


def _grabcut_labels(rgb_small: np.ndarray, cleaned: np.ndarray, holes: np.ndarray, P=_P):
    """GrabCut label map seeded by the cleaned network mask and a local background colour model.

    Each pixel is compared with the local background colour ``b`` under a shadow model: ``p = k b + r``
    (``k`` a brightness factor, ``r`` the colour that no shading explains).

    Returns ``(labels, fg0, bg_holes, addable)``: ``fg0`` the network's subject, ``bg_holes`` the parts of it
    the background model says are background (fixed as background), ``addable`` where GrabCut may grow."""
    h, w = cleaned.shape
    side = max(h, w)
    fg0 = cleaned > 0.5
    img = rgb_small.astype(np.float32)
    dist_out = cv2.distanceTransform((~fg0).astype(np.uint8), cv2.DIST_L2, 3)
    bgm = (cleaned < 0.1) & (dist_out > P["gap"] * side)
    mean, var, W = _background_model(img, bgm, P["sigma"] * side)
    bb = (mean * mean).sum(-1)
    k = (img * mean).sum(-1) / (bb + 1.0)
    resid = img - k[..., None] * mean
    noise = np.sqrt(var.sum(-1) + P["floor"] ** 2)
    rn = np.linalg.norm(resid, axis=-1) / noise
    lighter = (k - 1.0) * np.sqrt(bb) / noise
    known = W > P["wmin"]
    smooth = known & (np.sqrt(var.sum(-1)) < P["smooth"])
    bg_like = smooth & (rn < P["t_lo"]) & (lighter < P["t_lo"]) & (k > P["k_min"])
    odd = known & (rn > P["t_hi"])
    bg_holes = _background_holes(resid, k, fg0 & bg_like, P)

    gc = np.full((h, w), cv2.GC_PR_BGD, np.uint8)
    gc[(cleaned < 0.1) & (dist_out > P["r_out"] * side) & ~odd] = cv2.GC_BGD
    gc[~fg0 & odd & (dist_out <= P["r_add"] * side)] = cv2.GC_PR_FGD
    gc[fg0] = cv2.GC_PR_FGD
    # Sure subject: the confident mask away from its outline (for thin subjects: their middle line).
    conf = ((cleaned > 0.8) & ~holes).astype(np.uint8)
    depth = cv2.distanceTransform(conf, cv2.DIST_L2, 3)
    sure = depth >= max(1.0, min(P["r_in"] * side, 0.5 * float(depth.max())))
    gc[sure & ~bg_like] = cv2.GC_FGD
    gc[bg_holes] = cv2.GC_BGD
    return gc, fg0, bg_holes, odd | (cleaned > P["add_p"])


def _grabcut(rgb_small: np.ndarray, cleaned: np.ndarray, holes: np.ndarray, P=_P) -> np.ndarray:
    """Refined hard mask at rgb_small's size (falls back to the network's mask when GrabCut misbehaves)."""
    gc, fg0, bg_holes, addable = _grabcut_labels(rgb_small, cleaned, holes, P)
    h, w = fg0.shape
    base = fg0 & ~bg_holes
    if not (gc == cv2.GC_FGD).any() or not ((gc == cv2.GC_BGD) | (gc == cv2.GC_PR_BGD)).any():
        return base
    bgd = np.zeros((1, 65), np.float64)
    fgd = np.zeros((1, 65), np.float64)
    try:
        cv2.setRNGSeed(0)  # GrabCut's GMM initialisation (k-means) draws from this thread's RNG
        cv2.grabCut(np.ascontiguousarray(rgb_small[..., ::-1]), gc, None, bgd, fgd, P["iters"],
                    cv2.GC_INIT_WITH_MASK)
    except cv2.error:
        return base
    cut = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
    # Growth only where the image says "not background" (or the network half agrees).
    added = cut & ~fg0 & addable
    # Removals: the background model's holes, and what GrabCut removes in bulk; slivers it shaves off the
    # network's outline (GrabCut's smoothness thins limbs at this resolution) are not taken.
    removed = fg0 & ~cut
    r = round(P["r_sliver"] * max(h, w))
    if r > 0:
        removed = cv2.morphologyEx(removed.astype(np.uint8), cv2.MORPH_OPEN, _disk(r)).astype(bool)
    cut = (fg0 & ~(removed | bg_holes)) | added
    # Only parts attached to the network's subject survive (no new far-away objects).
    n, labels = cv2.connectedComponents(cut.astype(np.uint8), connectivity=8)
    if n > 1:
        touch = np.zeros(n, bool)
        touch[np.unique(labels[cut & fg0])] = True
        touch[0] = False
        cut = touch[labels]
    area = max(int(base.sum()), 1)
    grown = int((cut & ~fg0).sum())
    shrunk = int((base & ~cut).sum())
    if grown > P["grow_max"] * area or shrunk > P["shrink_max"] * area or not cut.any():
        return base
    return cut


def refine_mask(rgb: np.ndarray, prob: np.ndarray, P=_P) -> np.ndarray:
    """Full refinement: ``rgb`` HxWx3 uint8 at full resolution, ``prob`` the network's soft mask (any size,
    float in [0, 1]). Returns a uint8 HxW mask."""
    H, W = rgb.shape[:2]
    rgb_small = _resize_max(rgb, _GC_SIDE)
    h, w = rgb_small.shape[:2]
    prob_s = cv2.resize(prob.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    cleaned, holes = cleanup_mask(prob_s, secondary_frac=P["secondary_frac"], near_frac=P["near_frac"],
                                  hole_min_p=P["hole_min_p"])
    hard = _grabcut(rgb_small, cleaned, holes, P).astype(np.float32)
    # Soft edges snapped to image edges: guided-filter coefficients at the working resolution, applied to
    # the full-resolution image (fast guided filter).
    radius = max(1, round(P["gf_r"] * max(h, w)))
    a, b = guided_filter_coeffs(rgb_small.astype(np.float32) / 255.0, hard, radius, P["gf_eps"])
    if (h, w) != (H, W):
        a = cv2.resize(a, (W, H), interpolation=cv2.INTER_LINEAR)
        b = cv2.resize(b, (W, H), interpolation=cv2.INTER_LINEAR)
    soft = (a * (rgb.astype(np.float32) / 255.0)).sum(-1) + b
    return np.clip(soft * 255.0 + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Confidence and the fallback when the network finds almost nothing

UNSURE = "The automatic mask is unsure: check it and paint corrections in step 2, or upload your own mask."
WARNING_KEY = "auto_mask_warning"  # the mask image's ``info`` entry that carries the warning

# Tuned on the dev split of masking_eval (seeds 101, 102), never on the reported test split.
_FALLBACK_PEAK = 0.8  # a network map whose peak is under this is rescaled to peak 1 (relative threshold)
_FALLBACK_AREA = 0.01  # if then under this fraction of the frame is subject, the threshold is halved
_UNSURE_CRISP = 0.85  # the mask is "unsure" when the map's mean decisiveness |2p - 1| is under this


@dataclass(frozen=True)
class MaskResult:
    """``auto_mask_result``'s answer: the mask, how decisive the network was, and a warning for the user."""

    mask: Image.Image  # mode "L", the image's size
    confidence: float  # mean |2p - 1| of the network's (TTA) map: 1 = every pixel decided, 0 = all at 0.5
    widened: bool  # the network found almost nothing, so the search was widened (lower threshold)
    warning: str | None  # for the user, when the mask needs checking; None when it looks sure


def widen_if_empty(prob: np.ndarray) -> tuple[np.ndarray, bool]:
    """When the network finds almost nothing, widen the search rather than return an empty mask: a map
    whose peak is low is rescaled to peak 1 (a threshold relative to the peak), and if under 1% of the frame
    is then above 0.5, the threshold is halved. Returns ``(prob, widened)``."""
    prob = np.clip(prob.astype(np.float32), 0.0, 1.0)
    widened = False
    peak = float(prob.max()) if prob.size else 0.0
    if 1e-3 < peak < _FALLBACK_PEAK:
        prob = prob / peak
        widened = True
    if peak > 1e-3 and float((prob > 0.5).mean()) < _FALLBACK_AREA:
        prob = np.clip(2.0 * prob, 0.0, 1.0)
        widened = True
    return prob, widened


def decisiveness(prob: np.ndarray) -> float:
    """Mean ``|2p - 1|`` of a soft map: how far from undecided (0.5) the network's answer is on average."""
    return float(np.abs(2.0 * np.clip(prob, 0.0, 1.0) - 1.0).mean()) if prob.size else 0.0


def mask_warning(mask: Image.Image | None) -> str | None:
    """The warning ``auto_mask`` attached to ``mask`` (None for a confident mask or any other image)."""
    if mask is None:
        return None
    return mask.info.get(WARNING_KEY) or None


# ----------------------------------------------------------------------------------------------------------
# Public entry point


# ----------------------------------------------------------------------------------------------------------
# A point on the subject: the user's click when the automatic mask missed it

# Square crops around the point, as a fraction of the image's longer side, largest first. In a crop the subject is
# a larger share of the frame, so the network, which looks for the most salient thing, finds it more often.
_POINT_CROPS = (0.7, 0.45)
POINT_NOT_FOUND = ("Nothing stands out from its surroundings at the point you clicked, so the mask was not changed. "
                   "Paint the subject green in the editor below, or upload your own mask.")


def _component_at(binary: np.ndarray, x: int, y: int, radius: float) -> np.ndarray | None:
    """The connected component of ``binary`` at (x, y), or the nearest one within ``radius`` pixels; None if none."""
    n, labels = cv2.connectedComponents(binary.astype(np.uint8), connectivity=8)
    label = labels[y, x]
    if label == 0:
        ys, xs = np.nonzero(labels)
        if not len(xs):
            return None
        distances = np.hypot(xs - x, ys - y)
        nearest = int(np.argmin(distances))
        if distances[nearest] > radius:
            return None
        label = labels[ys[nearest], xs[nearest]]
    return labels == label


def _touches_cut_edge(component: np.ndarray, box: tuple[int, int, int, int], width: int, height: int) -> bool:
    """Whether ``component`` (in crop ``box`` = x0, y0, x1, y1) reaches a crop edge that is not the image's edge:
    then the thing found goes on outside the crop, and this crop does not hold it whole."""
    x0, y0, x1, y1 = box
    return bool((x0 > 0 and component[:, 0].any()) or (y0 > 0 and component[0, :].any())
                or (x1 < width and component[:, -1].any()) or (y1 < height and component[-1, :].any()))


def _map_around_point(rgb: np.ndarray, point: tuple[int, int], model: str, work_size: tuple[int, int]
                      ) -> np.ndarray | None:
    """A network map (at ``work_size``) holding only what the network finds at ``point`` when it looks at crops
    around it, largest first; the first crop that holds such a thing whole wins. None when no crop does."""
    H, W = rgb.shape[:2]
    x, y = point
    for fraction in _POINT_CROPS:
        side = max(32, int(fraction * max(H, W)))
        x0 = int(np.clip(x - side // 2, 0, max(0, W - side)))
        y0 = int(np.clip(y - side // 2, 0, max(0, H - side)))
        box = (x0, y0, min(W, x0 + side), min(H, y0 + side))
        crop_map = network_mask(np.ascontiguousarray(rgb[box[1]:box[3], box[0]:box[2]]), model)
        ch, cw = crop_map.shape
        cx = min(cw - 1, int((x - x0) * cw / (box[2] - x0)))
        cy = min(ch - 1, int((y - y0) * ch / (box[3] - y0)))
        component = _component_at(crop_map > 0.5, cx, cy, radius=0.05 * float(np.hypot(ch, cw)))
        if component is None or _touches_cut_edge(component, box, W, H):
            continue
        # Keep the component and its soft edge; everything else in the crop and outside it is background.
        zone = cv2.dilate(component.astype(np.uint8), _disk(max(2, round(0.02 * max(ch, cw))))).astype(bool)
        canvas = np.zeros((H, W), np.float32)
        canvas[box[1]:box[3], box[0]:box[2]] = cv2.resize(np.where(zone, crop_map, 0.0).astype(np.float32),
                                                          (box[2] - x0, box[3] - y0), interpolation=cv2.INTER_LINEAR)
        return cv2.resize(canvas, (work_size[1], work_size[0]), interpolation=cv2.INTER_AREA)
    return None


def auto_mask_result(image: Image.Image, model: str = DEFAULT_MODEL, refine: bool = True,
                     point: tuple[float, float] | None = None) -> MaskResult:
    """``auto_mask`` with its confidence: see ``MaskResult``. With ``refine=False`` (plain rembg) the
    confidence is that of rembg's map and nothing is widened.

    ``point`` (x, y in the image's pixels) says "the subject is here" (the user's click on the preview). If the
    automatic mask already covers it, that mask is returned unchanged. If not (the network picked something else,
    or nothing), crops around the point are searched for a subject there (``masking_eval/RESULTS.md``: on the dev
    split this recovered 3 of the 14 misses and changed no other image; on the held-out split it changed nothing, as
    its misses are over-inclusions the click falls inside); when none is found the automatic mask is returned with a
    warning saying so."""
    if model not in MASK_MODELS:
        _get_session(model)  # raises the UserError naming the valid models
    rgb = _to_rgb_array(image)  # once: the remembered-result key, the network and the search at a point use it
    result = _remembered_auto_mask(rgb, model, refine)
    if point is None or not refine:
        return result
    W, H = image.size
    x, y = int(np.clip(point[0], 0, W - 1)), int(np.clip(point[1], 0, H - 1))
    if result.mask.getpixel((x, y)) >= 128:
        return result
    pointed = _map_around_point(rgb, (x, y), model, _work_size(rgb))
    if pointed is not None:
        prob, widened = widen_if_empty(pointed)
        mask = Image.fromarray(refine_mask(rgb, prob), mode="L")
        if mask.getpixel((x, y)) >= 128:
            return MaskResult(mask, decisiveness(prob), widened, None)
    result.mask.info[WARNING_KEY] = POINT_NOT_FOUND
    return MaskResult(result.mask, result.confidence, result.widened, POINT_NOT_FOUND)


# The last few automatic results, by image content: the page computes the mask on upload, and a click on the
# subject then asks again for the same image (to see whether the automatic mask covers the click), which would
# otherwise cost the network's passes again (2.7 s for 1024 px on 2 cores). Each hit is handed out as a copy, because
# callers set warnings in a mask's ``info``.
_REMEMBERED = 2
_remembered: "OrderedDict[tuple, MaskResult]" = OrderedDict()
_REMEMBERED_LOCK = threading.Lock()


def _remembered_auto_mask(rgb: np.ndarray, model: str, refine: bool) -> MaskResult:
    key = (hashlib.blake2b(np.ascontiguousarray(rgb).data, digest_size=16).hexdigest(), rgb.shape, model, refine)
    with _REMEMBERED_LOCK:
        hit = _remembered.get(key)
        if hit is not None:
            _remembered.move_to_end(key)
    if hit is None:
        hit = _auto_mask_result(rgb, model, refine)
        with _REMEMBERED_LOCK:
            _remembered[key] = hit
            while len(_remembered) > _REMEMBERED:
                _remembered.popitem(last=False)
    return dataclasses.replace(hit, mask=hit.mask.copy())


def forget_remembered_masks() -> None:
    """Drop the remembered automatic masks (tests that swap the network use it)."""
    with _REMEMBERED_LOCK:
        _remembered.clear()


def _auto_mask_result(rgb: np.ndarray, model: str, refine: bool) -> MaskResult:
    if not refine:
        size = (rgb.shape[1], rgb.shape[0])
        out = _get_session(model).predict(Image.fromarray(rgb))[0].convert("L")
        out = out if out.size == size else out.resize(size, Image.Resampling.BILINEAR)
        conf = decisiveness(np.asarray(out, dtype=np.float32) / 255.0)
        return MaskResult(out, conf, False, UNSURE if conf < _UNSURE_CRISP else None)
    prob, widened = widen_if_empty(network_mask(rgb, model))
    conf = decisiveness(prob)
    mask = Image.fromarray(refine_mask(rgb, prob), mode="L")
    warning = None
    if widened:
        warning = ("The automatic mask is unsure: the background-removal model found no clear subject, so the "
                   "search was widened. Check the mask and paint corrections in step 2, or upload your own mask.")
    elif conf < _UNSURE_CRISP:
        warning = UNSURE
    if warning:
        mask.info[WARNING_KEY] = warning
    return MaskResult(mask, conf, widened, warning)


def auto_mask(image: Image.Image, model: str = DEFAULT_MODEL, refine: bool = True,
              point: tuple[float, float] | None = None) -> Image.Image:
    """Subject mask of ``image`` (RGB or RGBA; alpha is ignored) as a mode "L" image of the same size:
    255 = subject (trained on), 0 = background, gray = partial (proportional loss weight).

    ``refine=False`` returns the network's mask as rembg gives it (``rembg.remove(..., only_mask=True)``).
    Sessions are created once per model and cached. When the mask is unsure (see ``auto_mask_result``), its
    ``info[WARNING_KEY]`` holds a warning for the user (``mask_warning(mask)`` reads it).

    ``point`` (x, y): a pixel on the subject, for when the automatic mask missed it (see ``auto_mask_result``).

    Raises ``UserError`` for an unknown model, a missing offline model, or a model that needs a download
    with no network reachable.
    """
    return auto_mask_result(image, model, refine, point).mask
