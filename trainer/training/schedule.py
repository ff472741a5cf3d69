"""Epochs, steps, the sample order and the learning-rate rule of a run: pure arithmetic, no torch.

What practitioners count in (docs/PRACTICE.md §7):

- one **epoch** = every image of the set seen once;
- one **step** = one optimizer update, which sees ``batch_size`` images on each of ``gpus`` processes, so
  ``steps = images x epochs / (batch_size x gpus)`` (20 images x 100 epochs: 2000 steps at batch 1, 500 at batch 4,
  250 per GPU at batch 4 on 2 GPUs). ``steps`` stays the run's setting (checkpoints are named by step); epochs are
  shown next to it, and may be fractional (2.5 epochs: half the set seen a third time);
- batch 1 trains best (each image gets its own update; a larger batch averages them), so it is the default; when the
  images seen per step grow (a larger batch or more GPUs), the learning rate is ``sqrt(images per step)`` times the
  batch-1 rate. ``scaled_learning_rate`` is the one function that applies this rule: the loop, the CLI and the page
  all ask it.

The order: every epoch is a fresh seeded permutation of the set, and the step's samples are read off the
concatenated permutations. It is a pure function of (seed, set size, position), so a resumed run continues the
exact order with nothing to save, and one image (every position is image 0) trains exactly as before.
"""
from __future__ import annotations

import math
import random


def samples_per_step(batch_size: int = 1, gpus: int = 1) -> int:
    """Images one optimizer step sees: ``batch_size`` on each of ``gpus`` processes."""
    return max(1, int(batch_size)) * max(1, int(gpus))


def scaled_learning_rate(learning_rate: float, gpus: int = 1, batch_size: int = 1) -> float:
    """The learning rate a step of ``batch_size`` images on each of ``gpus`` processes trains with: sqrt(images per
    step) times the batch-1 rate (exactly ``learning_rate`` at batch 1 on one GPU)."""
    return learning_rate * math.sqrt(samples_per_step(batch_size, gpus))


def steps_for_epochs(epochs: float, images: int, batch_size: int = 1, gpus: int = 1) -> int:
    """The steps that show every image ``epochs`` times (rounded up: the last epoch is never cut short)."""
    if images < 1 or epochs <= 0:
        raise ValueError("epochs and images must be positive")
    return max(1, math.ceil(round(images * epochs / samples_per_step(batch_size, gpus), 9)))


def epochs_at_step(step: int, images: int, batch_size: int = 1, gpus: int = 1) -> float:
    """How many times each image has been seen after ``step`` steps, on average (2.5 = two and a half epochs)."""
    if images < 1:
        raise ValueError("images must be positive")
    return step * samples_per_step(batch_size, gpus) / images


def epoch_permutation(images: int, seed: int, epoch: int) -> list[int]:
    """The order of the set in epoch ``epoch`` (0-based): a permutation seeded by the run's seed and the epoch."""
    order = list(range(images))
    if images > 1:
        random.Random(f"{seed}:{epoch}").shuffle(order)  # a string seed: stable across Python versions and platforms
    return order


def sample_indices(images: int, seed: int, step: int, batch_size: int = 1, gpus: int = 1, rank: int = 0) -> list[int]:
    """The set's images that process ``rank`` trains in ``step`` (1-based): ``batch_size`` consecutive positions of
    the epoch-by-epoch order, the processes taking adjacent slices of the step's ``batch_size x gpus``."""
    per_step = samples_per_step(batch_size, gpus)
    start = (step - 1) * per_step + rank * batch_size
    out = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, images)
        out.append(epoch_permutation(images, seed, epoch)[offset])
    return out


def learning_rate_note(learning_rate: float, batch_size: int = 1, gpus: int = 1, unit: str = "GPUs") -> str:
    """The rule in words when it changes the rate ("" at batch 1 on one GPU)."""
    n = samples_per_step(batch_size, gpus)
    if n == 1:
        return ""
    parts = ([f"batch {batch_size}"] if batch_size > 1 else []) + ([f"{gpus} {unit}"] if gpus > 1 else [])
    return (f"{' on '.join(parts)}: {n} images per step, learning rate {learning_rate:g} x sqrt({n}) = "
            f"{scaled_learning_rate(learning_rate, gpus, batch_size):.3g}")
