"""Typed training configuration, and the preset files it is loaded from.

``TrainingConfig`` is frozen: a job's settings never change once it starts, and the same object is
written to ``run.json``. ``from_dict`` is strict (an unknown or mistyped key is a ``UserError``), so a
typo in a preset or an API call fails loudly instead of being silently ignored.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import UserError

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
TRIGGER_PLACEHOLDER = "[trigger]"  # ai-toolkit's convention: replaced by the trigger word in captions and prompts
MAX_BATCH_SIZE = 16  # a set holds at most 10 images: a larger batch would only repeat them within one step


@dataclass(frozen=True)
class TrainingConfig:
    # --- what to learn
    caption: str = "a photo of [trigger]"
    trigger: str = ""
    sample_prompts: tuple[str, ...] = ()
    name: str = "lora"  # checkpoint files are "{name}-{step:06d}.safetensors"
    model: str = "tiny-demo"  # "tiny-demo", a Hugging Face id, or a local diffusers folder

    # --- LoRA and optimiser
    rank: int = 4  # alpha always equals rank (docs/PRACTICE.md §4)
    steps: int = 400
    save_every: int = 50
    learning_rate: float = 4e-4
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    seed: int = 42
    # Images per step on each GPU. 1 is best for one subject (docs/PRACTICE.md §7): every image gets its own update,
    # where a batch averages them into one. Larger batches only buy speed on big sets; the learning rate is then scaled
    # by sqrt(batch) (trainer.training.schedule.scaled_learning_rate). Images of different shapes can share a batch:
    # it is trained as that many one-image passes whose gradients are averaged before one optimizer step.
    batch_size: int = 1

    # --- data
    resolution: int = 512  # training area is resolution**2 pixels, aspect ratio kept
    max_text_tokens: int = 512  # T5 tokens; FLUX.1-dev was trained with 512

    # --- flow matching
    guidance_scale: float = 1.0  # the guidance embedding fed to dev while training (SimpleTuner and ai-toolkit use 1.0)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    gradient_checkpointing: bool = False
    # GPU memory tier (presets/memory/*.toml: full, 24gb, 16gb, 12gb): "auto" picks it from the detected GPU. A tier can
    # turn gradient checkpointing on and store the frozen base weights in fp8 or NF4; it never changes the LoRA's shape.
    memory_tier: str = "auto"

    # --- masked loss
    masked: bool = True
    background_weight: float = 0.0  # loss weight where the mask is black; 0 = the background is never trained
    normalize_mask: bool = True  # divide by the mask's mean so the step size does not depend on the subject's size
    unmasked_probability: float = 0.0  # fraction of steps trained on the whole image, as OneTrainer offers
    # fraction of steps that train the subject pasted onto a varied background, on the whole image (trainer/dataset/augment.py)
    augment_probability: float = 0.0

    # --- previews
    preview_steps: int = 20
    preview_guidance: float = 3.5
    preview_seed: int = 1
    preview_at_start: bool = True  # a step-0 preview shows the base model, the reference every checkpoint is judged against
    # A model of the same architecture that draws the previews instead (klein: its distilled model, which is where
    # a base-trained LoRA is used; trainer/training/preview_model.py): a Hub id or a local folder; "" = the base model.
    preview_model: str = ""

    def __post_init__(self) -> None:
        problems = []
        if self.rank < 1 or self.rank > 256:
            problems.append("rank must be between 1 and 256")
        if self.steps < 1:
            problems.append("steps must be at least 1")
        if self.save_every < 1:
            problems.append("save_every must be at least 1")
        if not (1 <= self.batch_size <= MAX_BATCH_SIZE):
            problems.append(f"batch_size must be between 1 and {MAX_BATCH_SIZE}")
        if not (0 < self.learning_rate < 1):
            problems.append("learning_rate must be between 0 and 1")
        if self.resolution < 64 or self.resolution % 16:
            problems.append("resolution must be a multiple of 16, at least 64")
        if not (0.0 <= self.background_weight <= 1.0):
            problems.append("background_weight must be between 0 and 1")
        if not (0.0 <= self.unmasked_probability <= 1.0):
            problems.append("unmasked_probability must be between 0 and 1")
        if not (0.0 <= self.augment_probability <= 1.0):
            problems.append("augment_probability must be between 0 and 1")
        if self.preview_steps < 1:
            problems.append("preview_steps must be at least 1")
        from trainer.model.tiers import tier_names

        if self.memory_tier not in tier_names():
            problems.append(f"memory_tier must be one of {', '.join(tier_names())}")
        if not self.name or any(c in self.name for c in '/\\:*?"<>|') or self.name.startswith("."):
            problems.append("name must be a plain file name (no slashes or special characters)")
        if problems:
            raise UserError("Invalid training settings: " + "; ".join(problems) + ".")

    # ---- derived values
    @property
    def alpha(self) -> float:
        return float(self.rank)

    @property
    def checkpoint_steps(self) -> list[int]:
        """Steps at which a checkpoint is saved: every ``save_every`` steps, and always the last one."""
        steps = list(range(self.save_every, self.steps + 1, self.save_every))
        if not steps or steps[-1] != self.steps:
            steps.append(self.steps)
        return steps

    def with_trigger(self, text: str) -> str:
        """Insert the trigger word: replace ``[trigger]``; if there is none, prepend the word."""
        trigger = self.trigger.strip()
        if TRIGGER_PLACEHOLDER in text:
            return " ".join(text.replace(TRIGGER_PLACEHOLDER, trigger).split())
        if trigger and trigger not in text:
            return f"{trigger}, {text}" if text else trigger
        return text

    @property
    def training_caption(self) -> str:
        return self.with_trigger(self.caption)

    @property
    def preview_prompts(self) -> list[str]:
        """The training caption first (can it re-create the image?), then the user's prompts."""
        prompts = [self.training_caption]
        for p in self.sample_prompts:
            if not p.strip():
                continue
            p = self.with_trigger(p.strip())
            if p not in prompts:
                prompts.append(p)
        return prompts

    # ---- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sample_prompts"] = list(self.sample_prompts)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainingConfig":
        return cls(**_checked_fields(cls, data))

    def replace(self, **changes: Any) -> "TrainingConfig":
        return self.from_dict({**self.to_dict(), **changes})


def _checked_fields(cls, data: dict[str, Any]) -> dict[str, Any]:
    """Type-check ``data`` against the dataclass fields; unknown keys are errors, not silently dropped."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"Unknown setting(s): {', '.join(unknown)}. Known settings: {', '.join(sorted(known))}.")
    out: dict[str, Any] = {}
    for key, value in data.items():
        hint = hints[key]
        try:
            out[key] = _coerce(value, hint)
        except (TypeError, ValueError):
            raise UserError(f"Setting '{key}' must be {_describe(hint)}, got {value!r}.") from None
    return out


def _coerce(value: Any, hint: Any) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise TypeError
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError
        return value
    if typing.get_origin(hint) is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise TypeError
        return tuple(value)
    raise TypeError


def _describe(hint: Any) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(hint, "a list of text")


# ---- presets -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    settings: dict[str, Any] = field(default_factory=dict)

    def config(self, **overrides: Any) -> TrainingConfig:
        return TrainingConfig.from_dict({**self.settings, **overrides})


def list_presets(directory: Path = PRESETS_DIR) -> list[Preset]:
    return [load_preset(p.stem, directory) for p in sorted(directory.glob("*.toml"))]


def load_preset(name: str, directory: Path = PRESETS_DIR) -> Preset:
    path = directory / f"{name}.toml"
    if "/" in name or "\\" in name or not path.is_file():
        names = ", ".join(p.stem for p in sorted(directory.glob("*.toml")))
        raise UserError(f"Unknown preset '{name}'. Available presets: {names}.")
    with path.open("rb") as f:
        data = tomllib.load(f)
    description = data.pop("description", "")
    TrainingConfig.from_dict(data)  # validate now: a broken preset file should fail at load, not mid-job
    return Preset(name=name, description=description, settings=data)
