"""Typed events out of a training job: the only thing the UI and the CLI learn about a run.

Frozen dataclasses, one per kind of news, in the order a run produces them:
Status* → Placed → Status* → Started → (Progress | CheckpointSaved | PreviewsRendered)* → Finished | Failed
(a resumed run first repeats what it had saved: LossHistory, CheckpointSaved and PreviewsRendered).

They carry every fact of the run's record too: ``trainer.runs.recorder.RunRecorder`` folds them into run.json as
they pass, and ``ui.view.RunView`` folds the same events into the page. New fields get defaults, so an event
line written without them still parses.

``to_json_line`` / ``from_json_line`` carry them across a process boundary (a multi-GPU job's main process
writes one JSON object per line; the app reads them back into the same typed events).
"""
from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Literal, Sequence, Union


@dataclass(frozen=True)
class Status:
    """A phase before or between steps (resolving, loading, encoding, rendering previews)."""
    message: str


@dataclass(frozen=True)
class Placed:
    """The model is resolved and the memory tier chosen; the job loads the model onto ``devices`` next.

    ``devices``: the job's devices as labels, ``("cuda:0",)``, ``("cpu",)``, or every process's in a multi-GPU
    job (``("cuda:2", "cuda:3")``, ``("cpu:0", "cpu:1")``: ``describe_devices`` words them)."""
    model_path: Path | str
    memory_tier: str
    devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Started:
    """Training begins. ``train_width`` x ``train_height``: the first image's training size (the previews'); a set's
    images each train at their own size of the same area (``train_sizes``, in the set's order)."""
    run_dir: Path
    total_steps: int
    checkpoint_steps: tuple[int, ...]
    train_width: int
    train_height: int
    images: int = 1  # the set's size
    batch_size: int = 1  # images per step on each process
    gpus: int = 1  # data-parallel processes
    learning_rate: float = 0.0  # the rate the optimizer trains with: sqrt(batch_size x gpus) x the setting (0: untold)
    epochs: float = 0.0  # total_steps in epochs of this set (each image seen once = 1 epoch; 0: untold)
    train_sizes: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    loss: float  # the mean over the step's images
    steps_per_second: float
    eta_seconds: float
    epoch: float = 0.0  # epochs of the set trained by this step


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    path: Path
    size_bytes: int
    losses: tuple[tuple[int, float], ...] = ()  # (step, loss) of the steps since the previous save (run.json keeps them)
    epoch: float | None = None  # epochs of the set trained by this step (checkpoints are named by step)


@dataclass(frozen=True)
class Preview:
    path: Path
    prompt: str
    seed: int


@dataclass(frozen=True)
class PreviewsRendered:
    """Sample images for one step; step 0 is the base model before any training."""
    step: int
    previews: tuple[Preview, ...]
    # which model drew them when not the base model being trained (a preview model: klein's distilled one)
    rendered_with: str = ""


@dataclass(frozen=True)
class LossHistory:
    """The loss curve of the steps trained before a resume, (step, loss) in order: each checkpoint keeps its part
    in run.json, so a resumed job's page shows the whole curve, not only the steps after the resume."""
    points: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Finished:
    run_dir: Path
    last_step: int
    stopped: bool  # True when the user pressed Stop; saved checkpoints are kept either way


FailureKind = Literal["user", "out_of_memory", "not_finite", "internal"]


@dataclass(frozen=True)
class Failed:
    message: str
    kind: FailureKind
    last_step: int = 0


Event = Union[Status, Placed, Started, Progress, LossHistory, CheckpointSaved, PreviewsRendered, Finished, Failed]
TERMINAL_EVENTS = (Finished, Failed)


def describe_devices(devices: Sequence[str]) -> str:
    """``GPUs 0, 1`` for CUDA devices; ``2 CPU processes`` for the CPU (tests, gloo): ``Placed.devices`` in words."""
    if devices and all(d.startswith("cuda") for d in devices):
        ids = [d.split(":")[-1] if ":" in d else "0" for d in devices]
        return f"GPU {ids[0]}" if len(ids) == 1 else f"GPUs {', '.join(ids)}"
    return "the CPU" if len(devices) == 1 else f"{len(devices)} CPU processes (gloo; they share the CPU)"


# ---- one event as one line of JSON (a multi-GPU job's processes → the app)
_TYPES = {cls.__name__: cls for cls in (Status, Placed, Started, Progress, LossHistory, CheckpointSaved, PreviewsRendered,
                                         Finished, Failed)}
_PATH_FIELDS = {"run_dir", "path", "model_path"}
_POINT_FIELDS = {"points", "losses"}  # (step, loss) pairs


def event_to_dict(event: Event) -> dict[str, Any]:
    """``{"type": "Progress", "step": 3, ...}``: paths as strings, tuples as lists, previews as objects."""
    if type(event) not in _TYPES.values():
        raise TypeError(f"not a training event: {event!r}")
    data: dict[str, Any] = {"type": type(event).__name__}
    for f in fields(event):
        value = getattr(event, f.name)
        if isinstance(value, Path):
            value = str(value)
        elif f.name == "previews":
            value = [{"path": str(p.path), "prompt": p.prompt, "seed": p.seed} for p in value]
        elif f.name in _POINT_FIELDS:
            value = [[step, loss] for step, loss in value]
        elif f.name == "train_sizes":
            value = [list(size) for size in value]
        elif isinstance(value, tuple):
            value = list(value)
        data[f.name] = value
    return data


def event_from_dict(data: dict[str, Any]) -> Event:
    """The inverse of ``event_to_dict``; an unknown type or a missing/extra field is a ``ValueError``."""
    if not isinstance(data, dict) or data.get("type") not in _TYPES:
        raise ValueError(f"not a training event: {data!r}")
    cls = _TYPES[data["type"]]
    names = {f.name for f in fields(cls)}
    given = set(data) - {"type"}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    if not given <= names or not required <= given:
        raise ValueError(f"a {cls.__name__} event with fields {sorted(given)}; expected {sorted(names)}")
    values = {}
    for name in given:
        value = data[name]
        if name in _PATH_FIELDS:
            value = Path(value)
        elif name == "previews":
            value = tuple(Preview(path=Path(p["path"]), prompt=p["prompt"], seed=p["seed"]) for p in value)
        elif name in ("checkpoint_steps", "devices"):
            value = tuple(value)
        elif name == "train_sizes":
            value = tuple((int(w), int(h)) for w, h in value)
        elif name in _POINT_FIELDS:
            value = tuple((int(step), float(loss)) for step, loss in value)
        values[name] = value
    return cls(**values)


def to_json_line(event: Event) -> str:
    """One line (no newline inside it), newline-terminated."""
    return json.dumps(event_to_dict(event), ensure_ascii=False) + "\n"


def from_json_line(line: str) -> Event:
    return event_from_dict(json.loads(line))
