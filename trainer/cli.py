"""Headless command line: the same code path as the app, for rented GPUs, Docker and scripts.

    python -m trainer train --image PATH --caption TEXT --output DIR [options]
    python -m trainer train --output DIR --resume      (continue a stopped or killed run)
    python -m trainer train --output DIR --prepared --events-jsonl FILE --stop-file FILE   (how the app runs a
                                                       multi-GPU job: a run folder it created, events as JSON lines)
    python -m trainer mask IMAGE --output OUT.png
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
from trainer.runtime import current as current_runtime

EXIT_USER_ERROR = 2
EXIT_TRAINING_FAILED = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Train a Flux.1 LoRA from one image.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a LoRA")
    train.add_argument("--image", type=Path, help="PNG, JPEG or WEBP; a transparent PNG's alpha is its mask")
    train.add_argument("--mask", type=Path, help="black/white mask image (white = subject, trained)")
    train.add_argument("--no-mask", action="store_true", help="train on the whole image (no masked loss)")
    train.add_argument("--subject-point", type=_point, metavar="X,Y",
                       help="a pixel on the subject, for the automatic mask (see: mask --point)")
    train.add_argument("--background", type=Path, action="append", default=[], metavar="IMAGE",
                       help="a photo of your own for background augmentation: the subject is pasted onto it in some "
                            "steps (repeatable, at most 6)")
    train.add_argument("--caption", help="caption; [trigger] is replaced by the trigger word")
    train.add_argument("--trigger", default="", help="trigger word, e.g. ohwx")
    train.add_argument("--preset", default="character-rank4-400", help="preset name (see: python -m trainer presets)")
    train.add_argument("--model", help="tiny-demo, a Hugging Face id, or a local diffusers folder "
                                        "(default: FLUX.1-dev with a CUDA GPU, otherwise tiny-demo)")
    train.add_argument("--steps", type=int)
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
    train.add_argument("--gpus", type=int, default=1,
                       help="data-parallel GPUs (batch 1 on each; learning rate x sqrt(N)); runs itself under torchrun")
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
    mask.add_argument("--model", default="u2netp", help="background-removal model (u2netp works offline)")
    mask.add_argument("--point", type=_point, metavar="X,Y",
                      help="a pixel on the subject, for when the automatic mask picks something else or nothing")

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
                      "change, back view, other clothes, watercolor, short / medium / long)")
    grid.add_argument("--checkpoints", help="checkpoint steps to show, e.g. 250,500 (default: all)")
    grid.add_argument("--size", help="WIDTHxHEIGHT of each image (default: the training size)")
    grid.add_argument("--sample-steps", type=int, help="denoising steps (default: the run's preview steps)")
    grid.add_argument("--cell-size", type=int, help="scale cells in the PNG to this many pixels (default: full size)")
    grid.add_argument("--memory-tier", default="auto", help="how the base model is held on the GPU: auto (default: "
                                                           "picked from the GPU, as for training), full, 24gb, 16gb or 12gb")
    grid.add_argument("--output", required=True, type=Path,
                      help="grid.png; several prompts write grid-1.png, grid-2.png, ...")
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
        if args.command == "export":
            return _export(args)
        if args.command == "grid":
            return _grid(args)
        return _train(args)
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
    from trainer.dataset.masking import POINT_NOT_FOUND, WARNING_KEY

    image = api.load_image(args.image)
    out = api.cut_out(image, model=args.model, point=args.point)
    _write_png(out, args.output)
    print(args.output)
    warning = out.info.get(WARNING_KEY)
    if warning == POINT_NOT_FOUND:
        print(f"warning: nothing stands out at --point {args.point[0]:g},{args.point[1]:g}; the mask in {args.output} "
              "is the automatic one. Paint a black/white mask (white = subject) and train with --mask.",
              file=sys.stderr)
    elif warning:
        print(f"warning: the automatic mask is unsure: check {args.output} (its alpha is the mask), or paint a "
              "black/white mask (white = subject) and train with --mask.", file=sys.stderr)
    return 0


def _export(args) -> int:
    from trainer.review.export import export_lora

    print(export_lora(args.checkpoint, args.format, args.output))
    return 0


def _grid(args) -> int:
    from trainer.review.grid import GridImages, GridSpec, output_paths, parse_numbers, plan_grid, render_grid, suggest_prompts
    from trainer.review.inference import LoraPipeline, base_model_folder

    run = _open_run(args.run)
    prompts = list(args.prompt) or list(run.config.preview_prompts)
    if args.suggested:
        prompts += [s.text for s in suggest_prompts(run.config)]
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
    progress = _ProgressLine()
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


def _open_run(path: Path):
    from trainer.runs.folder import MANIFEST, RunFolder

    if not (Path(path) / MANIFEST).is_file():
        raise UserError(f"'{path}' is not a run folder: it has no {MANIFEST}.")
    try:
        return RunFolder.open(path)
    except (ValueError, KeyError) as err:
        raise UserError(f"The run's {MANIFEST} in '{path}' could not be read ({err}).") from None


def _train(args) -> int:
    import trainer.training.job  # noqa: F401  (first: it records torch's thread count before the mask model can change it)
    from trainer.training import distributed

    context = distributed.context_from_environment()
    if args.gpus > 1 and not context.enabled:
        return _relaunch_on_gpus(args.gpus)
    sink = _EventSink(args.events_jsonl) if args.events_jsonl and context.is_main else None
    stop = _stop_check(args.stop_file, args.parent_pid)
    try:
        if args.resume and args.prepared:
            raise UserError("--resume continues a run that has started; --prepared starts a prepared one: pick one.")
        if context.enabled:
            if args.resume:
                raise UserError("--resume continues a run on one GPU: drop --gpus (and don't launch it with torchrun).")
            distributed.initialise(context)
            try:
                return _train_distributed(args, context, stop, sink)
            finally:
                distributed.shutdown(context)
        if args.resume:
            return _follow(_resumed_run(args), resume=True, should_stop=stop, sink=sink)
        run = _prepared_run(args) if args.prepared else _prepare_new_run(args)
        return _follow(run, should_stop=stop, sink=sink)
    except UserError as err:
        if sink is not None:  # the app reading the events learns why, in the same words
            from trainer.events import Failed

            sink.write(Failed(str(err), "user"))
        raise
    finally:
        if sink is not None:
            sink.close()


class _EventSink:
    """Every event as one JSON line, flushed at once, so a reader tailing the file sees it as it happens."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", encoding="utf-8")

    def write(self, event) -> None:
        from trainer.events import to_json_line

        self._file.write(to_json_line(event))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _stop_check(stop_file: Path | None, parent_pid: int | None):
    """``should_stop`` for this process: the stop file exists, or the app that started the job has ended."""
    def should_stop() -> bool:
        if stop_file is not None and stop_file.exists():
            return True
        if parent_pid:
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:  # alive, someone else's
                pass
        return False
    return should_stop


def _prepared_run(args):
    """The run folder the app created (run.json with the config, dataset/), not yet trained."""
    _refuse_settings(args, "--prepared")
    run = _open_run(args.output)
    if run.status != "created" or run.checkpoints:
        raise UserError(f"The run in '{args.output}' has already started (status: {run.status}); --prepared only "
                        "starts a new one. Use --resume to continue it.")
    return run


def _prepare_new_run(args, gpus: int = 1):
    """Validate the inputs, decide the mask, and create the run folder (config, image, mask, run.json); ``gpus``:
    the data-parallel processes that will train it."""
    from trainer.dataset.masking import POINT_NOT_FOUND
    from trainer.runs.folder import RunFolder

    missing = [flag for flag, value in (("--image", args.image), ("--caption", args.caption)) if value is None]
    if missing:
        raise UserError(f"train needs {' and '.join(missing)} (or --resume to continue the run in --output).")
    overrides = {k: v for k, v in {
        "steps": args.steps, "save_every": args.save_every, "rank": args.rank, "learning_rate": args.lr,
        "resolution": args.resolution, "seed": args.seed, "name": args.name,
        "memory_tier": args.memory_tier}.items() if v is not None}
    config, notice = api.training_config(api.RunRequest(
        caption=args.caption, preset=args.preset, trigger=args.trigger, sample_prompts=tuple(args.sample_prompt),
        model=args.model, masked=not args.no_mask, overrides=overrides))
    image = api.load_image(args.image)  # a bad image is the one line the user sees, before any note
    backgrounds = api.load_user_backgrounds(args.background)
    if notice:
        print(f"note: {notice}", file=sys.stderr)
    if backgrounds and not (config.masked and config.augment_probability > 0):
        print("note: --background is used only by background augmentation, which needs the mask and an augmentation "
              "probability above 0 (this preset's is 0, or --no-mask was given).", file=sys.stderr)
    mask = None
    if not args.no_mask:
        given = api.load_mask(args.mask, size=image.size) if args.mask else None
        choice = api.choose_mask(image, given, point=args.subject_point)
        mask = choice.mask
        if choice.warning == POINT_NOT_FOUND:
            print(f"warning: nothing stands out at --subject-point; the automatic mask is used: check "
                  f"{Path(args.output) / 'dataset' / 'mask.png'}, or give your own with --mask.", file=sys.stderr)
        elif choice.warning:
            print(f"warning: the automatic mask is unsure: check {Path(args.output) / 'dataset' / 'mask.png'}, "
                  "or give your own with --mask (white = subject).", file=sys.stderr)
    try:
        run = RunFolder.create_at(args.output, config, image, mask, backgrounds, gpus=gpus)
    except FileExistsError:
        raise UserError(f"The output folder '{args.output}' already exists and is not empty. Choose a new folder, "
                        "or add --resume to continue the run in it.") from None
    return run


def _relaunch_on_gpus(gpus: int) -> int:
    """Run this same command once per GPU under torchrun (which sets RANK / WORLD_SIZE / LOCAL_RANK)."""
    import subprocess

    import torch

    available = torch.cuda.device_count()
    if available < gpus:
        raise UserError(f"--gpus {gpus} asks for more GPUs than this machine has ({available}).")
    return subprocess.call(torchrun_command(gpus, sys.argv[1:]))


def torchrun_command(processes: int, trainer_args: list[str]) -> list[str]:
    """``python -m trainer <trainer_args>`` once per process under torchrun (which sets RANK / WORLD_SIZE / LOCAL_RANK)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "trainer", *trainer_args]


def _train_distributed(args, context, should_stop, sink) -> int:
    """One process of a data-parallel run: the main one creates (or, --prepared, opens) the run folder, the others
    read it."""
    from trainer.training.distributed import scaled_learning_rate
    from trainer.runs.folder import RunFolder

    run = None
    if context.is_main:
        run = _prepared_run(args) if args.prepared else _prepare_new_run(args, gpus=context.world_size)
    context.barrier()  # the run folder exists before any other process opens it
    if run is None:
        run = RunFolder.open(args.output)
        run.writable = False
    else:
        lr = run.config.learning_rate
        unit = "GPUs" if context.device.type == "cuda" else "processes"
        print(f"{context.world_size} {unit}, batch 1 on each: learning rate {lr:g} x sqrt({context.world_size}) = "
              f"{scaled_learning_rate(lr, context.world_size):.3g}", file=sys.stderr)
    return _follow(run, dist=context, should_stop=should_stop, sink=sink)


def _resumed_run(args):
    from trainer.runs.lifecycle import open_for_resume

    _refuse_settings(args, "--resume")
    return open_for_resume(args.output)


def _refuse_settings(args, mode: str) -> None:
    """``mode`` trains with the settings saved in the run's run.json: any setting given on the command line is an error."""
    given = [flag for flag, value in (
        ("--image", args.image), ("--mask", args.mask), ("--caption", args.caption), ("--model", args.model),
        ("--steps", args.steps), ("--save-every", args.save_every), ("--rank", args.rank), ("--lr", args.lr),
        ("--resolution", args.resolution), ("--seed", args.seed), ("--name", args.name),
        ("--sample-prompt", args.sample_prompt or None), ("--no-mask", args.no_mask or None),
        ("--trigger", args.trigger or None)) if value is not None]
    if given:
        raise UserError(f"{mode} trains with the settings saved in the run's run.json; drop {', '.join(given)}.")


def _follow(run, resume: bool = False, dist=None, should_stop=lambda: False, sink=None) -> int:
    from trainer.events import CheckpointSaved, Failed, Finished, PreviewsRendered, Progress, Started, Status
    from trainer.training.job import run_training

    progress = _ProgressLine(quiet=dist is not None and not dist.is_main)  # one progress line for N processes
    code = 0
    for event in run_training(run, should_stop=should_stop, token=os.environ.get("HF_TOKEN"), resume=resume,
                              dist=dist):
        if sink is not None:
            sink.write(event)
        if isinstance(event, Status):
            progress.message(event.message)
        elif isinstance(event, Started):
            progress.message(f"training {event.total_steps} steps at {event.train_width}x{event.train_height}, "
                             f"checkpoints at {list(event.checkpoint_steps)}")
        elif isinstance(event, Progress):
            progress.bar(event)
        elif isinstance(event, CheckpointSaved):
            progress.message(f"saved {event.path} ({event.size_bytes / 1e6:.1f} MB)")
        elif isinstance(event, PreviewsRendered):
            progress.message(f"previews for step {event.step}: " + ", ".join(str(p.path.name) for p in event.previews))
        elif isinstance(event, Finished):
            progress.message(("stopped" if event.stopped else "finished") + f" at step {event.last_step}: {event.run_dir}")
        elif isinstance(event, Failed):
            progress.message("")
            print(f"error: {event.message}", file=sys.stderr)
            code = EXIT_USER_ERROR if event.kind == "user" else EXIT_TRAINING_FAILED
    if not progress.quiet:
        print(run.path)
    return code


class _ProgressLine:
    """A one-line progress bar on stderr; messages go above it."""

    def __init__(self, quiet: bool = False) -> None:
        self._tty = sys.stderr.isatty()
        self._last = 0
        self.quiet = quiet

    def message(self, text: str) -> None:
        if self.quiet:
            return
        if self._tty:
            sys.stderr.write("\r\033[K")
        if text:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def bar(self, p) -> None:
        if self.quiet:
            return
        width = 30
        done = int(width * p.step / p.total_steps)
        line = (f"[{'#' * done}{'.' * (width - done)}] {p.step}/{p.total_steps} loss {p.loss:.4f} "
                f"{p.steps_per_second:.2f} it/s ETA {int(p.eta_seconds) // 60}:{int(p.eta_seconds) % 60:02d}")
        if self._tty:
            sys.stderr.write("\r\033[K" + line)
        elif p.step == p.total_steps or p.step - self._last >= max(1, p.total_steps // 20):
            sys.stderr.write(line + "\n")  # a log file gets ~20 lines, not thousands
            self._last = p.step
        sys.stderr.flush()


def _write_png(image, path: Path) -> None:
    import io

    from trainer.fsutil import atomic_write_bytes

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    try:
        atomic_write_bytes(Path(path), buf.getvalue())
    except OSError as err:
        raise UserError(f"Could not write '{path}': {err.strerror or err}.") from None
