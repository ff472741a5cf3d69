"""Numbers a user sees before training: how many checkpoints, how big, how much disk.

Checkpoint size is computed from the real layer shapes of the chosen architecture (built on the meta
device, so no memory and no weights are needed), not guessed.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from trainer.errors import UserError
from trainer.families import DEFAULT_FAMILY, DEMO_IDS, ModelFamily, builtin_ids, family_of_spec, tiny_ids
from trainer.model.lora import lora_size_bytes


def transformer_config_for(model: str) -> tuple[ModelFamily, dict]:
    """The family and transformer config of a model spec: a tiny model's, a local folder's own, else the family's
    full-size one (a Hub id, nothing downloaded)."""
    try:
        family = family_of_spec(model)
    except UserError:  # a damaged folder: the training job says so when it starts; estimate as the default family
        family = DEFAULT_FAMILY
    if model in tiny_ids():
        return family, dict(family.tiny_transformer_config)
    if model in DEMO_IDS:
        from trainer.paths import shipped_model_dir

        model = str(shipped_model_dir(model))
    config_file = Path(model).expanduser() / "transformer" / "config.json"
    if config_file.is_file():
        try:
            data = json.loads(config_file.read_text())
            return family, {k: data[k] for k in family.transformer_config if k in data}
        except (OSError, ValueError):
            pass
    return family, dict(family.transformer_config)


@functools.lru_cache(maxsize=8)
def _meta_transformer(family: ModelFamily, config_json: str):
    return family.meta_transformer(json.loads(config_json))


def checkpoint_bytes(model: str, rank: int, bytes_per_value: int = 2) -> int:
    family, config = transformer_config_for(model)
    transformer = _meta_transformer(family, json.dumps(config, sort_keys=True))
    return lora_size_bytes(transformer, rank, bytes_per_value)


def bytes_per_saved_value(model: str) -> int:
    """Checkpoints are saved in the training dtype: bf16 on a GPU, float32 for a built-in small model on a CPU."""
    return 4 if model in builtin_ids() and not torch.cuda.is_available() else 2


def plan_summary(model: str, rank: int, checkpoint_steps: list[int]) -> str:
    size = checkpoint_bytes(model, rank, bytes_per_saved_value(model))
    n = len(checkpoint_steps)
    shown = ", ".join(str(s) for s in checkpoint_steps[:12]) + (" …" if n > 12 else "")
    return (f"**{n} checkpoints** (steps {shown}), about **{_mb(size)} each, {_mb(size * n)} in all**.")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"
