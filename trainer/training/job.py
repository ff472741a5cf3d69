"""One training job from start to end: resolve the model, load it, encode, train; every failure an event.

``run_training`` is what both the app's worker thread and the CLI call. It never raises for a problem
the user can act on: those become a ``Failed`` event with a message, and the checkpoints already saved
stay where they are.

run.json: ``run_training`` records every event in it (``trainer.runs.recorder.RunRecorder``) before yielding the
event, and nothing else in the job writes it; the facts travel in the events (``Placed``, ``Started``,
``CheckpointSaved``, ...). At the start of a resumed job ``lifecycle.prepare_resume`` tidies the folder first.
"""
from __future__ import annotations

import gc
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from trainer.runs import diskspace, lifecycle
from trainer.runs.recorder import RunRecorder
from trainer.config import list_presets
from trainer.dataset.augment import user_backgrounds, with_background_bank
from trainer.training.distributed import DistributedContext
from trainer.training.schedule import epochs_at_step, scaled_learning_rate
from trainer.training.encode import encode_example, encode_prompts, free_encoders
from trainer.dataset.prepare import prepare_image
from trainer.errors import UserError
from trainer.events import (CheckpointSaved, Event, Failed, LossHistory, Placed, Preview, PreviewsRendered, Started,
                            Status)
from trainer.training.loop import train_lora
from trainer.families import family_of_folder
from trainer.model.tiers import choose_tier
from trainer.model.loading import (fp8_matmuls_apply, is_tiny_demo, load_parts, pick_device, place_transformer,
                                   resolve_model)
from trainer.runs.folder import RunFolder
from trainer.training.preview_model import check_preview_folder, load_preview_model
from trainer.training.previews import PreviewRenderer

log = logging.getLogger(__name__)
# torch's CPU thread count as the process started, read before anything can change it: running the
# background-removal model (onnxruntime) resets OpenMP's thread count for the whole process, and a different
# count sums in a different order — a resumed run would then drift from an uninterrupted one by an ulp.
TRAINING_THREADS = torch.get_num_threads()


def _memory_key(settings) -> tuple:
    """Orders setups by training memory: gradient checkpointing matters most, then resolution, then rank."""
    get = settings.get if isinstance(settings, dict) else lambda k, d=None: getattr(settings, k, d)
    return (not get("gradient_checkpointing", False), get("resolution", 512), get("rank", 4))


def oom_advice(cfg, tier: str | None = None) -> str:
    """The out-of-memory message: the next smaller memory tier than ``tier`` where there is one, else a smaller preset."""
    from trainer.model.tiers import list_tiers

    try:
        tiers = list_tiers()  # largest card first
        names = [t.name for t in tiers]
        smaller_tiers = tiers[names.index(tier) + 1:] if tier in names else []
    except Exception:  # a broken tiers folder must not hide the real failure
        smaller_tiers = []
    if smaller_tiers:
        pick = smaller_tiers[0]
        return (f"The GPU ran out of memory with the '{tier}' memory tier. Pick the '{pick.name}' tier in the settings "
                f"({pick.description}), or close other programs using the GPU. The checkpoints saved so far are kept, "
                "and the GPU memory was released.")
    try:
        presets = sorted(list_presets(), key=lambda p: _memory_key(p.settings))
    except Exception:  # a broken presets folder must not hide the real failure
        presets = []
    smaller = [p for p in presets if _memory_key(p.settings) < _memory_key(cfg)]
    if smaller:
        pick = smaller[0]
        preset = (f"Pick a smaller-memory preset such as '{pick.name}' (rank {pick.settings.get('rank')}, "
                  f"{pick.settings.get('resolution', 512)} px"
                  f"{', gradient checkpointing' if pick.settings.get('gradient_checkpointing') else ''})")
    else:
        lowest = presets[0].name if presets else "character-rank4-400"
        preset = (f"Even the smallest preset ('{lowest}') needs more memory than is free: turn on gradient "
                  "checkpointing, lower the resolution")
    return (f"The GPU ran out of memory. {preset}, or close other programs using the GPU. "
            "The checkpoints saved so far are kept, and the GPU memory was released.")


def run_training(run: RunFolder, should_stop: Callable[[], bool] = lambda: False,
                 token: str | None = None, resume: bool = False,
                 dist: DistributedContext | None = None, device: str | None = None) -> Iterator[Event]:
    """One job, start to end. ``resume=True`` continues the run from its newest intact training state.

    ``dist``: this process's place in a multi-GPU run (every process calls this; only the main one writes).
    ``device``: the GPU a job manager's worker pinned this job to (several jobs on one box).
    Every event is recorded in run.json before it is yielded (a write that fails fails the job, like any save).
    """
    dist = dist or DistributedContext()
    cfg = run.config
    recorder = RunRecorder(run, write=dist.is_main)
    where = _Where()
    lock = lifecycle.RunLock(run.path)
    failure: Failed | None = None
    events = None
    try:
        if torch.get_num_threads() != TRAINING_THREADS:
            torch.set_num_threads(TRAINING_THREADS)
        if dist.is_main:
            lock.acquire()  # one job per run folder: a second resume of the same run is refused
        events = _job(run, should_stop, token, resume, dist, device, where)
        for event in events:
            recorder.record(event)
            where.last_step = getattr(event, "step", where.last_step)
            yield event
    # Failures are only recorded here and announced after ``finally``: yielding inside ``except`` would keep the
    # exception's traceback — and through it the model and optimizer — alive until the consumer moves on.
    except UserError as err:
        failure = Failed(str(err), "user", where.last_step)
    except torch.OutOfMemoryError:
        failure = Failed(oom_advice(cfg, where.tier), "out_of_memory", where.last_step)
    except Exception as err:
        if diskspace.is_disk_full(err):
            failure = Failed(diskspace.disk_full_message(where.last_step), "user", where.last_step)
        else:  # a bug: keep the traceback in the log, give the user a sentence
            log.error("training failed:\n%s", traceback.format_exc())
            message = (f"Training failed unexpectedly ({type(err).__name__}). The checkpoints saved so far are kept; "
                       "the server log has the details.")
            failure = Failed(message, "internal", where.last_step)
    finally:
        # Give the accelerator back whatever happened, so the next job starts from a clean slate.
        if events is not None:
            events.close()  # the job's frames (and the model in them) go now, also when the consumer stopped early
        events = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if dist.is_main:
            lock.release()
    if failure is not None:
        try:
            recorder.record(failure)
        except OSError:  # a full disk can refuse run.json too; the event still tells the user
            log.warning("could not record the failure in run.json", exc_info=True)
        yield failure


@dataclass
class _Where:
    """How far the job got, for its failure message: the last step trained or saved, the memory tier."""
    last_step: int = 0
    tier: str | None = None


def _job(run: RunFolder, should_stop, token, resume: bool, dist: DistributedContext, device: str | None,
         where: _Where) -> Iterator[Event]:
    """The job's events; ``run_training`` records each and turns what this raises into the ``Failed`` event."""
    cfg = run.config
    point = None
    if resume:
        point = lifecycle.prepare_resume(run)
        where.last_step = point.step
        for warning in point.warnings:
            yield Status(warning)
        yield from _saved_so_far(run)
    yield Status(f"Resolving model {cfg.model}")
    folder = resolve_model(cfg.model, token)  # every hub/token/folder problem surfaces here, before the GPU is touched
    preview_folder = _resolve_preview_model(cfg, folder, token)
    remaining = [s for s in cfg.checkpoint_steps if s > where.last_step]
    diskspace.check_before_start(run.path, _save_bytes_estimate(cfg, str(folder)), len(remaining))
    target = torch.device(device) if device else dist.device if dist.enabled else pick_device()[0]
    choice = choose_tier(cfg.memory_tier, target, tiny_model=is_tiny_demo(folder),  # a GPU too small stops here
                         family=family_of_folder(folder))
    tier = choice.tier
    where.tier = tier.name
    yield Placed(model_path=folder, memory_tier=tier.name, devices=_device_labels(target, dist))
    yield Status(choice.reason)
    yield Status("Loading model")
    # The transformer stays in host memory until the text encoders have run and left the GPU (memory tiers).
    parts = load_parts(folder, device=target, transformer_on_device=False)
    yield from train_with_parts(parts, run, tier, should_stop, resume=point, dist=dist, preview_folder=preview_folder)


def _resolve_preview_model(cfg, folder: Path, token: str | None) -> Path | None:
    """The preview model's folder (downloaded like the base model), checked against the model being trained."""
    if not cfg.preview_model:
        return None
    family = family_of_folder(folder)
    if family.distilled_render is None:
        raise UserError(f"{family.label} has no distilled model to draw the previews; leave the preview model empty.")
    preview_folder = resolve_model(cfg.preview_model, token)
    check_preview_folder(preview_folder, folder)
    return preview_folder


def _device_labels(target: torch.device, dist: DistributedContext) -> tuple[str, ...]:
    """This job's devices: its own, or one per process of a multi-GPU run (as this process numbers them)."""
    if dist.enabled:
        return tuple(f"{target.type}:{rank}" for rank in range(dist.world_size))
    return (str(target),)


def train_with_parts(parts, run: RunFolder, tier, should_stop: Callable[[], bool] = lambda: False,
                     resume: "lifecycle.ResumePoint | None" = None,
                     dist: DistributedContext | None = None, preview_folder: Path | None = None) -> Iterator[Event]:
    """The job once the parts are loaded (transformer still in host memory): encode the set's images and prompts once,
    free the encoders, place the transformer as ``tier`` says, train. ``bench/tier_bench.py`` runs this same code on
    full-size parts built in code, under each tier's memory cap."""
    cfg = run.config
    items = run.load_set()
    # aspect buckets: each image at its own size of about resolution**2 pixels, its shape kept (no square crop)
    train_images = [prepare_image(i.image, i.mask if cfg.masked else None, cfg.resolution) for i in items]
    captions = [cfg.with_trigger(i.caption) for i in items]  # the trigger word is the set's
    run.train_size = train_images[0].size  # in memory, for the loop's previews; run.json gets it from Started
    what = "the image" if len(items) == 1 else f"the {len(items)} images"
    yield Status(f"Encoding {what} and prompts (once; cached for the whole run)")
    prompts = encode_prompts(parts, [*captions, *cfg.preview_prompts], cfg.max_text_tokens)
    backgrounds = user_backgrounds(run.path) if cfg.masked and cfg.augment_probability > 0 else []
    examples = [with_background_bank(parts, encode_example(parts, t, c, prompts, cfg.masked, cfg.background_weight),
                                     t, cfg, backgrounds, index)
                for index, (t, c) in enumerate(zip(train_images, captions))]
    free_encoders(parts)
    gc.collect()
    fp8 = fp8_matmuls_apply(tier.matmul, tier.weights, parts.device)
    yield Status(_placing_message(tier.weights, fp8))
    place_transformer(parts, tier.weights, tier.gradient_checkpointing, tier.lean_previews,
                      tier.cap_gib if tier.checkpoint_as_needed else None, matmul=tier.matmul)
    gc.collect()
    preview_model = None
    if preview_folder is not None:
        preview_model, message = load_preview_model(parts, preview_folder, cfg, tier)
        yield Status(message)
    renderer = PreviewRenderer(parts, prompts, preview_model)
    gpus = dist.world_size if dist is not None else 1
    yield Started(run_dir=run.path, total_steps=cfg.steps, checkpoint_steps=tuple(cfg.checkpoint_steps),
                  train_width=run.train_size[0], train_height=run.train_size[1], images=len(items),
                  batch_size=cfg.batch_size, gpus=gpus,
                  learning_rate=scaled_learning_rate(cfg.learning_rate, gpus, cfg.batch_size),
                  epochs=epochs_at_step(cfg.steps, len(items), cfg.batch_size, gpus),
                  train_sizes=tuple(t.size for t in train_images))
    yield from train_lora(parts, examples, cfg, run, renderer, should_stop, resume=resume, dist=dist)


def _placing_message(weights: str, fp8_matmuls: bool = False) -> str:
    if fp8_matmuls:
        return ("Storing the transformer's frozen weights as FP8 on the GPU, layer by layer, to multiply them in fp8 "
                "(this GPU's fp8 tensor cores: the memory tier's speed-up; the LoRA still trains in float32)")
    if weights == "bf16":
        return "Moving the transformer to the training device"
    return (f"Storing the transformer's frozen weights as {weights.upper()} on the GPU, layer by layer (the memory "
            "tier's saving; the LoRA still trains in float32)")


def _saved_so_far(run: RunFolder) -> Iterator[Event]:
    """A resumed job's history starts with the loss curve, checkpoints and previews saved before the interruption."""
    losses = run.loss_history()
    if losses:
        yield LossHistory(points=losses)
    if run.base_previews:
        yield PreviewsRendered(step=0, previews=_previews(run, run.base_previews))
    for c in run.checkpoints:
        path = run.path / c["path"]
        if path.is_file():
            yield CheckpointSaved(step=c["step"], path=path, size_bytes=path.stat().st_size,
                                  losses=tuple((int(s), float(loss)) for s, loss in c.get("losses", [])),
                                  epoch=c.get("epoch"))
        if c.get("previews"):
            yield PreviewsRendered(step=c["step"], previews=_previews(run, c["previews"]))


def _previews(run: RunFolder, entries) -> tuple[Preview, ...]:
    return tuple(Preview(path=run.path / p["path"], prompt=p["prompt"], seed=p["seed"]) for p in entries
                 if (run.path / p["path"]).is_file())


def _save_bytes_estimate(cfg, model: str) -> int:
    """Disk needed per checkpoint (LoRA + training state + previews), from the architecture's layer shapes."""
    from trainer.model.estimates import bytes_per_saved_value, checkpoint_bytes

    values = checkpoint_bytes(model, cfg.rank, 1)
    return diskspace.save_bytes(values, bytes_per_saved_value(cfg.model),
                                diskspace.preview_bytes(cfg.resolution, len(cfg.preview_prompts)))
