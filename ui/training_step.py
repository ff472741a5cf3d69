"""Step 6 of the page: Train / Stop, and the stream of progress, loss, previews and checkpoints.

Train only *submits* a job (the worker thread owns it); ``follow`` then streams that job's events into
the page. Because it reads the job's history from the start, a reloaded page re-attaches to a running
job by calling ``follow`` again.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from trainer import api
from trainer.errors import UserError
from ui.settings_step import model_spec, preview_model_options, prompt_lines
from ui.view import RunView

MIN_UPDATE_INTERVAL = 0.4  # seconds between page updates while streaming; a 16 it/s CPU run would flood the socket


def _file_paths(files) -> list[str]:
    """Paths from a gr.File value (None, a path, or a list of paths / file dicts from the API)."""
    if not files:
        return []
    files = files if isinstance(files, (list, tuple)) else [files]
    return [f.get("path") if isinstance(f, dict) else str(f) for f in files if f]


class TrainingController:
    def __init__(self, manager: api.JobManager, runs_root: Path):
        self.manager = manager
        self.runs_root = Path(runs_root)
        self.store = api.RunStore(self.runs_root)
        self.presets: dict[Path, str] = {}  # run folder -> the preset it was started from (run.json keeps no name)

    def start(self, owner: str, dataset, caption: str, trigger: str, prompts: str, preset: str, rank, steps,
              learning_rate, save_every, model: str, token: str | None = None,
              loss_settings: dict | None = None, memory_tier: str = "auto",
              gpus: int = 1, backgrounds=(), preview_model: str = "", batch_size=None, epochs=None,
              images=None, lineage=None) -> str:
        """Create the run folder and queue the job. Returns a message for the page. ``rank``, ``steps``,
        ``learning_rate``, ``save_every`` and ``batch_size`` override the preset's; None keeps the preset's value;
        ``epochs`` (with no ``steps``): the length in epochs of the set. ``backgrounds``: paths of the user's own
        photos for background augmentation. ``images``: a set of 2 or more (``api.SetImage``s, ui.image_set); None:
        the one image of ``dataset``, exactly as before sets existed. ``lineage``: a grown set's round and parent run."""
        if dataset is None:
            raise UserError("Upload an image first (step 1).")
        if not (caption or "").strip():
            raise UserError("Write a caption first (step 3): describe everything in the image.")
        if self.manager.active_for(owner) is not None:
            raise UserError("A training job of yours is already running. Stop it first, or wait for it to finish.")
        overrides = {name: _whole(value, label) for name, value, label in (
            ("rank", rank, "Rank"), ("steps", steps, "Steps"), ("save_every", save_every, "Save every"),
            ("batch_size", batch_size, "Batch size")) if value is not None}
        if learning_rate is not None:
            overrides["learning_rate"] = float(learning_rate)
        gpus = _whole(1 if gpus is None else gpus, "GPUs")  # N > 1: data parallel, the batch on each, lr x sqrt(N x B)
        if gpus != 1 and not 1 <= gpus <= self.manager.max_gpus:
            raise UserError(f"This server can give a job at most {self.manager.max_gpus} GPU(s); {gpus} were asked for.")
        images = list(images or [])
        if len(images) > 1:  # the previews' caption is the first image's; each image trains with its own
            caption = images[0].caption or caption
        config, _ = api.training_config(api.RunRequest(
            caption=caption, preset=preset, trigger=trigger or "", sample_prompts=prompt_lines(prompts),
            model=model_spec(model), masked=any(i.mask is not None for i in images) if len(images) > 1
            else dataset.mask is not None,
            overrides={**overrides, "memory_tier": memory_tier or "auto", "preview_model": (preview_model or "").strip(),
                       **(loss_settings or {})},  # the mask step's background weight / normalise / unmasked / augmentation
            images=max(1, len(images)), gpus=gpus,
            epochs=float(epochs) if epochs is not None and steps is None else None))
        own_backgrounds = api.load_user_backgrounds(_file_paths(backgrounds))
        if len(images) > 1:
            run = self.store.create_set(owner, config, images, backgrounds=own_backgrounds, gpus=gpus, lineage=lineage)
        else:
            run = self.store.create(owner, config, dataset.image, dataset.mask, backgrounds=own_backgrounds, gpus=gpus)
        try:
            self.manager.submit(owner, run, token=token)
        except UserError:
            shutil.rmtree(run.path, ignore_errors=True)
            raise
        self.presets[run.path] = preset
        return "Starting…"

    def job_settings(self, owner: str) -> dict | None:
        """The settings the owner's latest job (running, or the last) trains with, by the page's names (``SETTINGS``);
        None without a job. A reloaded page shows them, not the defaults, beside the job it re-attaches to."""
        job = self.manager.latest_for(owner)
        if job is None:
            return None
        cfg = job.run.config
        return dict(preset=self.presets.get(job.run.path), caption=cfg.caption, trigger=cfg.trigger,
                    prompts="\n".join(cfg.sample_prompts), rank=cfg.rank, steps=cfg.steps,
                    learning_rate=cfg.learning_rate, save_every=cfg.save_every, batch_size=cfg.batch_size,
                    model=cfg.model, memory_tier=cfg.memory_tier, gpus=job.run.gpus, preview_model=cfg.preview_model,
                    background_weight=cfg.background_weight, normalize_mask=cfg.normalize_mask,
                    unmasked_probability=cfg.unmasked_probability, augment_probability=cfg.augment_probability)

    def resumable_run(self, owner: str) -> Path | None:
        """The owner's newest run that a server restart interrupted (only ever looks in the owner's own folder)."""
        if self.manager.active_for(owner) is not None:
            return None
        runs = self.store.interrupted(owner)
        return runs[0] if runs else None

    def resume(self, owner: str, token: str | None = None) -> str:
        """Queue a job that continues the owner's newest interrupted run from its last checkpoint."""
        run_dir = self.resumable_run(owner)
        if run_dir is None:
            raise UserError("You have no interrupted run to resume.")
        self.manager.resume(owner, run_dir, token=token, allowed_root=self.store.owner_root(owner))
        return "Resuming from the last checkpoint…"

    def stop(self, owner: str) -> str:
        job = self.manager.active_for(owner)
        if job is None:
            return "Nothing is running."
        self.manager.stop(job.id, owner)
        return "Stopping after the current step…"

    def follow(self, owner: str):
        """Yield page updates for the owner's latest job until it ends (or once, if there is none running)."""
        job = self.manager.latest_for(owner)
        view = RunView()
        if job is None:
            yield render(view)
            return
        index, last = 0, 0.0
        while True:
            new = job.wait_for_events(index, timeout=1.0)
            for event in new:
                view.apply(event)
            index += len(new)
            view.queue_position = self.manager.queue_position(job)
            view.running = job.active
            done = not job.active and index >= len(job.events)
            wait = MIN_UPDATE_INTERVAL - (time.monotonic() - last)
            if wait > 0 and not done:
                time.sleep(wait)
                continue
            last = time.monotonic()
            yield render(view)
            if done:
                return


SETTINGS = ("preset", "caption", "trigger", "prompts", "rank", "steps", "learning_rate", "save_every", "batch_size",
            "model", "memory_tier", "gpus", "preview_model", "background_weight", "normalize_mask",
            "unmasked_probability", "augment_probability")


def settings_updates(settings: dict | None) -> tuple:
    """``job_settings`` as values for the page's controls, in ``SETTINGS`` order; gr.skip() for what is unknown (a
    resumed run's preset) and for everything without a job. The preview-model choices follow the job's model."""
    if settings is None:
        return (gr.skip(),) * len(SETTINGS)
    values = [gr.skip() if settings.get(name) is None else settings[name] for name in SETTINGS]
    values[SETTINGS.index("preview_model")] = gr.update(**{**preview_model_options(settings["model"]),
                                                          "value": settings["preview_model"]})
    return tuple(values)


def render(view: RunView):
    """RunView → updates for (progress, loss plot, gallery, checkpoint files, Train button, Stop button, the loss
    plot's x range: a gr.State, so /follow's API answer keeps its shape; its change sets the plot's x_lim)."""
    # Typed columns even when empty: the first value decides the plot's axis types in the browser, and an
    # untyped empty frame makes them categorical (an upside-down y axis of raw loss strings).
    losses = pd.DataFrame(view.losses or [], columns=["step", "loss"]).astype({"step": "int64", "loss": "float64"})
    return (
        view.progress_markdown(),
        losses,
        view.gallery(),
        view.checkpoint_files or None,
        gr.update(interactive=not view.running),
        gr.update(interactive=view.running),
        view.loss_axis(),
    )


def _whole(value, label: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{label} must be a whole number.") from None
    if number != int(number):
        raise UserError(f"{label} must be a whole number, got {value}.")
    return int(number)
