"""``python -m trainer grow``: render candidates for the next round into a folder in the ``--dataset`` layout.

    python -m trainer grow RUN --from-checkpoint 250 --count 12 --output round2/
    python -m trainer grow RUN --reference --count 12 --output round2/            # klein, no training needed
    python -m trainer grow --reference --image me.png --caption "a photo of [trigger]" --trigger ohwx --output r2/
    # delete the candidates you don't want from round2/, then:
    python -m trainer train --dataset round2/ --preset character-rank16-500 --output runs/round2
"""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

from trainer import api
from trainer.errors import UserError


def add_parser(sub) -> None:
    grow = sub.add_parser("grow", help="render candidates of the subject (other views, poses, light) into a dataset "
                                       "folder for the next round: keep the good ones, then train --dataset on it")
    grow.add_argument("run", type=Path, nargs="?", help="a run folder (its pictures and checkpoints)")
    source = grow.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-checkpoint", type=int, metavar="STEP", help="render with the run's checkpoint of STEP")
    source.add_argument("--reference", action="store_true", help="no training: a FLUX.2 [klein] model renders the "
                        "subject of the pictures, told what to change")
    grow.add_argument("--model", default="", help="--reference: the editing model (default: FLUX.2 [klein] 4B, "
                                                   "distilled; tiny-klein to try it on a CPU)")
    grow.add_argument("--image", action="append", default=[], help="--reference without a run: a picture "
                                                                   "(repeatable); its transparency is its mask")
    grow.add_argument("--caption", default="", help="--reference without a run: the pictures' caption, with [trigger]")
    grow.add_argument("--trigger", default="", help="--reference without a run: the trigger word")
    grow.add_argument("--weight", type=float, default=1.0, help="LoRA weight (default 1.0)")
    grow.add_argument("--prompt", action="append", default=[], help="your own variation, tried first (repeatable; "
                      "[trigger] names the subject)")
    grow.add_argument("--count", type=int, default=12, help="candidates to render (default 12)")
    grow.add_argument("--seed", type=int, default=1000, help="candidate i is drawn with seed + i (default 1000)")
    grow.add_argument("--size", help="WIDTHxHEIGHT (default: the training size)")
    grow.add_argument("--sample-steps", type=int, help="denoising steps (default: the model's preview steps)")
    grow.add_argument("--memory-tier", default="auto", help="how the model is held on the GPU: auto, full, 24gb, "
                                                            "16gb or 12gb")
    grow.add_argument("--output", required=True, type=Path, help="a new folder: originals + candidates + grow.json")


def _size(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size must look like 512x512, got '{text}'.") from None
    return width, height


def _pictures(args) -> tuple:
    if not args.image:
        return ()
    if args.run:
        raise UserError("Give a run or --image pictures, not both: a run's own pictures are its references.")
    if not args.caption.strip():
        raise UserError("--image needs --caption: the caption the candidates' captions are made from.")
    loaded = api.load_images(args.image, [args.caption])
    for note in loaded.skipped:
        print(f"warning: {note}", file=sys.stderr)
    return tuple(replace(item, mask=api.choose_mask(item.image, given=item.mask).mask) for item in loaded.images)


def grow(args) -> int:
    from trainer.cli_train import ProgressLine
    from trainer.review.inference import LoraPipeline

    model = (args.model or api.default_reference_model()) if args.reference else ""
    request = api.GrowRequest(
        output=args.output, count=args.count, run=args.run, step=args.from_checkpoint, weight=args.weight,
        reference_model=model, pictures=_pictures(args), caption=args.caption, trigger=args.trigger,
        prompts=tuple(args.prompt), seed=args.seed, size=_size(args.size), sample_steps=args.sample_steps)
    plan = api.plan_grow(request, os.environ.get("HF_TOKEN"))
    progress = ProgressLine()
    progress.message(f"{len(plan.variations)} candidate(s) at {plan.settings.width}x{plan.settings.height}, "
                     f"round {plan.round}; loading {plan.model_folder.name}")
    engine = LoraPipeline.load(plan.model_folder, memory_tier=args.memory_tier)
    done = 0
    for candidate in api.grow(plan, engine, args.output):
        done += 1
        progress.message(f"candidate {done}/{len(plan.variations)}: {candidate.kind}")
        notes = "; ".join(candidate.warnings)
        print(f"{candidate.path}\t{candidate.kind}\tcopy {candidate.copy_score:.2f}\tlikeness "
              f"{candidate.likeness:.2f}" + (f"\twarning: {notes}" if notes else ""))
    print(f"note: keep the good candidates in {args.output} (delete the others, at most {api.MAX_IMAGES} pictures in "
          f"all), then: python -m trainer train --dataset {args.output} --output RUN", file=sys.stderr)
    return 0
