#!/usr/bin/env python
"""Measure the automatic mask's "unsure" warning: how often it fires on good masks and on bad ones.

For every image of a split (``evaluate.py``'s synthetic set, with exact ground truth) this runs the shipped
pipeline's parts (the network's TTA members, the fallback, the refinement), records the refined mask's IoU and
the candidate confidence features, and caches them under ``masking_eval/_data/confidence-<split>.json``. Then
it reports, for the rule in ``trainer.dataset.masking.confidence`` (and for the old rule), the share of good
masks (IoU >= 0.9) and of bad masks (IoU < 0.5) it fires on. Real photos (scikit-image's astronaut, coffee,
chelsea: no ground truth, the masks judged good by eye) are listed with their features too.

Tune on ``dev`` only; report on a held-out seed no earlier change has seen (``test9`` for the rule's first choice on
u2netp, ``test11`` for u2net as the default network).

Usage:
    python masking_eval/confidence.py --split dev [--model u2net]
    python masking_eval/confidence.py --split test11 [--model u2net]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import evaluate as ev  # noqa: E402

from trainer.dataset.masking import confidence as conf  # noqa: E402
from trainer.dataset.masking.network import network_maps  # noqa: E402
from trainer.dataset.masking.refine import refine_mask  # noqa: E402

GOOD, BAD = 0.9, 0.5
PHOTOS = ("astronaut", "coffee", "chelsea")


def features(rgb: np.ndarray, model: str) -> tuple[dict, np.ndarray]:
    """The candidate features of ``model``'s answer for ``rgb``, and the refined mask (uint8)."""
    maps = network_maps(rgb, model)
    total = sum(w for _, w in maps)
    fused = (sum(m * w for m, w in maps) / total).astype(np.float32)
    prob, widened = conf.widen_if_empty(fused)
    mask = refine_mask(rgb, prob)
    f = {"widened": widened, "fused_decisiveness": conf.decisiveness(prob)}
    f.update(conf.map_features([m for m, _ in maps], prob))
    return f, mask


def collect(split: str, per_class: int, model: str) -> list[dict]:
    rows = []
    samples = ev.make_split(split, per_class)
    t0 = time.perf_counter()
    for i, s in enumerate(samples):
        f, mask = features(s.rgb, model)
        rows.append({"name": s.name, "cls": s.cls, "iou": ev.iou(mask, s.gt), **f})
        print(f"{i + 1}/{len(samples)} {s.name} iou {rows[-1]['iou']:.3f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    return rows


def photos(model: str) -> list[dict]:
    import skimage.data

    rows = []
    for name in PHOTOS:
        f, _ = features(np.ascontiguousarray(getattr(skimage.data, name)()[..., :3]), model)
        rows.append({"name": name, **f})
    return rows


def rates(rows: list[dict], fires) -> str:
    good = [r for r in rows if r["iou"] >= GOOD]
    bad = [r for r in rows if r["iou"] < BAD]
    mid = [r for r in rows if BAD <= r["iou"] < GOOD]
    fg, fb, fm = (sum(bool(fires(r)) for r in g) for g in (good, bad, mid))
    return (f"fires on {fb}/{len(bad)} bad (IoU < {BAD}), {fm}/{len(mid)} middling, {fg}/{len(good)} good "
            f"(IoU >= {GOOD}); all {sum(bool(fires(r)) for r in rows)}/{len(rows)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", choices=sorted(ev.SPLITS), default="dev")
    ap.add_argument("--per-class", type=int, default=ev.PER_CLASS)
    ap.add_argument("--model", default="u2netp", help="the network measured (u2netp, u2net)")
    ap.add_argument("--fresh", action="store_true", help="recompute even when the cache exists")
    args = ap.parse_args(argv)
    # u2netp keeps the cache name it had before other networks were measured
    suffix = "" if args.model == "u2netp" else f"-{args.model}"
    cache = ev.DATA_DIR / f"confidence-{args.split}{suffix}.json"
    if cache.exists() and not args.fresh:
        data = json.loads(cache.read_text())
    else:
        data = {"images": collect(args.split, args.per_class, args.model), "photos": photos(args.model)}
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(data, indent=1))
    rows = data["images"]
    old = lambda r: r["widened"] or r["fused_decisiveness"] < 0.85  # noqa: E731  (the rule before 2026-12-03)
    new = lambda r: conf.is_unsure(r["widened"], r, args.model)  # noqa: E731
    print(f"{args.split}, {args.model}: {len(rows)} images")
    print("old rule (widened or fused decisiveness < 0.85):", rates(rows, old))
    print("new rule (confidence.is_unsure):                ", rates(rows, new))
    for r in data["photos"]:
        print(f"photo {r['name']}: old fires {bool(old(r))}, new fires {bool(new(r))}; "
              + ", ".join(f"{k} {v:.3f}" for k, v in r.items() if isinstance(v, float)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
