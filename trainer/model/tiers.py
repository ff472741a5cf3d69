"""Memory tiers: how a job fits a GPU of 40+, 24, 16 or 12 GB, and which tier a detected GPU gets.

A tier is a commented file in ``presets/memory/``: how the frozen base weights are stored (``bf16``, ``fp8``
or ``nf4``: ``trainer.model.quantize``) and whether activations are recomputed (gradient checkpointing). The job
runs in the same order on every tier — text encoders on the GPU, prompts encoded once, encoders freed, then
the transformer placed (quantized layer by layer from the CPU copy) — so the T5 encoder (8.9 GiB) and the
transformer are never on the GPU together. ``bench/tier_bench.py`` runs a whole job under each tier's cap.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.errors import UserError

TIERS_DIR = Path(__file__).resolve().parents[2] / "presets" / "memory"
AUTO = "auto"
WEIGHT_STORAGES = ("bf16", "fp8", "nf4")
MATMULS = ("bf16", "fp8")  # how the frozen base multiplies: in bf16 (dequantizing), or in fp8 (trainer.model.fp8_matmul)
AS_NEEDED = "as-needed"  # gradient_checkpointing: recompute only the blocks the card has no room to keep
# What a card of N GB leaves to one process: the CUDA context (~0.5 GiB) and, on a desktop, the display take
# the rest. The benchmark caps each tier at this much, not at the card's full size.
RESERVED_GIB = 1.0


@dataclass(frozen=True)
class MemoryTier:
    name: str
    description: str
    min_card_gib: float  # the smallest GPU (total memory, GiB) this tier is picked for
    weights: str  # "bf16" | "fp8" | "nf4": storage of the frozen transformer weights
    gradient_checkpointing: bool
    # "as-needed" in the file: checkpoint only as many blocks as the card's memory requires, planned from each block's
    # measured activations at the job's size (trainer.training.accel.checkpointing); false here means every block.
    checkpoint_as_needed: bool = False
    # Previews on small cards: one image at a time and no CUDA graph for the preview forward. A captured graph keeps
    # its own memory pool for the whole run (0.9-1.9 GiB measured at 512 px with a batch of 3), which pushed the
    # 16 and 12 GB tiers over their cap on an H100 (bench/RESULTS.md); the lean way renders previews more slowly.
    lean_previews: bool = False
    # "fp8": the block layers multiply in fp8 on GPUs with fp8 tensor cores (bf16 storage is quantized to fp8 for it,
    # with a transposed copy for backward: the same bytes); elsewhere, or with ONE_IMAGE_LORA_FP8_MATMUL=0, in bf16.
    matmul: str = "bf16"

    @property
    def card_gib(self) -> float | None:
        """The card size the tier is made for (the ``24`` of ``24gb``); None for ``full``."""
        return float(self.name[:-2]) if self.name.endswith("gb") and self.name[:-2].isdigit() else None

    @property
    def cap_gib(self) -> float | None:
        """GPU memory the whole job must fit in on such a card (what the benchmark caps the process to)."""
        return None if self.card_gib is None else self.card_gib - RESERVED_GIB


def list_tiers(directory: Path = TIERS_DIR) -> list[MemoryTier]:
    """Every tier, largest card first."""
    tiers = [load_tier(p.stem, directory) for p in directory.glob("*.toml")]
    return sorted(tiers, key=lambda t: -t.min_card_gib)


def load_tier(name: str, directory: Path = TIERS_DIR) -> MemoryTier:
    path = directory / f"{name}.toml"
    if "/" in name or "\\" in name or not path.is_file():
        known = ", ".join(sorted(p.stem for p in directory.glob("*.toml")))
        raise UserError(f"Unknown memory tier '{name}'. Known tiers: {AUTO}, {known}.")
    with path.open("rb") as f:
        data = tomllib.load(f)
    try:
        checkpointing = data["gradient_checkpointing"]
        if checkpointing not in (True, False, AS_NEEDED):
            raise UserError(f"Memory tier '{name}': gradient_checkpointing must be true, false or \"{AS_NEEDED}\".")
        tier = MemoryTier(name=name, description=str(data["description"]), min_card_gib=float(data["min_card_gib"]),
                          weights=str(data["weights"]), gradient_checkpointing=checkpointing is not False,
                          checkpoint_as_needed=checkpointing == AS_NEEDED,
                          lean_previews=bool(data.get("lean_previews", False)),
                          matmul=str(data.get("matmul", "bf16")))
    except KeyError as missing:
        raise UserError(f"Memory tier file '{path}' lacks {missing}.") from None
    if tier.weights not in WEIGHT_STORAGES:
        raise UserError(f"Memory tier '{name}': weights must be one of {', '.join(WEIGHT_STORAGES)}.")
    if tier.matmul not in MATMULS or (tier.matmul == "fp8" and tier.weights == "nf4"):
        raise UserError(f"Memory tier '{name}': matmul must be one of {', '.join(MATMULS)} (fp8 with bf16 or fp8 "
                        "weights, not nf4).")
    return tier


def tier_names() -> list[str]:
    return [AUTO, *(t.name for t in list_tiers())]


@dataclass(frozen=True)
class TierChoice:
    tier: MemoryTier
    reason: str  # one sentence for the user: which GPU, how much memory, why this tier


def gpu_memory_gib(device: torch.device) -> tuple[str, float] | None:
    """(name, total GiB) of a CUDA device, None off CUDA."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device)
    return props.name, props.total_memory / 2 ** 30


def tier_for_card(total_gib: float, tiers: list[MemoryTier] | None = None) -> MemoryTier | None:
    """The fastest tier a card of ``total_gib`` fits, or None when it is smaller than every tier."""
    for tier in tiers or list_tiers():  # largest first, so the first that fits is the fastest
        if total_gib >= tier.min_card_gib:
            return tier
    return None


def tiers_dir(family=None) -> Path:
    """A model family's tier files (``ModelFamily.tiers_dir``, relative to the project); FLUX.1's without one."""
    sub = getattr(family, "tiers_dir", None)
    return TIERS_DIR.parents[1] / sub if sub else TIERS_DIR


def choose_tier(requested: str, device: torch.device, tiny_model: bool = False,
                gpu: tuple[str, float] | None = None, task: str = "training", family=None) -> TierChoice:
    """The tier a job runs with. ``requested``: ``auto`` or a tier name. ``gpu`` overrides detection (tests).
    ``task`` names what needs the memory in the message for a card too small ("training", "rendering"); ``family``:
    the model's family, whose own tiers apply (FLUX.1's when None)."""
    directory = tiers_dir(family)
    model_label = getattr(family, "label", "FLUX.1")
    tiers = list_tiers(directory)
    full = next(t for t in tiers if t.weights == "bf16")
    gpu = gpu if gpu is not None else gpu_memory_gib(device)
    if requested != AUTO:
        tier = load_tier(requested, directory)
        where = f" on {gpu[0]} ({gpu[1]:.1f} GiB)" if gpu else ""
        return TierChoice(tier, f"Memory tier '{tier.name}' as chosen{where}: {tier.description}.")
    if tiny_model:
        return TierChoice(full, "Memory tier 'full': the tiny demo model needs no memory savings.")
    if gpu is None:
        return TierChoice(full, "Memory tier 'full': no CUDA GPU, so nothing is traded for GPU memory.")
    name, total = gpu
    tier = tier_for_card(total, tiers)
    if tier is None:
        smallest = tiers[-1]
        raise UserError(f"{name} has {total:.1f} GiB of memory; {task} with {model_label} needs a GPU with at least "
                        f"{smallest.card_gib or smallest.min_card_gib:.0f} GB (the '{smallest.name}' tier). Use a larger "
                        "GPU, or the tiny-demo model to try the workflow.")
    return TierChoice(tier, f"Memory tier '{tier.name}' picked for {name} ({total:.1f} GiB): {tier.description}.")
