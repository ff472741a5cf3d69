"""Numbers a user sees before training: how many checkpoints, how big, how much disk.

Checkpoint size is computed from the real layer shapes of the chosen architecture (built on the meta
device, so no memory and no weights are needed), not guessed.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from trainer.model.lora import lora_size_bytes
from trainer.model.tiny import TINY_TRANSFORMER_CONFIG

# The FLUX.1-dev transformer (black-forest-labs/FLUX.1-dev, transformer/config.json).
FLUX_DEV_TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def transformer_config_for(model: str) -> dict:
    if model == "tiny-demo":
        return dict(TINY_TRANSFORMER_CONFIG)
    config_file = Path(model).expanduser() / "transformer" / "config.json"
    if config_file.is_file():
        try:
            data = json.loads(config_file.read_text())
            return {k: data[k] for k in FLUX_DEV_TRANSFORMER_CONFIG if k in data}
        except (OSError, ValueError):
            pass
    return dict(FLUX_DEV_TRANSFORMER_CONFIG)  # a Hub id: assume the FLUX.1 architecture


@functools.lru_cache(maxsize=8)
def _meta_transformer(config_json: str):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**json.loads(config_json))


def checkpoint_bytes(model: str, rank: int, bytes_per_value: int = 2) -> int:
    transformer = _meta_transformer(json.dumps(transformer_config_for(model), sort_keys=True))
    return lora_size_bytes(transformer, rank, bytes_per_value)


def bytes_per_saved_value(model: str) -> int:
    """Checkpoints are saved in the training dtype: bf16 on a GPU, float32 for the tiny demo on a CPU."""
    return 4 if model == "tiny-demo" and not torch.cuda.is_available() else 2


def plan_summary(model: str, rank: int, checkpoint_steps: list[int]) -> str:
    size = checkpoint_bytes(model, rank, bytes_per_saved_value(model))
    n = len(checkpoint_steps)
    shown = ", ".join(str(s) for s in checkpoint_steps[:12]) + (" …" if n > 12 else "")
    return (f"**{n} checkpoints** (steps {shown}), about **{_mb(size)} each, {_mb(size * n)} in all**.")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"
