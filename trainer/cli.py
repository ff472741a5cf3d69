"""Headless command line: the same code path as the app, for rented GPUs, Docker and scripts.

    python -m trainer train --image PATH --caption TEXT --output DIR [options]
    python -m trainer train --image A --image B ... | --dataset DIR  (a set of up to 10 pictures) --output DIR
    python -m trainer train --output DIR --resume      (continue a stopped or killed run)
    python -m trainer train --output DIR --prepared --events-jsonl FILE --stop-file FILE   (how the app runs a
                                                       multi-GPU job: a run folder it created, events as JSON lines)
    python -m trainer mask IMAGE --output OUT.png
    python -m trainer caption IMAGE... [--model ID] [--trigger WORD]   (writes NAME.txt next to each picture)
    python -m trainer presets
    python -m trainer export CHECKPOINT --format kohya|diffusers --output FILE
    python -m trainer grid RUN_DIR --seeds 1,2 --weights 0.5,1.0 [--prompt TEXT]... --output grid.png

A problem the user can fix prints one line on stderr and exits with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from trainer import api
from trainer.errors import UserError
from trainer.cli_train import EXIT_USER_ERROR
from trainer.runtime import current as current_runtime


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Train a Flux LoRA from one image, or a few.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a LoRA")
    train.add_argument("--image", type=Path, action="append",
                       help="PNG, JPEG or WEBP; a transparent PNG's alpha is its mask. Repeat it for a set of up to 10 "
                            "pictures of the subject (4 from different angles make a character more poseable)")
    train.add_argument("--dataset", type=Path, metavar="DIR",
                       help="a set of up to 10 pictures in the kohya layout: NAME.png with its caption in NAME.txt and "
                            "an optional mask in masks/NAME.png (else its transparency, else the automatic mask); "
                            "--caption is the caption of pictures without a NAME.txt")
    train.add_argument("--mask", type=Path, help="black/white mask image (white = subject, trained); one --image only")
    train.add_argument("--no-mask", action="store_true", help="train on the whole image (no masked loss)")
    train.add_argument("--subject-point", type=_point, metavar="X,Y",
                       help="a pixel on the subject, for the automatic mask (see: mask --point)")
    train.add_argument("--background", type=Path, action="append", default=[], metavar="IMAGE",
                       help="a photo of your own for background augmentation: the subject is pasted onto it in some "
                            "steps (repeatable, at most 6)")
    train.add_argument("--caption", action="append",
                       help="caption; [trigger] is replaced by the trigger word. With several --image: once for all, "
                            "or once per image in the same order")
    train.add_argument("--trigger", default="", help="trigger word, e.g. ohwx (shared by every picture of a set)")
    train.add_argument("--preset", default="character-rank4-400", help="preset name (see: python -m trainer presets)")
    train.add_argument("--model", help="shapes-demo or tiny-demo (built in), a Hugging Face id, or a local diffusers "
                                        "folder (default: FLUX.1-dev with a CUDA GPU, otherwise shapes-demo)")
    train.add_argument("--steps", type=int, help="optimizer steps (checkpoints are named by step)")
    train.add_argument("--epochs", type=float, help="the length in epochs instead of steps: each picture of the set "
                                                     "seen EPOCHS times (steps = images x epochs / (batch size x GPUs))")
    train.add_argument("--batch-size", type=int,
                       help="pictures per step on each GPU (default 1, which trains best: each picture gets its own "
                            "update; a larger batch is faster per epoch and scales the learning rate by sqrt(batch))")
    train.add_argument("--save-every", type=int)
    train.add_argument("--rank", type=int)
    train.add_argument("--lr", type=float, help="learning rate")
    train.add_argument("--resolution", type=int, help="training area is RESOLUTION x RESOLUTION pixels (default 512)")
    train.add_argument("--sample-prompt", action="append", default=[], help="extra preview prompt (repeatable)")
    train.add_argument("--seed", type=int)
    train.add_argument("--name", help="checkpoint file prefix (default: lora)")
    train.add_argument("--output", required=True, type=Path, help="run folder (created; must be new or empty)")
    train.add_argument("--memory-tier", help="GPU memory tier: auto (default: picked from the GPU), full, 24gb, 16gb or "
                                              "12gb (presets/memory/: fp8/NF4 weights, gradient checkpointing)")
    train.add_argument("--preview-model", metavar="MODEL",
                       help="FLUX.2 [klein] only: draw the previews with this model of the same architecture, the "
                            "LoRA copied in each round — its distilled model, black-forest-labs/FLUX.2-klein-4B (4 "
                            "steps, guidance 1), or a local folder of it (default: the base model being trained)")
    train.add_argument("--gpus", type=int, default=1,
                       help="data-parallel GPUs (each trains --batch-size pictures per step; learning rate x "
                            "sqrt(N x batch)); runs itself under torchrun")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --output from its newest checkpoint, with the settings in its run.json")
    train.add_argument("--prepared", action="store_true",
                       help="train the run folder in --output that is prepared but not started (its run.json and "
                            "dataset/, as the app creates them), with the settings in its run.json")
    train.add_argument("--events-jsonl", type=Path, metavar="FILE",
                       help="append every training event to FILE as one JSON line, flushed (main process only)")
    train.add_argument("--stop-file", type=Path, metavar="FILE",
                       help="stop after the current step (keeping what was saved) once FILE exists")
    train.add_argument("--parent-pid", type=int, metavar="PID",
                       help="stop as with --stop-file when process PID has ended (the app that started the job)")

    mask = sub.add_parser("mask", help="cut out the subject: write an RGBA PNG whose alpha is the mask")
    mask.add_argument("image", type=Path)
    mask.add_argument("--output", required=True, type=Path)
    mask.add_argument("--model", default=None,
                      help="background-removal model (default: u2net when installed, else u2netp; both work offline)")
    mask.add_argument("--point", type=_point, metavar="X,Y",
                      help="a pixel on the subject, for when the automatic mask picks something else or nothing")

    caption = sub.add_parser("caption", help="write a detailed caption NAME.txt next to each picture (Florence-2), "
                                             "the layout train --dataset DIR reads")
    caption.add_argument("images", type=Path, nargs="+", metavar="IMAGE",
                         help="PNG, JPEG or WEBP pictures, or a folder of them")
    caption.add_argument("--model", default=None,
                         help="florence-community/Florence-2-base (default), 'large' (Florence-2-large), another "
                              "Hub id of a transformers-native Florence-2, a local folder of one, or tiny-caption")
    caption.add_argument("--trigger", default="", help="write this word where the subject is named (default: the "
                                                        "[trigger] placeholder, which train --trigger fills in)")
    caption.add_argument("--max-tokens", type=int, default=None,
                         help="the longest caption, in tokens (default 384; a detailed caption is about 60-120)")
    caption.add_argument("--overwrite", action="store_true", help="replace NAME.txt files that exist (default: "
                                                                  "keep them, they may hold your edits)")

    sub.add_parser("presets", help="list presets and their settings")

    export = sub.add_parser("export", help="write a checkpoint in the kohya/ComfyUI or diffusers layout")
    export.add_argument("checkpoint", type=Path, help="a checkpoint .safetensors from a run folder")
    export.add_argument("--format", required=True, choices=("kohya", "diffusers"),
                        help="kohya: ComfyUI, Forge, sd-scripts; diffusers: FluxPipeline.load_lora_weights")
    export.add_argument("--output", required=True, type=Path, help="the .safetensors file to write")

    grid = sub.add_parser("grid", help="checkpoint x seed comparison grid (base model first), one PNG per prompt")
    grid.add_argument("run", type=Path, help="a run folder (holds run.json)")
    grid.add_argument("--seeds", default="1,2", help="rows, e.g. 1,2,3,4 (default 1,2)")
    grid.add_argument("--weights", default="1.0", help="LoRA weights, e.g. 0.5,1.0 (each a row per seed)")
    grid.add_argument("--prompt", action="append", default=[], help="prompt (repeatable; [trigger] is replaced); "
                      "default: the run's preview prompts")
    grid.add_argument("--suggested", action="store_true", help="add the suggested test prompts (caption, a colour "
                      "change, the views the captions do not show, other clothes, watercolor, short / medium / long)")
    grid.add_argument("--checkpoints", help="checkpoint steps to show, e.g. 250,500 (default: all)")
    grid.add_argument("--size", help="WIDTHxHEIGHT of each image (default: the training size)")
    grid.add_argument("--sample-steps", type=int, help="denoising steps (default: the run's preview steps)")
    grid.add_argument("--cell-size", type=int, help="scale cells in the PNG to this many pixels (default: full size)")
    grid.add_argument("--memory-tier", default="auto", help="how the base model is held on the GPU: auto (default: "
                                                           "picked from the GPU, as for training), full, 24gb, 16gb or 12gb")
    grid.add_argument("--output", required=True, type=Path,
                      help="grid.png; several prompts write grid-1.png, grid-2.png, ...")
    from trainer.cli_grow import add_parser as add_grow

    add_grow(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    api.quiet_libraries()
    try:
        current_runtime()  # every switch read from the environment once, now (a bad value is a UserError)
        if args.command == "presets":
            return _presets()
        if args.command == "mask":
            return _mask(args)
        if args.command == "caption":
            return _caption(args)
        if args.command == "export":
            return _export(args)
        if args.command == "grid":
            return _grid(args)
        if args.command == "grow":
            from trainer.cli_grow import grow

            return grow(args)
        from trainer.cli_train import train

        return train(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _presets() -> int:
    from trainer.config import list_presets

    for preset in list_presets():
        settings = ", ".join(f"{k}={v}" for k, v in preset.settings.items())
        print(f"{preset.name}\n    {preset.description}\n    {settings}")
    return 0


def _point(text: str) -> tuple[float, float]:
    """``X,Y`` (pixels of the image, from its top left corner) for --point / --subject-point."""
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y in pixels, such as 512,300; got '{text}'") from None
    return x, y


def _mask(args) -> int:
    from trainer.dataset.masking import NETWORK_KEY, POINT_NOT_FOUND, WARNING_KEY

    image = api.load_image(args.image)
    out = api.cut_out(image, model=args.model, point=args.point)
    _write_png(out, args.output)
    print(args.output)
    # stdout stays the one path (scripts read it); which network made the mask goes beside the warnings
    print(f"mask: {out.info.get(NETWORK_KEY)}", file=sys.stderr)
    warning = out.info.get(WARNING_KEY)
    if warning == POINT_NOT_FOUND:
        print(f"warning: nothing stands out at --point {args.point[0]:g},{args.point[1]:g}; the mask in {args.output} "
              "is the automatic one. Paint a black/white mask (white = subject) and train with --mask.",
              file=sys.stderr)
    elif warning:
        print(f"warning: the automatic mask is unsure: check {args.output} (its alpha is the mask), or paint a "
              "black/white mask (white = subject) and train with --mask.", file=sys.stderr)
    return 0


def _caption(args) -> int:
    from trainer.dataset.imageset import IMAGE_SUFFIXES
    from trainer.fsutil import atomic_write_bytes

    pictures: list[Path] = []
    for path in args.images:
        if path.is_dir():
            pictures += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            pictures.append(path)
    todo = [p for p in pictures if args.overwrite or not p.with_suffix(".txt").exists()]
    for kept in sorted(set(pictures) - set(todo)):
        print(f"kept {kept.with_suffix('.txt')} (it exists; --overwrite replaces it)", file=sys.stderr)
    if not todo:
        return 0
    images = [api.load_image(p, what=f"image '{p.name}'") for p in todo]
    captions = api.caption_images(images, model=args.model or api.DEFAULT_CAPTION_MODEL,
                                  trigger=args.trigger or api.TRIGGER_PLACEHOLDER, progress=_caption_progress(),
                                  token=os.environ.get("HF_TOKEN"),
                                  **({"max_new_tokens": args.max_tokens} if args.max_tokens else {}))
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
    for picture, text in zip(todo, captions):
        target = picture.with_suffix(".txt")
        try:
            atomic_write_bytes(target, (text + "\n").encode("utf-8"))
        except OSError as err:
            raise UserError(f"Could not write '{target}': {err.strerror or err}.") from None
        print(f"{target}: {text}")
    return 0


def _caption_progress():
    """Progress on stderr: one line rewritten in place on a terminal; in a log, each new stage and every tenth of a
    download."""
    last = {"stage": "", "tenth": -1}

    def show(fraction: float, message: str) -> None:
        if sys.stderr.isatty():
            sys.stderr.write("\r\033[K" + message)
        else:
            stage, tenth = message.split(":")[0], int(fraction * 10)
            if stage == last["stage"] and tenth == last["tenth"]:
                return
            last.update(stage=stage, tenth=tenth)
            sys.stderr.write(message + "\n")
        sys.stderr.flush()

    return show


def _export(args) -> int:
    from trainer.review.export import export_lora

    print(export_lora(args.checkpoint, args.format, args.output))
    return 0


def _grid(args) -> int:
    from trainer.cli_train import ProgressLine, open_run
    from trainer.review.grid import GridImages, GridSpec, output_paths, parse_numbers, plan_grid, render_grid
    from trainer.review.prompts import suggest_prompts
    from trainer.review.inference import LoraPipeline, base_model_folder

    run = open_run(args.run)
    prompts = list(args.prompt) or list(run.config.preview_prompts)
    if args.suggested:
        prompts += [s.text for s in suggest_prompts(run.config, run.captions())]
    width = height = None
    if args.size:
        try:
            width, height = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            raise UserError(f"--size must look like 512x512, got '{args.size}'.") from None
    spec = GridSpec(prompts=tuple(prompts), seeds=parse_numbers(args.seeds, int, "seeds"),
                    weights=parse_numbers(args.weights, float, "LoRA weights"),
                    steps=parse_numbers(args.checkpoints, int, "checkpoint steps") if args.checkpoints else None,
                    width=width, height=height, sample_steps=args.sample_steps)
    plan = plan_grid(run, spec)
    progress = ProgressLine()
    progress.message(f"{len(plan.prompts)} prompt(s) x {len(plan.rows)} row(s) x {len(plan.columns)} column(s) "
                     f"at {plan.settings.width}x{plan.settings.height}; loading the base model")
    engine = LoraPipeline.load(base_model_folder(run, os.environ.get("HF_TOKEN")), memory_tier=args.memory_tier)
    grids = GridImages(plan, cell_size=args.cell_size)
    paths = output_paths(args.output, len(plan.prompts))
    for row in render_grid(engine, plan):
        grids.add(row)
        progress.message(f"prompt {row.prompt_index + 1}/{len(plan.prompts)}, row {row.row_index + 1}/"
                         f"{len(plan.rows)}: {row.done_cells}/{row.total_cells} images")
        if row.row_index == len(plan.rows) - 1:
            _write_png(grids.compose(row.prompt_index)[0], paths[row.prompt_index])
            print(paths[row.prompt_index])
    return 0


def _write_png(image, path: Path) -> None:
    import io

    from trainer.fsutil import atomic_write_bytes

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    try:
        atomic_write_bytes(Path(path), buf.getvalue())
    except OSError as err:
        raise UserError(f"Could not write '{path}': {err.strerror or err}.") from None
