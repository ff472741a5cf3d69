"""A tier's "as-needed" gradient checkpointing for one job: measure the blocks, then plan against the card's memory.

``measure`` runs before the blocks are compiled (a compiled block can't run under the measuring hooks): one forward
of the job's largest picture, as the training step runs it. ``choose`` runs once the job's fixed memory is in place
(weights, LoRA, cached latents; the first previews when they render at the start), just before the first step, and
applies the plan. The maths is in ``trainer.training.accel.checkpointing``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from trainer.config import TrainingConfig
from trainer.training.accel.checkpointing import (GIB, CheckpointPlan, activation_budget, apply_plan,
                                                  measure_block_activations, plan_checkpointing)
from trainer.training.accel.graphs import lora_layers
from trainer.training.encode import EncodedExample

# Previews render beside the training memory: a batch of 3 replayed from a CUDA graph kept up to 1.9 GiB in its pool
# at 512 px (bench/RESULTS.md, 2026-11-22); a small card's lean previews, one image at a time, need less.
PREVIEW_RESERVE_GIB = {False: 2.5, True: 1.0}


def checkpoint_cap_gib(parts, cfg: TrainingConfig) -> float | None:
    """The memory a job plans its checkpointing against, or None when every block (or none) is checkpointed: the
    tier's cap (``parts.checkpoint_cap_gib``), never more than what this CUDA device has left for this process."""
    cap = getattr(parts, "checkpoint_cap_gib", None)
    if cap is None or cfg.gradient_checkpointing or parts.device.type != "cuda" or not torch.cuda.is_available():
        return None  # the user's own "gradient checkpointing on" means every block
    free, _ = torch.cuda.mem_get_info(parts.device)
    return min(float(cap), (torch.cuda.memory_reserved(parts.device) + free) / GIB - 0.5)


def measure(parts, transformer, examples: Sequence[EncodedExample], cfg: TrainingConfig) -> list[int]:
    """Bytes each block saves for backward at the job's largest picture, in the training step's numerics (bf16
    autocast, peft's fp32 cast of the LoRA inputs skipped as ``TrainStep`` skips it); the training noise is untouched
    (a generator of its own)."""
    from trainer.training.step import training_step

    example = max(examples, key=lambda e: e.image_ids.shape[-2])
    tokens = parts.family.pack(example.latents).shape[1]
    mu = parts.family.training_shift(parts.scheduler, tokens)
    generator = torch.Generator(device=parts.device).manual_seed(0)
    layers = lora_layers(transformer) if parts.device.type == "cuda" else []
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        return measure_block_activations(
            transformer, lambda: training_step(transformer, example, cfg, generator, mu, example.weights is not None))
    finally:
        for layer in layers:
            layer.cast_input_dtype_enabled = True


def choose(parts, transformer, block_bytes: Sequence[int], params, cap_gib: float, resolution: int) -> CheckpointPlan:
    """Plan and apply: keep as many blocks' activations as the memory left under ``cap_gib`` holds."""
    lora_bytes = sum(p.numel() * p.element_size() for p in params)
    reserve = PREVIEW_RESERVE_GIB[bool(getattr(parts, "lean_previews", False))] * GIB * max(1.0, (resolution / 512) ** 2)
    budget = activation_budget(int(cap_gib * GIB), torch.cuda.memory_allocated(parts.device), lora_bytes, block_bytes,
                               int(reserve))
    plan = plan_checkpointing(block_bytes, budget)
    apply_plan(transformer, plan)
    return plan
