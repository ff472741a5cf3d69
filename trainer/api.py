"""The front door: everything the page may call, and the decisions the page and the CLI share.

The data's way is one direction — upload → dataset → config → job → events → UI — and this module is where the UI
enters it. ``ui/`` imports only ``trainer.api``, ``trainer.events`` and ``trainer.errors`` (``tests/test_architecture.py``
keeps it so); the CLI makes the same decisions through the same functions:

- ``RunRequest`` → ``training_config``: a preset, the user's overrides and the model's own adjustments become one
  ``TrainingConfig`` (the page's step 4–5 and ``python -m trainer train`` both go through it); the length may be
  asked in epochs of the set (``trainer.training.schedule`` converts, both ways);
- ``choose_mask``: which mask trains, where it came from, and its warning (``trainer.dataset.choice``);
- ``RunStore``: owner folders, the run listing and the path guard (``trainer.runs.store``);
- the rest is the public surface of each stage, listed below by stage. Names are imported on first use, so importing
  this module stays cheap (the torch/diffusers/onnxruntime parts load when the page first needs them).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from trainer.config import TrainingConfig, load_preset
from trainer.errors import UserError

DEFAULT_PRESET = "character-rank4-400"


@dataclass(frozen=True)
class RunRequest:
    """What a user asks for, before it is checked: the page's form or the CLI's flags."""
    caption: str
    preset: str = DEFAULT_PRESET
    trigger: str = ""
    sample_prompts: tuple[str, ...] = ()
    model: str | None = None  # None: the default for this machine (FLUX.1-dev with a CUDA GPU, else shapes-demo)
    masked: bool = True
    # TrainingConfig fields that replace the preset's (rank, steps, learning_rate, save_every, memory_tier, batch_size,
    # the mask step's loss settings, ...); a key that is not a setting is a UserError naming the known ones.
    overrides: Mapping[str, Any] = field(default_factory=dict)
    images: int = 1  # the set's size (trainer.dataset.imageset): what an epoch counts
    gpus: int = 1  # the data-parallel processes that will train it
    # the length in epochs instead of steps (each image seen once = 1 epoch): steps = images x epochs / (batch x gpus)
    epochs: float | None = None


def time_notice(config: TrainingConfig) -> str:
    """"≈ N min on this machine" before Train, for a tiny model on a machine without a CUDA GPU ("" otherwise): the
    page and the CLI say the same (``trainer.training.estimate``)."""
    import torch

    from trainer.training.estimate import cpu_time_notice

    return cpu_time_notice(config, cuda=torch.cuda.is_available())


CPU_DEMO_PRESET = "cpu-demo-shapes-300"  # offered first by the page on a machine without a CUDA GPU (shapes-demo)


def training_config(request: RunRequest) -> tuple[TrainingConfig, str]:
    """The job's settings, and a notice for the user ("" when none): preset + overrides, then what the model changes
    (the tiny demo previews with fewer denoising steps, to stay quick on a CPU)."""
    from trainer.model.loading import adjust_for_model, default_model

    caption = (request.caption or "").strip()
    if not caption:
        raise UserError("Write a caption first: describe everything in the image ([trigger] marks the trigger word).")
    config = load_preset(request.preset).config(
        caption=caption, trigger=(request.trigger or "").strip(),
        sample_prompts=tuple(p.strip() for p in request.sample_prompts if p.strip()),
        model=(request.model or default_model()).strip(), masked=request.masked, **dict(request.overrides))
    if request.epochs is not None:
        from trainer.training.schedule import steps_for_epochs

        if "steps" in request.overrides:
            raise UserError("Give the length in steps or in epochs, not both.")
        if not request.epochs > 0:
            raise UserError(f"Epochs must be more than 0, got {request.epochs:g}.")
        config = config.replace(steps=steps_for_epochs(request.epochs, request.images, config.batch_size,
                                                       request.gpus))
    return adjust_for_model(config)


# ---- the public surface, by stage: name -> the module that defines it --------------------------------------------
_EXPORTS: dict[str, str] = {}


def _export(module: str, *names: str) -> None:
    for name in names:
        _EXPORTS[name] = module


# the process
_export("trainer.paths", "SPACE_VOLUME", "data_dir", "runs_dir")
_export("trainer.runtime", "Runtime", "current_runtime")
_export("trainer.libraries", "quiet_libraries")
# settings
_export("trainer.config", "TrainingConfig", "list_presets", "load_preset", "TRIGGER_PLACEHOLDER")
# 1. dataset: the untrusted-image gate, advice, masks and the user's corrections, own backgrounds
_export("trainer.dataset.images", "MAX_FILE_BYTES", "alpha_mask", "load_image", "load_mask")
_export("trainer.dataset.advice", "image_advice", "set_advice")
_export("trainer.dataset.imageset", "MAX_IMAGES", "LoadedSet", "SetImage", "load_folder", "load_images")
_export("trainer.dataset.choice", "MaskChoice", "choose_mask", "cut_out", "mask_coverage")
_export("trainer.dataset.masking", "MASK_MODELS", "auto_mask_result", "default_mask_model", "mask_network",
        "mask_warning", "warm_up")
_export("trainer.dataset.mask_tools", "TOKEN_PX", "adjust_mask", "apply_strokes", "thin_share", "token_grid_view",
        "train_size_for")
_export("trainer.dataset.caption", "CAPTION_MODELS", "DEFAULT_CAPTION_MODEL", "caption_images", "free_captioner",
        "loaded_captioners")
_export("trainer.dataset.caption_trigger", "place_trigger")
_export("trainer.dataset.caption_length", "CaptionLength", "caption_length")
_export("trainer.dataset.augment", "MAX_USER_BACKGROUNDS", "load_user_backgrounds")
# 2. model: ids, what a model costs, memory tiers
_export("trainer.model.loading", "FLUX_DEV", "SHAPES_DEMO", "SHAPES_DEMO_NOTICE", "TINY_DEMO", "TINY_DEMO_NOTICE",
        "default_model")
_export("trainer.families", "FAMILIES", "builtin_ids", "family_of_spec", "tiny_ids")
_export("trainer.model.estimates", "plan_summary")
_export("trainer.training.estimate", "cpu_time_notice")
_export("trainer.model.tiers", "AUTO", "choose_tier", "list_tiers")
_export("trainer.training.schedule", "epochs_at_step", "learning_rate_note", "samples_per_step", "scaled_learning_rate",
        "steps_for_epochs")
# 3. runs and jobs
_export("trainer.runs.store", "RunListing", "RunStore")
_export("trainer.runs.folder", "RunFolder")
_export("trainer.runs.diskspace", "start_temp_sweeper")
_export("trainer.jobs.manager", "Job", "JobManager", "gpu_devices")
# 4. review: grids, rendering with a LoRA, scores and the star, export, publishing
_export("trainer.review.advisor", "advice_from_grid", "advice_spec", "checkpoint_files", "disk_summary", "keep_last",
        "load_advice", "save_advice", "set_star", "starred_step")
_export("trainer.review.grid", "GridImages", "GridSpec", "fill_trigger", "parse_numbers", "plan_grid", "render_grid")
_export("trainer.review.prompts", "suggest_prompts")
_export("trainer.review.inference", "InferenceService", "RenderSettings", "base_model_folder", "default_render_model",
        "render_defaults", "render_model_folder", "render_options")
_export("trainer.review.export", "export_lora", "export_name")
_export("trainer.review.publish", "plan_publish", "publish")
# 5. grow the dataset: candidates from a checkpoint or by reference editing, picked into the next round
_export("trainer.grow.job", "GrowPlan", "GrowRequest", "default_reference_model", "grow", "plan_grow", "redraw")
_export("trainer.grow.candidates", "Candidate", "NEAR_COPY", "UNLIKE")
_export("trainer.grow.variations", "MAX_CANDIDATES", "plan_variations")
_export("trainer.grow.rounds", "plan_rounds_grid", "round_chain", "round_number")

__all__ = sorted({"CPU_DEMO_PRESET", "DEFAULT_PRESET", "RunRequest", "UserError", "time_notice", "training_config",
                  *_EXPORTS})


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"trainer.api has no {name!r}: the page may use only what trainer/api.py lists")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__

