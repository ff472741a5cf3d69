"""Adding a LoRA to a transformer with peft, and saving it as diffusers loads it.

Which layers it wraps is the model family's choice (``ModelFamily.lora_target_modules``: for FLUX.1 the attention and
feed-forward projections of every block, as diffusers' Flux script and kohya train). A saved checkpoint records
its family in its metadata, so export and rendering know which key layout it has.
"""
from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch

from trainer.families import family_of_transformer
from trainer.fsutil import atomic_write_bytes

ADAPTER = "default"
LORA_METADATA_KEY = "lora_adapter_metadata"  # what diffusers' loader reads to recover rank and alpha


def add_lora(transformer, rank: int, alpha: float, seed: int) -> list[torch.nn.Parameter]:
    """Wrap the target layers with a fresh LoRA and return its (float32, trainable) parameters."""
    from peft import LoraConfig

    # peft draws the "gaussian" A matrices from torch's global generator: seed it so runs are reproducible.
    torch.manual_seed(seed)
    targets = family_of_transformer(transformer).lora_target_modules
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                       target_modules=targets), adapter_name=ADAPTER)
    params = [p for n, p in transformer.named_parameters() if ".lora_" in n]
    for p in params:
        # Train LoRA weights in float32 even on a bf16 base: Adam updates of ~1e-4 vanish in bf16.
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def remove_lora(transformer) -> None:
    if getattr(transformer, "peft_config", None) and ADAPTER in transformer.peft_config:
        transformer.delete_adapters(ADAPTER)


def lora_state_dict(transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """LoRA weights with diffusers' keys (``transformer.<module>.lora_A.weight``), on the CPU."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER)
    return {f"transformer.{k}": v.detach().to("cpu", dtype=dtype or v.dtype).contiguous() for k, v in state.items()}


def adapter_metadata(transformer) -> dict[str, str]:
    config = transformer.peft_config[ADAPTER].to_dict()
    keep = {k: config[k] for k in ("r", "lora_alpha", "target_modules", "init_lora_weights", "lora_dropout",
                                   "use_dora", "bias") if k in config}
    if isinstance(keep.get("target_modules"), (set, frozenset)):
        keep["target_modules"] = sorted(keep["target_modules"])
    return {LORA_METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in keep.items()}, sort_keys=True)}


def save_lora(transformer, path: Path, dtype: torch.dtype | None = None,
              extra_metadata: dict[str, str] | None = None) -> int:
    """Write the LoRA atomically as ``.safetensors`` (diffusers/peft layout). Returns the file size."""
    tensors = lora_state_dict(transformer, dtype)
    metadata = {"format": "pt", "family": family_of_transformer(transformer).name, **adapter_metadata(transformer),
                **(extra_metadata or {})}
    data = safetensors.torch.save(tensors, metadata=metadata)
    atomic_write_bytes(Path(path), data)
    return len(data)


def lora_size_bytes(transformer, rank: int, bytes_per_value: int) -> int:
    """Size of a saved LoRA of ``rank`` on this transformer, computed from layer shapes (no adapter needed)."""
    import re

    pattern = re.compile(family_of_transformer(transformer).lora_target_modules)
    total = 0
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name):
            total += rank * (module.in_features + module.out_features)
    return total * bytes_per_value
