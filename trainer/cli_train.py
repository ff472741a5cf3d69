"""``python -m trainer train``: a new run, a prepared one (the app's multi-GPU job), or a resumed one, followed to its end.

A new run trains one picture (``--image``) or a set of up to 10 (``--image`` repeated, or ``--dataset DIR`` in the
kohya layout: ``trainer.dataset.imageset``); a set of one is exactly the one-image run.

The same decisions as the page (``trainer.api``: the config from preset + overrides, the mask and its warning), the
same job (``run_training``), its events printed as one progress line; with ``--gpus N`` it re-runs itself under
torchrun, one process per GPU (``trainer.jobs.protocol``).
"""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

from trainer import api
from trainer.errors import UserError
from trainer.runs.folder import open_run

EXIT_USER_ERROR = 2
EXIT_TRAINING_FAILED = 1


def train(args) -> int:
    import trainer.training.job  # noqa: F401  (first: it records torch's thread count before the mask model can change it)
    from trainer.training import distributed

    context = distributed.context_from_environment()
    if args.gpus > 1 and not context.enabled:
        return _relaunch_on_gpus(args.gpus)
    from trainer.jobs.protocol import EventSink, stop_check

    sink = EventSink(args.events_jsonl) if args.events_jsonl and context.is_main else None
    stop = stop_check(args.stop_file, args.parent_pid)
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


def _prepared_run(args):
    """The run folder the app created (run.json with the config, dataset/), not yet trained."""
    _refuse_settings(args, "--prepared")
    run = open_run(args.output)
    if run.status != "created" or run.checkpoints:
        raise UserError(f"The run in '{args.output}' has already started (status: {run.status}); --prepared only "
                        "starts a new one. Use --resume to continue it.")
    return run


def _prepare_new_run(args, gpus: int = 1):
    """Validate the inputs, decide each picture's mask, and create the run folder (config, every picture with its
    mask and caption, run.json); ``gpus``: the data-parallel processes that will train it."""
    from trainer.runs.folder import RunFolder

    captions = [c.strip() for c in args.caption or []]
    if args.image and args.dataset:
        raise UserError("Give the pictures with --image (repeatable) or with --dataset DIR, not both.")
    missing = [flag for flag, value in (("--image", args.image or args.dataset),
                                        ("--caption", captions or args.dataset)) if not value]
    if missing:
        raise UserError(f"train needs {' and '.join(missing)} (or --resume to continue the run in --output).")
    if args.dataset and len(captions) > 1:
        raise UserError("With --dataset, captions come from each picture's NAME.txt; give at most one --caption, "
                        "for the pictures without one.")
    # the pictures first: a bad one is the one line the user sees, before any note
    loaded = api.load_folder(args.dataset) if args.dataset else api.load_images(args.image, captions)
    for note in loaded.skipped:
        print(f"warning: {note}", file=sys.stderr)
    items = [replace(item, caption=(item.caption or (captions[0] if captions else "")).strip())
             for item in loaded.images]
    uncaptioned = [item.name for item in items if not item.caption]
    if uncaptioned:
        raise UserError(f"No caption for {', '.join(repr(n) for n in uncaptioned)}: write NAME.txt next to each "
                        "picture, or give --caption for the pictures without one.")
    if len(items) > 1 and (args.mask or args.subject_point):
        raise UserError("--mask and --subject-point are for one --image. A set's own masks go in masks/NAME.png of a "
                        "--dataset folder (or use each picture's transparency); the others are made automatically.")
    overrides = {k: v for k, v in {
        "steps": args.steps, "save_every": args.save_every, "rank": args.rank, "learning_rate": args.lr,
        "resolution": args.resolution, "seed": args.seed, "name": args.name, "batch_size": args.batch_size,
        "memory_tier": args.memory_tier, "preview_model": args.preview_model}.items() if v is not None}
    config, notice = api.training_config(api.RunRequest(
        caption=items[0].caption, preset=args.preset, trigger=args.trigger, sample_prompts=tuple(args.sample_prompt),
        model=args.model, masked=not args.no_mask, overrides=overrides, images=len(items), gpus=gpus,
        epochs=args.epochs))
    for item in items:  # a caption longer than the text encoders read: say how much is read, the rest is ignored
        for warning in api.caption_length(config.with_trigger(item.caption), config.model,
                                          config.max_text_tokens).warnings():
            print(f"warning: {item.name}: {warning}" if len(items) > 1 else f"warning: {warning}", file=sys.stderr)
    if api.time_notice(config):  # a CPU run of tiny-demo: 400 steps are about an hour, say so before it starts
        print(f"note: {api.time_notice(config)}", file=sys.stderr)
    backgrounds = api.load_user_backgrounds(args.background)
    if notice:
        print(f"note: {notice}", file=sys.stderr)
    if backgrounds and not (config.masked and config.augment_probability > 0):
        print("note: --background is used only by background augmentation, which needs the mask and an augmentation "
              "probability above 0 (this preset's is 0, or --no-mask was given).", file=sys.stderr)
    for advice in api.set_advice(items):
        print(f"advice: {advice.message}", file=sys.stderr)
    items = _choose_masks(args, items)
    try:
        run = RunFolder.create_set_at(args.output, config, items, backgrounds, gpus=gpus, lineage=loaded.lineage)
    except FileExistsError:
        raise UserError(f"The output folder '{args.output}' already exists and is not empty. Choose a new folder, "
                        "or add --resume to continue the run in it.") from None
    return run


def _choose_masks(args, items: list) -> list:
    """Each picture's training mask (None with --no-mask): --mask, the set's masks/NAME.png, the picture's
    transparency, or the automatic one, with its warning naming the file to check."""
    from trainer.dataset.masking import POINT_NOT_FOUND
    from trainer.runs.folder import dataset_files

    if args.no_mask:
        return [replace(item, mask=None) for item in items]
    out = []
    for index, item in enumerate(items):
        given = api.load_mask(args.mask, size=item.image.size) if args.mask else item.mask
        choice = api.choose_mask(item.image, given, point=args.subject_point)
        check = Path(args.output) / dataset_files(index)[1]
        of = f" of '{item.name}'" if len(items) > 1 else ""
        if choice.network:
            print(f"mask{of}: {choice.network}")
        if choice.warning == POINT_NOT_FOUND:
            print(f"warning: nothing stands out at --subject-point; the automatic mask is used: check "
                  f"{check}, or give your own with --mask.", file=sys.stderr)
        elif choice.warning:
            print(f"warning: the automatic mask{of} is unsure: check {check}, or give your own with "
                  f"{'masks/NAME.png in the --dataset folder' if of else '--mask'} (white = subject).", file=sys.stderr)
        out.append(replace(item, mask=choice.mask))
    return out


def _relaunch_on_gpus(gpus: int) -> int:
    """Run this same command once per GPU under torchrun (which sets RANK / WORLD_SIZE / LOCAL_RANK)."""
    import subprocess

    import torch

    available = torch.cuda.device_count()
    if available < gpus:
        raise UserError(f"--gpus {gpus} asks for more GPUs than this machine has ({available}).")
    from trainer.jobs.protocol import torchrun_command

    return subprocess.call(torchrun_command(gpus, sys.argv[1:]))


def _train_distributed(args, context, should_stop, sink) -> int:
    """One process of a data-parallel run: the main one creates (or, --prepared, opens) the run folder, the others
    read it."""
    from trainer.runs.folder import RunFolder

    run = None
    if context.is_main:
        run = _prepared_run(args) if args.prepared else _prepare_new_run(args, gpus=context.world_size)
    context.barrier()  # the run folder exists before any other process opens it
    if run is None:
        run = RunFolder.open(args.output)
        run.writable = False
    # the scaled learning rate is told by the loop (a Status from trainer.training.schedule.learning_rate_note)
    return _follow(run, dist=context, should_stop=should_stop, sink=sink)


def _resumed_run(args):
    from trainer.runs.lifecycle import open_for_resume

    _refuse_settings(args, "--resume")
    return open_for_resume(args.output)


def _refuse_settings(args, mode: str) -> None:
    """``mode`` trains with the settings saved in the run's run.json: any setting given on the command line is an error."""
    given = [flag for flag, value in (
        ("--image", args.image), ("--dataset", args.dataset), ("--mask", args.mask), ("--caption", args.caption),
        ("--model", args.model), ("--epochs", args.epochs), ("--batch-size", args.batch_size),
        ("--steps", args.steps), ("--save-every", args.save_every), ("--rank", args.rank), ("--lr", args.lr),
        ("--resolution", args.resolution), ("--seed", args.seed), ("--name", args.name),
        ("--preview-model", args.preview_model), ("--sample-prompt", args.sample_prompt or None),
        ("--no-mask", args.no_mask or None),
        ("--trigger", args.trigger or None)) if value is not None]
    if given:
        raise UserError(f"{mode} trains with the settings saved in the run's run.json; drop {', '.join(given)}.")


def _follow(run, resume: bool = False, dist=None, should_stop=lambda: False, sink=None) -> int:
    from trainer.events import CheckpointSaved, Failed, Finished, PreviewsRendered, Progress, Started, Status
    from trainer.training.job import run_training

    progress = ProgressLine(quiet=dist is not None and not dist.is_main)  # one progress line for N processes
    code = 0
    for event in run_training(run, should_stop=should_stop, token=os.environ.get("HF_TOKEN"), resume=resume,
                              dist=dist):
        if sink is not None:
            sink.write(event)
        if isinstance(event, Status):
            progress.message(event.message)
        elif isinstance(event, Started):
            progress.message(_started_line(event))
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


def _started_line(event) -> str:
    """What training will do: steps and size; for a set or a batch also its epochs, each picture's size, the rate."""
    if event.images == 1 and event.batch_size == 1:
        return (f"training {event.total_steps} steps at {event.train_width}x{event.train_height}, "
                f"checkpoints at {list(event.checkpoint_steps)}")
    sizes = ", ".join(f"{w}x{h}" for w, h in event.train_sizes)
    return (f"training {event.total_steps} steps = {event.epochs:g} epochs of {event.images} pictures (batch "
            f"{event.batch_size} x {event.gpus} process{'es' if event.gpus > 1 else ''} per step, learning rate "
            f"{event.learning_rate:.3g}) at {sizes}, checkpoints at {list(event.checkpoint_steps)}")


class ProgressLine:
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
