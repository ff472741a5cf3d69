"""Selective gradient checkpointing: recompute only as many blocks as the card's memory requires.

Checkpointing every block (what the 24/16/12 GB tiers did) recomputes each block's forward in backward, about a
third more compute per step; on a 24 GB card with fp8 weights much of the activation memory is free anyway. So a
tier with ``gradient_checkpointing = "as-needed"`` measures, at the job's own size, the bytes each block saves for
backward (``measure_block_activations``: one forward, no backward, nothing kept), works out what the card has left
for them (``activation_budget``) and keeps the activations of as many blocks as fit (``plan_checkpointing``); the rest
are recomputed. ``apply_plan`` hands diffusers a checkpointing function that only checkpoints the planned blocks.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.utils.checkpoint

from trainer.training.accel.attention import flux_blocks

GIB = 2 ** 30
# The caching allocator reserves more than it hands out (activations come in many sizes): 15.1 GiB allocated took
# 19.2 GiB reserved on the 24gb tier (bench/RESULTS.md, 2026-12-01). Kept activations are counted at this much.
# With this plan the 24gb job peaked at 16.95 allocated / 22.96 reserved under its 23.0 cap (2026-12-04): the
# allocator filled the cap and gave back cached blocks, no OOM. An OOM in an early step falls back to every block
# (trainer/training/loop.py).
FRAGMENTATION = 1.25
SAFETY_GIB = 1.5  # left free under the cap whatever the sums say: transients the sums don't see (workspaces, dequant)


@dataclass(frozen=True)
class CheckpointPlan:
    """Which blocks (in the order they run) are recomputed in backward, and why."""

    checkpointed: tuple[bool, ...]
    block_bytes: tuple[int, ...]  # what each block saves for backward when it is not checkpointed
    budget_bytes: int

    @property
    def recomputed(self) -> int:
        return sum(self.checkpointed)

    @property
    def kept_bytes(self) -> int:
        return sum(b for b, c in zip(self.block_bytes, self.checkpointed) if not c)

    def describe(self) -> str:
        total = len(self.checkpointed)
        if self.recomputed == total:
            return f"recomputing every block's activations ({total} blocks): the card has no room to keep any"
        if self.recomputed == 0:
            return f"keeping every block's activations ({self.kept_bytes / GIB:.1f} GiB): no recomputation needed"
        return (f"recomputing {self.recomputed} of {total} blocks' activations, keeping the other "
                f"{total - self.recomputed} ({self.kept_bytes / GIB:.1f} GiB) to fit the card's memory")


def plan_checkpointing(block_bytes: Sequence[int], budget_bytes: int) -> CheckpointPlan:
    """Keep the activations of the blocks that fit in ``budget_bytes``, smallest first (every Flux block costs about
    the same to recompute, 12·d² FLOPs per token, so the most blocks kept saves the most time); recompute the rest."""
    keep = set()
    left = budget_bytes
    for index in sorted(range(len(block_bytes)), key=lambda i: (block_bytes[i], i)):
        if block_bytes[index] > left:
            break
        keep.add(index)
        left -= block_bytes[index]
    return CheckpointPlan(tuple(i not in keep for i in range(len(block_bytes))), tuple(int(b) for b in block_bytes),
                          int(budget_bytes))


class SelectiveCheckpointing:
    """diffusers' ``_gradient_checkpointing_func`` (called as ``func(block, *args)`` for every block when
    checkpointing is on) that checkpoints the chosen blocks as diffusers' default does and runs the others plainly."""

    def __init__(self, blocks: Sequence[torch.nn.Module]):
        self._ids = {id(b) for b in blocks}

    def __call__(self, block, *args):
        if id(block) in self._ids:
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
        return block(*args)


def apply_plan(transformer, plan: CheckpointPlan) -> None:
    blocks = flux_blocks(transformer)
    if len(blocks) != len(plan.checkpointed):
        raise ValueError(f"the plan is for {len(plan.checkpointed)} blocks, the transformer has {len(blocks)}")
    chosen = [b for b, c in zip(blocks, plan.checkpointed) if c]
    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=SelectiveCheckpointing(chosen))


def measure_block_activations(transformer, forward: Callable[[], object]) -> list[int]:
    """Bytes each Flux block saves for backward, measured during ``forward()`` (one training forward at the job's
    size, run with checkpointing off; no backward follows).

    Every tensor autograd saves passes through a saved-tensors hook, which counts its storage once (the LoRA and the
    base layer save the same input), skips parameters and buffers (the frozen weights are there anyway) and hands
    autograd nothing to keep, so the forward holds no more than one block's activations at a time."""
    blocks = flux_blocks(transformer)
    resident = {t.untyped_storage().data_ptr() for t in [*transformer.parameters(), *transformer.buffers()]}
    sizes = [0] * len(blocks)
    current: list[int | None] = [None]
    held: dict[int, torch.Tensor] = {}  # this block's saved tensors, kept until it ends: no address is reused

    def enter(index, *_):
        current[0] = index
        held.clear()

    def leave(*_):
        current[0] = None
        held.clear()

    def pack(tensor):
        index = current[0]
        if index is not None and isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            address = storage.data_ptr()
            if address not in resident and address not in held:
                held[address] = tensor
                sizes[index] += storage.nbytes()
        return None

    def unpack(_):
        raise RuntimeError("the activation measurement's forward has no backward")

    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(functools.partial(enter, index)))
        handles.append(block.register_forward_hook(leave))
    was_checkpointing = getattr(transformer, "gradient_checkpointing", False)
    if was_checkpointing:
        transformer.disable_gradient_checkpointing()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            forward()
    finally:
        for handle in handles:
            handle.remove()
        held.clear()
        if was_checkpointing:
            transformer.enable_gradient_checkpointing()
    return sizes


def activation_budget(cap_bytes: int, in_use_bytes: int, lora_bytes: int, block_bytes: Sequence[int],
                      preview_reserve_bytes: int) -> int:
    """What the card leaves for kept activations (counted at ``FRAGMENTATION``), under a cap of ``cap_bytes``.

    Already in use (weights, LoRA, cached latents): ``in_use_bytes``. Still to come: the LoRA's gradients and AdamW's
    two moments (3x the float32 LoRA), the recomputation of the largest block (what every-block checkpointing needs),
    the previews (``preview_reserve_bytes``) and ``SAFETY_GIB``."""
    floor = in_use_bytes + 3 * lora_bytes + max(block_bytes, default=0) + preview_reserve_bytes + SAFETY_GIB * GIB
    return max(0, int((cap_bytes - floor) / FRAGMENTATION))
