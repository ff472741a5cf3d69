"""Typed events out of a training job: the only thing the UI and the CLI learn about a run.

Frozen dataclasses, one per kind of news, in the order a run produces them:
Status* → Started → (Progress | CheckpointSaved | PreviewsRendered)* → Finished | Failed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union


@dataclass(frozen=True)
class Status:
    """A phase before or between steps (resolving, loading, encoding, rendering previews)."""
    message: str


@dataclass(frozen=True)
class Started:
    run_dir: Path
    total_steps: int
    checkpoint_steps: tuple[int, ...]
    train_width: int
    train_height: int


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    loss: float
    steps_per_second: float
    eta_seconds: float


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    path: Path
    size_bytes: int


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


Event = Union[Status, Started, Progress, CheckpointSaved, PreviewsRendered, Finished, Failed]
TERMINAL_EVENTS = (Finished, Failed)
