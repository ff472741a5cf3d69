#!/usr/bin/env python
"""Measure automatic masks against exactly known ones.

The evaluation set is synthesized here, with no downloads: subject silhouettes (figures with thin limbs, a horse,
a bicycle, a tree, mugs and rings with holes, text-like strokes, the Hugging Face logo's alpha) are filled with
textures (procedural noise, crops of sample photos shipped inside installed packages: scikit-image's and gradio's
sample images; the photos and textures used for subjects are never used for backgrounds), shaded, given a drop
shadow sometimes, rotated/scaled/offset a little, and pasted onto backgrounds of four difficulty classes:

* ``plain``      flat colours and gradients;
* ``busy``       high-frequency textures (grass, moon, text pages, star fields, a cluttered garage, noise);
* ``distractor`` a second, smaller object behind/next to the subject, text, photos with their own objects
                 (mostly defocused, as behind a photographed subject);
* ``thin``       thin-limbed / holed subjects (figures, bicycle, tree, horse, strokes) on mixed backgrounds.

The ground truth is the composite's alpha thresholded at 0.5. Each method's mask is thresholded at 0.5 (mask
values are 0..255, so >= 128) and compared by IoU.

Seeds: the ``dev`` split (seeds 101, 102) is for tuning; the ``test`` split (seed 8) is held out and only used
for the reported numbers (seed 7, ``test7``, was the first held-out split; see RESULTS.md). ``--write`` writes
``masking_eval/RESULTS.md`` from the test split.

Usage:
    python masking_eval/evaluate.py --split dev
    python masking_eval/evaluate.py --split test --write
    python masking_eval/evaluate.py --split test --save-images   # composites/masks under masking_eval/_data
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CLASSES = ("plain", "busy", "distractor", "thin")
# "test" is the held-out split of the report. Seed 7 was the first held-out split: its run exposed a
# difference between the code path tuned on dev and the shipped one (see RESULTS.md), so after the fix the
# report moved to the fresh seed 8; seed 7 stays available as "test7".
# "test9" (seed 9) is the fresh held-out split of the mask-confidence measure (masking_eval/confidence.py), as seed 8
# had been reported three times by then.
# "test11" (seed 11) is the fresh held-out split of u2net as the default network (2026-12-03): seeds 7, 8 and 9 had
# all been reported by then.
SPLITS = {"dev": (101, 102), "test": (8,), "test7": (7,), "test9": (9,), "test11": (11,)}
PER_CLASS = 12
SIZES = ((1024, 1024), (768, 1024), (1024, 768))  # (width, height)
DATA_DIR = Path(__file__).resolve().parent / "_data"
# Sample images are split between subject textures and backgrounds, so that a subject is never camouflaged
# by being textured with the very photo it stands on.
SUBJECT_PHOTOS = ("chelsea", "cheetah", "cheetah2", "ihc", "color", "groot")
SUBJECT_GRAYS = ("brick", "gravel", "coins", "cell")


# ----------------------------------------------------------------------------------------------------------
# Assets shipped in installed packages


def _pkg_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _load_assets() -> dict[str, dict[str, np.ndarray]]:
    sk = _pkg_dir("skimage")
    gr = _pkg_dir("gradio")
    photos, grays, cutouts = {}, {}, {}

    def rd(p: Path):
        try:
            return Image.open(p)
        except Exception:
            return None

    if sk is not None:
        d = sk / "data"
        for n in ("coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png",
                  "chelsea.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "color.png"):
            im = rd(d / n)
            if im is not None:
                photos[n.split(".")[0]] = np.asarray(im.convert("RGB"))
        for n in ("brick.png", "gravel.png", "grass.png", "moon.png", "camera.png", "text.png", "page.png",
                  "coins.png", "cell.png"):
            im = rd(d / n)
            if im is not None:
                grays[n.split(".")[0]] = np.asarray(im.convert("L"))
        im = rd(d / "horse.png")
        if im is not None:
            g = np.asarray(im.convert("L"))
            cutouts["horse"] = (g < 128).astype(np.float32)
    if gr is not None:
        d = gr / "media_assets" / "images"
        for n in ("groot.jpeg", "tower.jpg", "cheetah.jpg"):
            im = rd(d / n)
            if im is not None:
                photos[n.split(".")[0]] = np.asarray(im.convert("RGB"))
        im = rd(gr / "test_data" / "cheetah2.jpg")
        if im is not None:
            photos["cheetah2"] = np.asarray(im.convert("RGB"))
        im = rd(d / "hf-logo_transpng.png")
        if im is not None:
            a = np.asarray(im.convert("RGBA"))
            cutouts["hf_logo"] = a  # RGBA: has its own colours
    return {"photos": photos, "grays": grays, "cutouts": cutouts}


# ----------------------------------------------------------------------------------------------------------
# Procedural pieces


def _noise(rng: np.random.Generator, h: int, w: int, octaves=(4, 8, 16, 32, 64), falloff=0.6) -> np.ndarray:
    out = np.zeros((h, w), np.float32)
    amp, tot = 1.0, 0.0
    for o in octaves:
        g = rng.standard_normal((max(2, h * o // 512), max(2, w * o // 512))).astype(np.float32)
        out += amp * cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)
        tot += amp
        amp *= falloff
    out /= tot
    out = (out - out.min()) / max(1e-6, out.max() - out.min())
    return out


def _rand_color(rng, sat=(0.3, 1.0), val=(0.2, 1.0)) -> np.ndarray:
    hsv = np.uint8([[[rng.integers(0, 180), rng.uniform(*sat) * 255, rng.uniform(*val) * 255]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32) / 255.0


def _crop_resize(rng, img: np.ndarray, h: int, w: int, min_frac=0.35) -> np.ndarray:
    H, W = img.shape[:2]
    f = rng.uniform(min_frac, 1.0)
    ch = max(8, int(H * f))
    cw = max(8, min(W, int(ch * w / h)))
    ch = max(8, min(H, int(cw * h / w)))
    y = rng.integers(0, H - ch + 1)
    x = rng.integers(0, W - cw + 1)
    crop = img[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return cv2.resize(np.ascontiguousarray(crop), (w, h), interpolation=cv2.INTER_CUBIC)


def _colorize(rng, gray: np.ndarray) -> np.ndarray:
    g = gray.astype(np.float32) / 255.0
    c1, c2 = _rand_color(rng), _rand_color(rng)
    return g[..., None] * c1 + (1 - g[..., None]) * c2


def _texture(rng, assets, h, w, *, kind: str | None = None) -> np.ndarray:
    """Float RGB texture in [0, 1]."""
    kinds = ["noise", "noise", "flat"]
    if any(n in assets["photos"] for n in SUBJECT_PHOTOS):
        kinds += ["photo", "photo"]
    if any(n in assets["grays"] for n in SUBJECT_GRAYS):
        kinds += ["gray"]
    kind = kind or kinds[rng.integers(len(kinds))]
    if kind == "photo":
        names = [n for n in sorted(assets["photos"]) if n in SUBJECT_PHOTOS]
        img = assets["photos"][names[rng.integers(len(names))]]
        return _crop_resize(rng, img, h, w).astype(np.float32) / 255.0
    if kind == "gray":
        names = [n for n in sorted(assets["grays"]) if n in SUBJECT_GRAYS]
        return _colorize(rng, _crop_resize(rng, assets["grays"][names[rng.integers(len(names))]], h, w))
    if kind == "flat":
        c = _rand_color(rng)
        return np.broadcast_to(c, (h, w, 3)).copy() * (0.9 + 0.1 * _noise(rng, h, w, (64, 128))[..., None])
    # procedural noise, two colours
    n = _noise(rng, h, w, octaves=tuple(int(o) for o in rng.choice([4, 8, 16, 32, 64, 128], 3, replace=False)))
    c1, c2 = _rand_color(rng), _rand_color(rng)
    return n[..., None] * c1 + (1 - n[..., None]) * c2


# ----------------------------------------------------------------------------------------------------------
# Silhouettes: each returns a float alpha (H, W) drawn on a canvas of the given size, roughly centred


def _line(a, p, q, t):
    cv2.line(a, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), 1.0, max(1, int(t)), cv2.LINE_AA)


def _figure(rng, h, w):
    a = np.zeros((h, w), np.float32)
    s = h * rng.uniform(0.55, 0.8)
    cx, top = w / 2, (h - s) / 2
    t = s * rng.uniform(0.025, 0.06)  # limb thickness
    head_r = s * 0.075
    cv2.circle(a, (int(cx), int(top + head_r)), int(head_r), 1.0, -1, cv2.LINE_AA)
    neck = (cx, top + 2 * head_r)
    hip = (cx + rng.uniform(-0.03, 0.03) * s, top + 0.55 * s)
    cv2.ellipse(a, (int(cx), int((neck[1] + hip[1]) / 2)), (int(s * rng.uniform(0.07, 0.11)),
                int((hip[1] - neck[1]) / 2)), 0, 0, 360, 1.0, -1, cv2.LINE_AA)
    sh = (cx, neck[1] + 0.05 * s)
    for side in (-1, 1):
        ang = np.deg2rad(rng.uniform(20, 160))
        elbow = (sh[0] + side * 0.17 * s * np.sin(ang), sh[1] + 0.17 * s * np.cos(ang))
        ang2 = ang + np.deg2rad(rng.uniform(-70, 70))
        hand = (elbow[0] + side * 0.16 * s * np.sin(ang2), elbow[1] + 0.16 * s * np.cos(ang2))
        _line(a, (sh[0] + side * 0.06 * s, sh[1]), elbow, t)
        _line(a, elbow, hand, t * 0.85)
        cv2.circle(a, (int(hand[0]), int(hand[1])), int(t * 0.9), 1.0, -1, cv2.LINE_AA)
        ang = np.deg2rad(rng.uniform(3, 30))
        knee = (hip[0] + side * 0.22 * s * np.sin(ang), hip[1] + 0.22 * s * np.cos(ang))
        foot = (knee[0] + side * rng.uniform(-0.05, 0.08) * s, knee[1] + 0.21 * s)
        _line(a, (hip[0] + side * 0.04 * s, hip[1]), knee, t * 1.2)
        _line(a, knee, foot, t)
        _line(a, foot, (foot[0] + side * 0.06 * s, foot[1]), t * 0.8)
    return a


def _bicycle(rng, h, w):
    a = np.zeros((h, w), np.float32)
    R = min(h, w) * rng.uniform(0.16, 0.22)
    t = max(3, R * rng.uniform(0.04, 0.09))
    y = h / 2 + R * 0.6
    x1, x2 = w / 2 - 1.35 * R, w / 2 + 1.35 * R
    for x in (x1, x2):
        cv2.circle(a, (int(x), int(y)), int(R), 1.0, int(t * 1.6), cv2.LINE_AA)
        cv2.circle(a, (int(x), int(y)), int(R * 0.12), 1.0, -1, cv2.LINE_AA)
        for k in range(8):
            ang = k * np.pi / 8
            _line(a, (x + R * np.cos(ang), y + R * np.sin(ang)), (x - R * np.cos(ang), y - R * np.sin(ang)),
                  max(1, t * 0.25))
    crank = (w / 2, y)
    seat = (w / 2 - 0.35 * R, y - 1.3 * R)
    head = (x2 - 0.35 * R, y - 1.25 * R)
    for p, q in ((crank, seat), (seat, head), (crank, head), (crank, (x1, y)), (seat, (x1, y)),
                 (head, (x2, y)), (head, (head[0] - 0.15 * R, head[1] - 0.35 * R))):
        _line(a, p, q, t)
    cv2.ellipse(a, (int(seat[0]), int(seat[1] - t)), (int(0.3 * R), int(t * 0.9)), 0, 0, 360, 1.0, -1, cv2.LINE_AA)
    hb = (head[0] - 0.15 * R, head[1] - 0.35 * R)
    _line(a, hb, (hb[0] + 0.35 * R, hb[1] - 0.05 * R), t)
    return a


def _tree(rng, h, w):
    a = np.zeros((h, w), np.float32)
    s = h * rng.uniform(0.6, 0.8)
    base = (w / 2, (h + s) / 2)

    def branch(p, ang, length, t, depth):
        q = (p[0] + length * np.sin(ang), p[1] - length * np.cos(ang))
        _line(a, p, q, t)
        if depth == 0 or t < 2:
            cv2.ellipse(a, (int(q[0]), int(q[1])), (int(length * 0.35), int(length * 0.18)),
                        float(np.rad2deg(ang)) + 90, 0, 360, 1.0, -1, cv2.LINE_AA)
            return
        for d in (-1, 1):
            branch(q, ang + d * rng.uniform(0.3, 0.7), length * rng.uniform(0.6, 0.78), t * 0.62, depth - 1)

    branch(base, rng.uniform(-0.1, 0.1), s * 0.3, s * rng.uniform(0.04, 0.06), int(rng.integers(3, 5)))
    return a


def _mug(rng, h, w):
    a = np.zeros((h, w), np.float32)
    bh = h * rng.uniform(0.4, 0.55)
    bw = bh * rng.uniform(0.6, 0.9)
    x0, y0 = w / 2 - bw / 2 - bh * 0.1, h / 2 - bh / 2
    r = int(bw * 0.12)
    cv2.rectangle(a, (int(x0), int(y0 + r)), (int(x0 + bw), int(y0 + bh - r)), 1.0, -1, cv2.LINE_AA)
    cv2.rectangle(a, (int(x0 + r), int(y0)), (int(x0 + bw - r), int(y0 + bh)), 1.0, -1, cv2.LINE_AA)
    for cx, cy in ((x0 + r, y0 + r), (x0 + bw - r, y0 + r), (x0 + r, y0 + bh - r), (x0 + bw - r, y0 + bh - r)):
        cv2.circle(a, (int(cx), int(cy)), r, 1.0, -1, cv2.LINE_AA)
    hr = bh * rng.uniform(0.22, 0.3)
    cv2.ellipse(a, (int(x0 + bw), int(y0 + bh / 2)), (int(hr), int(hr * 1.2)), 0, -90, 90, 1.0,
                int(bh * rng.uniform(0.05, 0.09)), cv2.LINE_AA)
    return a


def _ring(rng, h, w):
    a = np.zeros((h, w), np.float32)
    R = min(h, w) * rng.uniform(0.25, 0.38)
    ax = (int(R), int(R * rng.uniform(0.6, 1.0)))
    ang = rng.uniform(0, 180)
    cv2.ellipse(a, (w // 2, h // 2), ax, ang, 0, 360, 1.0, -1, cv2.LINE_AA)
    f = rng.uniform(0.35, 0.6)
    cv2.ellipse(a, (w // 2, h // 2), (int(ax[0] * f), int(ax[1] * f)), ang, 0, 360, 0.0, -1, cv2.LINE_AA)
    if rng.random() < 0.5:  # a second, small hole
        cv2.circle(a, (int(w / 2 + ax[0] * 0.75 * np.cos(np.deg2rad(ang))), int(h / 2 + ax[0] * 0.75 * np.sin(np.deg2rad(ang)))),
                   int(ax[1] * 0.1), 0.0, -1, cv2.LINE_AA)
    return a


def _blob(rng, h, w):
    a = np.zeros((h, w), np.float32)
    R = min(h, w) * rng.uniform(0.25, 0.38)
    k = int(rng.integers(3, 8))
    th = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    r = R * (1 + 0.25 * np.sin(k * th + rng.uniform(0, 6)) + 0.1 * np.sin(2 * k * th + rng.uniform(0, 6)))
    pts = np.stack([w / 2 + r * np.cos(th), h / 2 + r * np.sin(th)], -1).astype(np.int32)
    cv2.fillPoly(a, [pts], 1.0, cv2.LINE_AA)
    return a


def _strokes(rng, h, w):
    words = ["FLUX", "LoRA", "Aa", "ohwx", "Kq8", "WAVE", "hey!"]
    word = words[rng.integers(len(words))]
    font = [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_TRIPLEX,
            cv2.FONT_HERSHEY_SCRIPT_SIMPLEX][rng.integers(4)]
    th = int(rng.integers(3, 9))
    (tw, tht), _ = cv2.getTextSize(word, font, 1.0, th)
    scale = 0.75 * w / tw
    th2 = max(2, int(th * scale * rng.uniform(0.5, 0.9)))
    (tw, tht), base = cv2.getTextSize(word, font, scale, th2)
    if tht > 0.6 * h:
        scale *= 0.6 * h / tht
        (tw, tht), base = cv2.getTextSize(word, font, scale, th2)
    ink = np.zeros((h, w), np.uint8)  # OpenCV 5 draws text on 8-bit images only
    cv2.putText(ink, word, (int((w - tw) / 2), int((h + tht) / 2)), font, scale, 255, th2, cv2.LINE_AA)
    return ink.astype(np.float32) / 255.0


def _cutout(arr: np.ndarray, h, w, frac):
    """Place an asset cut-out (alpha float, or RGBA uint8) centred; returns (alpha, rgb or None)."""
    ah, aw = arr.shape[:2]
    s = min(h * frac / ah, w * 0.9 / aw)
    nh, nw = max(2, int(ah * s)), max(2, int(aw * s))
    y0, x0 = (h - nh) // 2, (w - nw) // 2
    alpha = np.zeros((h, w), np.float32)
    rgb = None
    if arr.ndim == 3:
        big = cv2.resize(arr, (nw, nh), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255.0
        alpha[y0:y0 + nh, x0:x0 + nw] = np.clip(big[..., 3], 0, 1)
        rgb = np.zeros((h, w, 3), np.float32)
        rgb[y0:y0 + nh, x0:x0 + nw] = np.clip(big[..., :3], 0, 1)
    else:
        alpha[y0:y0 + nh, x0:x0 + nw] = np.clip(cv2.resize(arr, (nw, nh), interpolation=cv2.INTER_CUBIC), 0, 1)
    return alpha, rgb


SHAPES_THIN = ("figure", "bicycle", "tree", "horse", "strokes")
SHAPES_ALL = SHAPES_THIN + ("mug", "ring", "blob", "hf_logo")


def _silhouette(rng, assets, shape, h, w):
    if shape == "horse" and "horse" in assets["cutouts"]:
        a, _ = _cutout(assets["cutouts"]["horse"], h, w, rng.uniform(0.55, 0.8))
        return a, None
    if shape == "hf_logo" and "hf_logo" in assets["cutouts"]:
        return _cutout(assets["cutouts"]["hf_logo"], h, w, rng.uniform(0.5, 0.75))
    fn = {"figure": _figure, "bicycle": _bicycle, "tree": _tree, "mug": _mug, "ring": _ring, "blob": _blob,
          "strokes": _strokes, "horse": _figure, "hf_logo": _blob}[shape]
    return fn(rng, h, w), None


def _shade(alpha: np.ndarray, strength: float) -> np.ndarray:
    """Volume shading from the distance to the silhouette edge (edges darker)."""
    d = cv2.distanceTransform((alpha > 0.5).astype(np.uint8), cv2.DIST_L2, 3)
    m = d.max()
    if m <= 0:
        return np.ones_like(alpha)
    d = np.sqrt(d / m)
    return (1 - strength) + strength * d


def _warp(rng, a: np.ndarray, rgb: np.ndarray | None, h: int, w: int):
    """Random scale/rotation/offset so the subject is not always centred."""
    ang = rng.uniform(-12, 12)
    sc = rng.uniform(0.85, 1.1)
    tx, ty = rng.uniform(-0.12, 0.12) * w, rng.uniform(-0.08, 0.08) * h
    M = cv2.getRotationMatrix2D((w / 2, h / 2), ang, sc)
    M[:, 2] += (tx, ty)
    a = cv2.warpAffine(a, M, (w, h), flags=cv2.INTER_LINEAR)
    if rgb is not None:
        rgb = cv2.warpAffine(rgb, M, (w, h), flags=cv2.INTER_LINEAR)
    return a, rgb


def _subject(rng, assets, shape, h, w, scale=1.0):
    ch, cw = int(h * scale), int(w * scale)
    a, rgb = _silhouette(rng, assets, shape, ch, cw)
    if rgb is None:
        rgb = _texture(rng, assets, ch, cw)
        if rng.random() < 0.7:
            rgb = rgb * _shade(a, rng.uniform(0.2, 0.6))[..., None]
        if rng.random() < 0.25:  # cartoon outline
            edge = cv2.morphologyEx((a > 0.5).astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((5, 5), np.uint8))
            rgb[edge > 0] *= 0.15
    a, rgb = _warp(rng, a, rgb, ch, cw)
    return np.clip(a, 0, 1), np.clip(rgb, 0, 1)


def _background(rng, assets, cls, h, w):
    if cls == "plain":
        c1, c2 = _rand_color(rng, sat=(0.0, 0.6)), _rand_color(rng, sat=(0.0, 0.6))
        mode = rng.integers(3)
        if mode == 0:
            bg = np.broadcast_to(c1, (h, w, 3)).copy()
        else:
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            if mode == 1:
                ang = rng.uniform(0, np.pi)
                t = (xx * np.cos(ang) + yy * np.sin(ang))
            else:
                t = np.hypot(xx - w * rng.uniform(0.2, 0.8), yy - h * rng.uniform(0.2, 0.8))
            t = (t - t.min()) / max(1e-6, t.max() - t.min())
            bg = t[..., None] * c1 + (1 - t[..., None]) * c2
        return bg + 0.02 * (rng.standard_normal((h, w, 1)).astype(np.float32))
    if cls == "busy":
        kind = ["gray", "noise", "photo_busy"][rng.integers(3)]
        if kind == "photo_busy":
            busy = [n for n in ("hubble_deep_field", "motorcycle_left", "motorcycle_right") if n in assets["photos"]]
            if busy:
                img = assets["photos"][busy[rng.integers(len(busy))]]
                return _crop_resize(rng, img, h, w, min_frac=0.3).astype(np.float32) / 255.0
            kind = "noise"
        if kind == "noise":
            n = _noise(rng, h, w, octaves=(32, 64, 128, 256), falloff=0.8)
            return _colorize(rng, (n * 255).astype(np.uint8))
        busy = [n for n in ("grass", "moon", "camera", "text", "page") if n in assets["grays"]]
        g = assets["grays"][busy[rng.integers(len(busy))]] if busy else (_noise(rng, 512, 512) * 255).astype(np.uint8)
        reps = int(rng.integers(1, 4))
        g = np.tile(g, (reps, reps))
        return _colorize(rng, _crop_resize(rng, g, h, w, min_frac=0.6))
    # distractor / thin backgrounds: photos (mostly defocused, as behind a photographed subject), else
    # plain or busy
    names = [n for n in sorted(assets["photos"]) if n not in SUBJECT_PHOTOS]
    if names and rng.random() < (0.7 if cls == "distractor" else 0.4):
        bg = _crop_resize(rng, assets["photos"][names[rng.integers(len(names))]], h, w, min_frac=0.6)
        bg = bg.astype(np.float32) / 255.0
        if rng.random() < 0.8:
            s = rng.uniform(2.0, 8.0) * max(h, w) / 1024
            bg = cv2.GaussianBlur(bg, (0, 0), s)
        return bg
    return _background(rng, assets, ["plain", "busy"][rng.integers(2)], h, w)


def _draw_text(rng, bg):
    h, w = bg.shape[:2]
    for _ in range(int(rng.integers(1, 4))):
        txt = ["SALE 50%", "OPEN", "No parking", "Cafe", "2026", "hello world", "EXIT"][rng.integers(7)]
        sc = rng.uniform(1.5, 4.0) * w / 1024
        col = _rand_color(rng)
        ink = np.zeros((h, w), np.uint8)  # OpenCV 5 draws text on 8-bit images only
        cv2.putText(ink, txt, (int(rng.uniform(0, 0.6) * w), int(rng.uniform(0.1, 0.95) * h)),
                    cv2.FONT_HERSHEY_SIMPLEX, sc, 255, max(2, int(sc * 3)), cv2.LINE_AA)
        k = (ink.astype(np.float32) / 255.0)[..., None]
        bg = k * col + (1 - k) * bg
    return bg


@dataclass
class Sample:
    name: str
    cls: str
    rgb: np.ndarray  # uint8 HxWx3
    gt: np.ndarray  # bool HxW


def make_sample(seed: int, cls: str, idx: int, assets) -> Sample:
    rng = np.random.default_rng([seed, CLASSES.index(cls), idx])
    w, h = SIZES[rng.integers(len(SIZES))]
    shapes = SHAPES_THIN if cls == "thin" else SHAPES_ALL
    shape = shapes[rng.integers(len(shapes))]
    bg = np.ascontiguousarray(_background(rng, assets, cls, h, w), dtype=np.float32)
    if cls == "distractor":
        if rng.random() < 0.85:  # a second, smaller salient object, behind or beside the subject
            other = SHAPES_ALL[rng.integers(len(SHAPES_ALL))]
            sc = rng.uniform(0.3, 0.5)
            oa, orgb = _subject(rng, assets, other, h, w, sc)
            oh, ow = oa.shape
            y0 = int(rng.uniform(0, h - oh))
            x0 = int(rng.choice([rng.uniform(0, 0.15), rng.uniform(0.6, 1.0)]) * (w - ow))
            reg = bg[y0:y0 + oh, x0:x0 + ow]
            reg[:] = oa[..., None] * orgb + (1 - oa[..., None]) * reg
        if rng.random() < 0.6:
            bg = _draw_text(rng, bg)
    a, rgb = _subject(rng, assets, shape, h, w)
    # Slight edge softness like a photo, then the ground truth from that alpha.
    a = cv2.GaussianBlur(a, (0, 0), rng.uniform(0.5, 1.5))
    if rng.random() < 0.5:  # drop shadow on the background (not part of the subject)
        sh = cv2.GaussianBlur(a, (0, 0), rng.uniform(4, 15))
        M = np.float32([[1, 0, rng.uniform(-0.04, 0.04) * w], [0, 1, rng.uniform(0.0, 0.04) * h]])
        sh = cv2.warpAffine(sh, M, (w, h))
        bg = bg * (1 - rng.uniform(0.3, 0.6) * sh[..., None])
    comp = a[..., None] * rgb + (1 - a[..., None]) * bg
    comp = comp + rng.uniform(0.0, 0.02) * rng.standard_normal(comp.shape).astype(np.float32)  # sensor noise
    comp8 = np.clip(comp * 255 + 0.5, 0, 255).astype(np.uint8)
    return Sample(f"{cls}-{seed}-{idx:02d}-{shape}", cls, comp8, a >= 0.5)


def make_split(split: str, per_class: int = PER_CLASS, assets=None) -> list[Sample]:
    assets = assets or _load_assets()
    out = []
    for seed in SPLITS[split]:
        for cls in CLASSES:
            for i in range(per_class):
                out.append(make_sample(seed, cls, i, assets))
    return out


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def iou(mask: np.ndarray, gt: np.ndarray) -> float:
    m = mask >= 128 if mask.dtype == np.uint8 else mask >= 0.5
    u = np.logical_or(m, gt).sum()
    return float(np.logical_and(m, gt).sum() / u) if u else 1.0


def present_models() -> list[str]:
    from trainer.dataset.masking import MASK_MODELS, model_file

    return [m for m in MASK_MODELS if model_file(m) is not None]


def plain_rembg(img: Image.Image, model: str) -> np.ndarray:
    """What rembg gives out of the box: ``rembg.remove(..., only_mask=True)`` with its defaults."""
    from rembg import new_session, remove

    sess = _PLAIN_SESSIONS.get(model)
    if sess is None:
        sess = _PLAIN_SESSIONS[model] = new_session(model)
    return np.asarray(remove(img, session=sess, only_mask=True).convert("L"))


_PLAIN_SESSIONS: dict = {}


METHODS = ("plain", "refined", "clicked")
METHOD_LABELS = {"plain": "plain rembg", "refined": "refined (ours)", "clicked": "ours + one click on the subject"}
PAIRS = (("plain", "refined"), ("refined", "clicked"))  # per-image comparisons reported


def click_point(gt: np.ndarray) -> tuple[int, int]:
    """Where a user clicks on the subject: its deepest inside point (farthest from the outline), as (x, y)."""
    depth = cv2.distanceTransform(gt.astype(np.uint8), cv2.DIST_L2, 5)
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return int(x), int(y)


def _run_method(method: str, img: Image.Image, model: str, gt: np.ndarray) -> np.ndarray:
    from trainer.dataset.masking import auto_mask

    if method == "plain":
        return plain_rembg(img, model)
    return np.asarray(auto_mask(img, model, point=click_point(gt) if method == "clicked" else None))


def evaluate(samples: list[Sample], models: list[str], save: Path | None = None, log=print, methods=METHODS):
    rows = []  # (model, method, sample name, cls, iou, seconds)
    for model in models:
        for method in methods:
            # warm-up (session creation) outside the timings
            _run_method(method, Image.fromarray(samples[0].rgb), model, samples[0].gt)
            for s in samples:
                img = Image.fromarray(s.rgb)
                t0 = time.perf_counter()
                m = _run_method(method, img, model, s.gt)
                dt = time.perf_counter() - t0
                rows.append((model, method, s.name, s.cls, iou(m, s.gt), dt))
                if save is not None:
                    save.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(m).save(save / f"{s.name}.{model}.{method}.png")
            log(f"{model:18s} {method:8s} mean IoU {np.mean([r[4] for r in rows if r[:2] == (model, method)]):.4f}")
    if save is not None:
        for s in samples:
            Image.fromarray(s.rgb).save(save / f"{s.name}.jpg", quality=92)
            Image.fromarray((s.gt * 255).astype(np.uint8)).save(save / f"{s.name}.gt.png")
    return rows


def summarize(rows, models):
    """{(model, method): {cls or 'all': (mean, worst, worst_name)}} and timing {(model, method): (mean, max)}."""
    table, timing = {}, {}
    for model in models:
        for method in METHODS:
            rs = [r for r in rows if r[0] == model and r[1] == method]
            d = {}
            for cls in CLASSES + ("all",):
                sub = [r for r in rs if cls == "all" or r[3] == cls]
                if not sub:
                    continue
                ious = np.array([r[4] for r in sub])
                k = int(np.argmin(ious))
                d[cls] = (float(ious.mean()), float(ious.min()), sub[k][2])
            table[(model, method)] = d
            ts = np.array([r[5] for r in rs])
            timing[(model, method)] = (float(ts.mean()), float(ts.max()))
    return table, timing


def stage_timing(samples, model: str, repeats: int = 3) -> str:
    """Seconds per 1024x1024 image by stage (median over images of the fastest of ``repeats`` runs, which
    discounts other load on the machine; and the slowest single run)."""
    from trainer.dataset import masking

    sq = [s for s in samples if s.rgb.shape[:2] == (1024, 1024)]
    if not sq:
        return ""
    net, ref, tot, worst = [], [], [], 0.0
    for s in sq:
        tn, tr, tt = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            prob = masking.network_mask(s.rgb, model)
            t1 = time.perf_counter()
            masking.refine_mask(s.rgb, masking.widen_if_empty(prob)[0])
            t2 = time.perf_counter()
            tn.append(t1 - t0)
            tr.append(t2 - t1)
            tt.append(t2 - t0)
        net.append(min(tn))
        ref.append(min(tr))
        tot.append(min(tt))
        worst = max(worst, max(tt))
    return (f"{model}, {len(sq)} images of 1024x1024, refined pipeline by stage (median over images of the best of "
            f"{repeats} runs): network {np.median(net):.2f} s + refinement {np.median(ref):.2f} s = "
            f"{np.median(tot):.2f} s; slowest single run {worst:.2f} s.")


def paired_stats(rows, models):
    """Per model and pair of methods (``PAIRS``): the per-image comparison of the second against the first."""
    out = {}
    for model in models:
        per = {}
        for r in rows:
            if r[0] == model:
                per.setdefault(r[2], {})[r[1]] = r[4]
        names = sorted(per)
        for first, second in PAIRS:
            out[(model, first, second)] = _paired(names, np.array([per[n][first] for n in names]),
                                                  np.array([per[n][second] for n in names]))
    return out


def _paired(names, p, q) -> dict:
    diff = q - p
    found = p >= 0.5
    return dict(
        n=len(names),
        better=int((diff > 0.005).sum()),
        worse=int((diff < -0.005).sum()),
        max_loss=(float(diff.min()), names[int(diff.argmin())]),
        max_gain=(float(diff.max()), names[int(diff.argmax())]),
        p10=(float(np.percentile(p, 10)), float(np.percentile(q, 10))),
        median=(float(np.median(p)), float(np.median(q))),
        misses=(int((p < 0.2).sum()), int((q < 0.2).sum())),
        found=int(found.sum()),
        worst_found=(float(p[found].min()) if found.any() else float("nan"),
                     float(q[found].min()) if found.any() else float("nan")),
    )


def format_paired(stats) -> str:
    lines = []
    for (model, first, second), st in stats.items():
        lines += [
            f"{model}, per image ({st['n']} images), {METHOD_LABELS[first]} -> {METHOD_LABELS[second]}:",
            f"- better on {st['better']}, worse on {st['worse']} (by more than 0.005 IoU); largest gain "
            f"{st['max_gain'][0]:+.3f} (`{st['max_gain'][1]}`), largest loss {st['max_loss'][0]:+.3f} "
            f"(`{st['max_loss'][1]}`)",
            f"- median {st['median'][0]:.3f} -> {st['median'][1]:.3f}; 10th percentile {st['p10'][0]:.3f} -> "
            f"{st['p10'][1]:.3f}",
            f"- network misses (IoU < 0.2): {st['misses'][0]} -> {st['misses'][1]}",
            f"- worst over the {st['found']} images where {METHOD_LABELS[first]} found the subject (IoU >= 0.5): "
            f"{st['worst_found'][0]:.3f} -> {st['worst_found'][1]:.3f}",
        ]
    return "\n".join(lines)


def format_table(table, timing, models) -> str:
    lines = ["| model | method | " + " | ".join(f"{c} mean / worst" for c in CLASSES + ("all",)) + " | s / image (mean, max) |",
             "| --- | --- | " + " | ".join("---" for _ in CLASSES + ("all",)) + " | --- |"]
    for model in models:
        for method in METHODS:
            d = table[(model, method)]
            cells = [f"{d[c][0]:.3f} / {d[c][1]:.3f}" if c in d else "-" for c in CLASSES + ("all",)]
            t = timing[(model, method)]
            label = METHOD_LABELS[method]
            lines.append(f"| {model} | {label} | " + " | ".join(cells) + f" | {t[0]:.2f}, {t[1]:.2f} |")
    return "\n".join(lines)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def main(argv=None) -> int:
    global METHODS, PAIRS  # with --methods, the tables and pairs report only the methods run
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", choices=sorted(SPLITS), default="dev")
    ap.add_argument("--per-class", type=int, default=PER_CLASS)
    ap.add_argument("--models", nargs="*", help="default: every model in MASK_MODELS present locally")
    ap.add_argument("--save-images", action="store_true", help=f"write composites and masks under {DATA_DIR}")
    ap.add_argument("--write", action="store_true", help="write masking_eval/RESULTS.md (test split only)")
    ap.add_argument("--date", default=_dt.date.today().isoformat())
    ap.add_argument("--machine", default=f"{os.cpu_count()}-core CPU ({platform.machine()})")
    ap.add_argument("--methods", nargs="*", choices=METHODS, default=list(METHODS),
                    help="a subset of the methods (u2net's click runs cost ~10 s an image on 2 cores)")
    ap.add_argument("--no-stage-timing", action="store_true",
                    help="skip the by-stage timing (3 more runs of the 1024x1024 images per model)")
    args = ap.parse_args(argv)
    METHODS = tuple(m for m in METHODS if m in args.methods)
    PAIRS = tuple(p for p in PAIRS if set(p) <= set(METHODS))
    if args.write and args.split != "test":
        ap.error("--write reports the held-out test split only")

    from trainer.dataset.masking import MASK_MODELS

    models = args.models or present_models()
    missing = [m for m in MASK_MODELS if m not in models]
    if not models:
        print("no mask model present; run scripts/fetch_offline_mask_model.py", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    samples = make_split(args.split, args.per_class)
    print(f"{len(samples)} images ({args.split}: seeds {SPLITS[args.split]}) built in {time.perf_counter() - t0:.1f}s")
    save = DATA_DIR / args.split if args.save_images else None
    rows = evaluate(samples, models, save, methods=METHODS)
    table, timing = summarize(rows, models)
    text = format_table(table, timing, models)
    paired = format_paired(paired_stats(rows, models))
    timing_text = "" if args.no_stage_timing else "\n".join(stage_timing(samples, m) for m in models)
    print(text)
    print(paired)
    print(timing_text)
    for model in models:
        for method in METHODS:
            d = table[(model, method)]
            print(f"worst {model} {method}: " + ", ".join(f"{c}={d[c][2]} ({d[c][1]:.3f})" for c in d))
    if args.write:
        write_results(text, paired + "\n\nTiming: " + timing_text, table, rows, models, missing, args)
    return 0


def write_results(text, paired, table, rows, models, missing, args):
    """Write RESULTS.md; a hand-written ``## Notes`` section already in the file is kept."""
    from trainer.dataset import masking

    out = Path(__file__).resolve().parent / "RESULTS.md"
    notes = ""
    if out.exists():
        old = out.read_text()
        if "\n## Notes" in old:
            notes = old[old.index("\n## Notes") + 1:]
    worst_lines = []
    for model in models:
        for method in METHODS:
            d = table[(model, method)]
            worst_lines.append(f"- {model}, {method}: " + "; ".join(f"{c}: `{d[c][2]}` {d[c][1]:.3f}" for c in CLASSES))
    n = len({r[2] for r in rows})
    try:
        load = "load average %.1f / %.1f / %.1f at the end (other work shared the machine)" % os.getloadavg()
    except OSError:
        load = ""
    missing_text = "none"
    if missing:
        missing_text = (", ".join(missing) + ": not on this machine and cannot be downloaded here (no network; "
                        "rembg fetches them from GitHub on first use). The script evaluates every model present: "
                        "on a connected machine, call `auto_mask(image, model=...)` once per model to download "
                        "it, then run the script again.")
    body = f"""# Automatic mask evaluation

- Date: {args.date}
- Machine: {args.machine}, onnxruntime CPU; {load}
- Commit: `{_git_commit()}` (the code measured; RESULTS.md itself is committed after it)
- Command: `python masking_eval/evaluate.py --split test --write`
- Set: held-out test split (seed {SPLITS['test'][0]}), {n} synthetic images ({args.per_class} per class), sizes
  1024x1024, 768x1024, 1024x768. All tuning used the dev split (seeds {', '.join(map(str, SPLITS['dev']))}, {len(SPLITS['dev']) * len(CLASSES) * PER_CLASS} images);
  nothing was tuned after its first run.
- Metric: IoU of (mask >= 128) against the exact ground truth (composite alpha >= 0.5). "worst" = the lowest
  single image.
- "plain rembg" = `rembg.remove(image, session=new_session(model), only_mask=True)` with rembg's defaults.
  "refined (ours)" = `trainer.dataset.masking.auto_mask(image, model, refine=True)`. "ours + one click on the subject" =
  `auto_mask(image, model, point=(x, y))` with (x, y) the subject's deepest inside point, as a user's click on the
  preview when the mask missed the subject (a click on a subject already in the mask changes nothing).
- Timing: wall-clock seconds per image including the network, sessions already loaded.

## Results

{text}

{paired}

Worst images:
{chr(10).join(worst_lines)}

Models not evaluated: {missing_text}

## The set

{__doc__[__doc__.index("The evaluation set"):__doc__.index("Seeds:")].strip()}

Images can be written out with `--save-images` (under `masking_eval/_data/`, not committed).

## What the refinement does

{masking.__doc__.split(chr(10) + chr(10), 1)[1].split(chr(10) + chr(10) + 'Models:')[0]}
"""
    out.write_text(body + ("\n" + notes if notes else ""))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
