"""How long a job will take, said before Train: from figures measured on a CPU, never a guess presented as a fact.

A new user found nothing warned that tiny-demo's default preset (400 steps) takes about an hour on a 2-core CPU.
Before Train, the page (step 4's plan) and ``python -m trainer train`` say "≈ N min" for a tiny model on a machine
without a CUDA GPU, from the figures below, measured on this project's 2-core x86_64 CPU (shared with other work, load
~4) on 2026-12-03 with ``python -m trainer train --model tiny-demo --preset cpu-demo-40`` (timestamped output). They are
that machine's figures, not this one's: the words say so. Nothing is said for a GPU or a full-size model (no figure is
kept for them here; the page shows the measured speed once training runs).

The estimate: setup (loading, encoding, mask variants) + steps x seconds per step + preview rounds (step 0 and every
checkpoint) x prompts x denoising steps x seconds per denoising step.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config import TrainingConfig


@dataclass(frozen=True)
class CpuFigures:
    """Measured seconds for a small model on the reference CPU, at ``resolution`` px (the cost of a step scales with
    the tokens)."""
    setup_s: float
    step_s: float  # one training step (forward, backward, AdamW) at resolution x resolution
    denoise_s: float  # one denoising step of one preview image at resolution x resolution
    machine: str
    resolution: int = 512


# Measured 2026-12-03 (see the module's docstring): setup = model load + encoding (27 s); a step 2.8-3.3 s at load
# 4-7 (6.6 s while tests also ran); a step-0 or checkpoint preview round of 1 prompt x 4 denoising steps 14.1-14.5 s
# (text encoding and VAE decoding included, so per denoising step 3.6 s). The new user's figures (400 steps ~1 hour,
# quick-test 18 min) were on a busier machine: the notice says whose figures these are.
TINY_CPU = CpuFigures(setup_s=27.0, step_s=3.0, denoise_s=3.6, machine="a 2-core x86_64 CPU, shared (load 4-7)")
# shapes-demo at its 128 px, measured 2026-12-03 on the same 2-core CPU, otherwise idle, from three timed CLI runs
# (cpu-demo-shapes-300 with 3 prompts: 300 steps and 2 preview rounds 16.7 s, 300 steps and 7 rounds 18.5 s, 1 step
# and 2 rounds 7.7 s): a round of 3 prompts x 12 denoising steps 0.36 s, setup (start-up, loading, encoding) 7 s.
SHAPES_CPU = CpuFigures(setup_s=7.0, step_s=0.030, denoise_s=0.010, machine="a 2-core x86_64 CPU (idle)",
                        resolution=128)


def figures_for(model: str) -> CpuFigures | None:
    """The measured CPU figures of a built-in small model; None for any other model (no figure is kept for it)."""
    from trainer.families import tiny_ids

    if model == "shapes-demo":
        return SHAPES_CPU
    return TINY_CPU if model in tiny_ids() else None


def minutes(config: TrainingConfig, figures: CpuFigures = TINY_CPU) -> float:
    """The estimated minutes of a job with ``config`` on the reference CPU."""
    scale = (config.resolution / figures.resolution) ** 2  # tokens, hence the work of a step, grow with the area
    rounds = len(config.checkpoint_steps) + (1 if config.preview_at_start else 0)
    previews = rounds * len(config.preview_prompts) * config.preview_steps * figures.denoise_s * scale
    return (figures.setup_s + config.steps * figures.step_s * scale + previews) / 60.0


def cpu_time_notice(config: TrainingConfig, cuda: bool) -> str:
    """"≈ N min" for a built-in small model trained on the CPU (no CUDA GPU), saying what the figure is; "" otherwise."""
    figures = figures_for(config.model)
    if cuda or figures is None:
        return ""
    n = minutes(config, figures)
    when = f"≈ {n:.0f} min" if n >= 1.5 else "≈ 1 min"
    return (f"{when} on this machine without a GPU ({config.steps} steps, estimated from steps and previews timed on "
            f"{figures.machine}; a faster or idle CPU takes less).")
