"""What the training section of the page shows, computed from trainer events alone (no Gradio here).

``RunView.apply(event)`` folds one event into the view; replaying a job's whole history into a fresh
``RunView`` rebuilds the page exactly, which is how a reloaded tab re-attaches to a running job. Its twin,
``trainer.runs.recorder.RunRecorder``, folds the same events into the run's run.json.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from trainer.events import (CheckpointSaved, Event, Failed, Finished, LossHistory, Placed, PreviewsRendered, Progress,
                            Started, Status, describe_devices)


# d3's tick step for a range r and n ticks is 1 (not 0.5) once r / n >= 0.71; Vega-Lite asks for n = width / 40, so a
# range of 40 steps counts whole steps up to a plot 2200 px wide (the page's column is narrower).
MIN_AXIS_STEPS = 40


@dataclass
class RunView:
    status: str = ""
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    steps_per_second: float = 0.0
    eta_seconds: float = 0.0
    train_size: tuple[int, int] | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    previews: list[tuple[str, str]] = field(default_factory=list)  # (image path, label), oldest first
    preview_steps: list[int] = field(default_factory=list)  # the step of each of ``previews``
    checkpoints: list[tuple[int, str, int]] = field(default_factory=list)  # (step, path, bytes)
    running: bool = False
    error: str = ""
    queue_position: int = 0
    gpu: str = ""  # "GPU 1" / "GPUs 0, 1" / "2 CPU processes …": the devices the job was given (none for one CPU)
    images: int = 1  # the set's size; epochs are shown only for a set (one image at batch 1: an epoch is a step)
    batch_size: int = 1
    gpus: int = 1
    learning_rate: float = 0.0  # the rate trained with (sqrt(images per step) x the setting); 0: untold
    epoch: float = 0.0
    total_epochs: float = 0.0
    checkpoint_epochs: dict[int, float] = field(default_factory=dict)  # step -> epochs trained by it

    def apply(self, event: Event) -> None:
        if isinstance(event, Status):
            self.running = True
            self.status = event.message
        elif isinstance(event, Placed):
            self.running = True
            lone_cpu = len(event.devices) == 1 and event.devices[0].startswith("cpu")
            self.gpu = describe_devices(event.devices) if event.devices and not lone_cpu else ""  # GPUs; N processes
        elif isinstance(event, Started):
            self.running = True
            self.total_steps = event.total_steps
            self.train_size = (event.train_width, event.train_height)
            self.status = f"Training at {event.train_width}x{event.train_height}"
            self.images, self.batch_size, self.gpus = event.images, event.batch_size, event.gpus
            self.learning_rate, self.total_epochs = event.learning_rate, event.epochs
        elif isinstance(event, Progress):
            self.step, self.total_steps = event.step, event.total_steps
            self.loss, self.steps_per_second, self.eta_seconds = event.loss, event.steps_per_second, event.eta_seconds
            self.losses.append((event.step, event.loss))
            self.epoch = event.epoch
            self.status = "Training"
        elif isinstance(event, LossHistory):  # a resumed run: the steps trained before the interruption
            self.losses.extend(event.points)
        elif isinstance(event, CheckpointSaved):
            self.checkpoints.append((event.step, str(event.path), event.size_bytes))
            if event.epoch is not None:
                self.checkpoint_epochs[event.step] = event.epoch
        elif isinstance(event, PreviewsRendered):
            name = "base model (step 0)" if event.step == 0 else f"step {event.step}"
            if event.step and self.shows_epochs:
                name += f" · epoch {self.epoch_at(event.step):.2f}"
            if event.rendered_with:  # a preview model drew them: say which, or they look like the base model's
                name = ("no LoRA yet (step 0)" if event.step == 0 else name) + f" · {event.rendered_with}"
            for p in event.previews:
                self.previews.append((str(p.path), f"{name} · {p.prompt}"))
                self.preview_steps.append(event.step)
        elif isinstance(event, Finished):
            self.running = False
            saved = len(self.checkpoints)
            if event.stopped:
                self.status = f"Stopped at step {event.last_step}. {saved} checkpoint(s) kept."
            else:
                self.status = f"Finished: {event.last_step} steps, {saved} checkpoint(s)."
        elif isinstance(event, Failed):
            self.running = False
            self.error = event.message
            self.status = "Failed"

    # ---- text for the page
    def progress_markdown(self) -> str:
        if self.queue_position > 0:
            return f"**Queued**: position {self.queue_position}. It starts when the jobs ahead of it finish."
        lines = [f"**{self.status}**" + (f" · on {self.gpu}" if self.gpu else "") if self.status else ""]
        if self.total_steps:
            pct = 100 * self.step / self.total_steps
            lines.append(f"Step **{self.step} / {self.total_steps}** ({pct:.0f}%)" + (
                f" · epoch **{self.epoch:.2f} / {self.total_epochs:.2f}** of {self.images} images"
                if self.shows_epochs else ""))
            if self.learning_rate and self.batch_size * self.gpus > 1:
                lines.append(f"{self.batch_size * self.gpus} images per step (batch {self.batch_size} × "
                             f"{self.gpus} process(es)): learning rate {self.learning_rate:.3g} (√ rule)")
            if self.loss is not None and self.running:
                lines.append(f"loss {self.loss:.4f} · {self.steps_per_second:.2f} it/s · ETA {format_duration(self.eta_seconds)}")
            elif self.loss is not None:
                lines.append(f"last loss {self.loss:.4f}")
        if self.checkpoints:
            total = sum(size for _, _, size in self.checkpoints)
            lines.append(f"{len(self.checkpoints)} checkpoint(s) saved, {total / 1e6:.1f} MB in all")
            if self.shows_epochs:
                lines.append("Checkpoints: " + ", ".join(f"step {step} (epoch {self.epoch_at(step):.2f})"
                                                         for step, _, _ in self.checkpoints))
        if self.error:
            lines.append(f"⚠️ {self.error}")
        return "  \n".join(line for line in lines if line)

    @property
    def shows_epochs(self) -> bool:
        """Epochs are worth showing for a set (for one image they only repeat the step count)."""
        return self.images > 1

    def epoch_at(self, step: int) -> float:
        """Epochs trained by ``step``: the checkpoint's own figure, else from the set's size, batch and GPUs."""
        if step in self.checkpoint_epochs:
            return self.checkpoint_epochs[step]
        return step * self.batch_size * self.gpus / max(1, self.images)

    def gallery(self) -> list[tuple[str, str]]:
        """The previews for the gallery, the newest checkpoint's first (each checkpoint's prompts in their order): the
        gallery is a short scroll box, and oldest-first left the previews just rendered below its fold."""
        rounds: dict[int, list[tuple[str, str]]] = {}
        for step, preview in zip(self.preview_steps, self.previews):
            rounds.setdefault(step, []).append(preview)
        return [preview for step in sorted(rounds, reverse=True) for preview in rounds[step]]

    def loss_axis(self) -> list[int] | None:
        """The loss plot's x range, [0, the job's steps], at least ``MIN_AXIS_STEPS`` wide; None before the job says
        its length. Vega-Lite picks "nice" ticks for the range it is given, about one per 40 px: over the few steps
        of a run's start (its range was the steps so far) that was 0.5 steps apart, fractional steps on the axis.
        A range this wide always gets whole-step ticks, and the axis no longer rescales as the curve grows."""
        if not self.total_steps:
            return None
        return [0, max(self.total_steps, MIN_AXIS_STEPS)]

    @property
    def checkpoint_files(self) -> list[str]:
        return [path for _, path, _ in self.checkpoints]


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
