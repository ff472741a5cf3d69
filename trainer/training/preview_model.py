"""Previews drawn by a second model of the same architecture: FLUX.2 [klein]'s distilled model beside its base.

The makers and practitioners train klein LoRAs on the *base* model and use them on the *distilled* one (4 steps,
guidance 1; docs/PRACTICE.md §9). Previews drawn by the base model at 50 steps with CFG show the LoRA as nobody will
use it, and cost 25x the denoising passes. So a job can name a preview model (``TrainingConfig.preview_model``):
its transformer is loaded beside the one being trained, gets the same LoRA (same targets, rank and alpha), and
before every preview round the training LoRA's current weights are copied into it. The copy is exact (the same
tensors by name), so a preview is what loading that checkpoint into the distilled pipeline would render.

It costs a second transformer on the GPU, stored like the training one (bf16 or fp8/NF4 as the memory tier
says). Where the tier renders lean previews (16 and 12 GB cards) there is no room beside training, and the job
says so and previews on the base model; so it does when the GPU runs out of memory loading it.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.errors import UserError
from trainer.families import family_of_folder
from trainer.model.lora import add_lora

log = logging.getLogger(__name__)

# The transformer config keys that make two models interchangeable for one LoRA (its targets and their shapes).
ARCHITECTURE_KEYS = ("in_channels", "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                     "joint_attention_dim", "mlp_ratio", "guidance_embeds")


@dataclass
class PreviewModel:
    """The second transformer, its LoRA (a copy of the training one's, refreshed before each round) and its label."""
    transformer: torch.nn.Module
    label: str
    steps: int
    guidance: float

    def sync_lora(self, training_transformer: torch.nn.Module) -> int:
        """Copy the training LoRA's current weights in; returns how many tensors were copied (all of them)."""
        source = _lora_tensors(training_transformer)
        target = _lora_tensors(self.transformer)
        if source.keys() != target.keys():  # same family and architecture were checked: this would be a bug
            raise RuntimeError(f"preview model's LoRA differs from the training LoRA ({len(source)} vs "
                               f"{len(target)} tensors)")
        with torch.no_grad():
            for name, tensor in source.items():
                target[name].copy_(tensor)
        return len(source)


def _lora_tensors(transformer) -> dict[str, torch.Tensor]:
    # Names without the wrappers compiling or DDP may add, so a compiled training transformer matches an eager one.
    return {n.replace("_orig_mod.", "").removeprefix("module."): p for n, p in transformer.named_parameters()
            if ".lora_" in n}


def check_preview_folder(folder: Path, base_folder: Path) -> None:
    """Refuse a preview model of another family or architecture than the model being trained, by name."""
    family, base_family = family_of_folder(folder), family_of_folder(base_folder)
    if family is not base_family:
        raise UserError(f"The preview model '{folder.name}' is {family.label}; the model being trained is "
                        f"{base_family.label}. Pick a preview model of the same family.")
    mine, theirs = _architecture(folder), _architecture(base_folder)
    if mine != theirs:
        differs = ", ".join(k for k in ARCHITECTURE_KEYS if mine.get(k) != theirs.get(k))
        raise UserError(f"The preview model '{folder.name}' has another architecture than the model being trained "
                        f"({differs} differ): a LoRA trained on one cannot render on the other.")


def _architecture(folder: Path) -> dict:
    import json

    path = Path(folder) / "transformer" / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"'{path}' is missing or not valid JSON: the preview model folder looks incomplete.") from None
    return {k: config.get(k) for k in ARCHITECTURE_KEYS}


def load_preview_model(parts, folder: Path, cfg, tier) -> tuple[PreviewModel | None, str]:
    """The preview model placed beside training, or None; with the sentence the job shows about it."""
    family = parts.family
    steps, guidance = family.distilled_render
    label = f"{folder.name} ({steps} steps, guidance {guidance:g})"
    if tier.lean_previews:
        return None, (f"Previews render on the base model: on the '{tier.name}' memory tier there is no room for "
                      f"the preview model {folder.name} beside training. Compare and Try it can render the "
                      "checkpoints with it afterwards.")
    from trainer.model.loading import place_transformer

    transformer = None
    try:
        transformer = family.transformer_class().from_pretrained(folder / "transformer", torch_dtype=parts.dtype)
        transformer.requires_grad_(False)
        place_transformer(dataclasses.replace(parts, transformer=transformer), tier.weights, matmul=tier.matmul,
                          training=False)
        add_lora(transformer, cfg.rank, cfg.alpha, cfg.seed)
        for p in transformer.parameters():
            p.requires_grad_(False)  # a copy of the training LoRA, never trained itself
        transformer.eval()
    except torch.OutOfMemoryError:
        del transformer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None, (f"Previews render on the base model: the GPU had no room for the preview model "
                      f"{folder.name} beside training.")
    return PreviewModel(transformer, label, steps, guidance), f"Previews render with {label}, the LoRA copied in " \
                                                              "before each round."
