"""The model-family seam: what differs between model families, behind one interface.

The rest of the trainer is written once for every family: masked loss, the step, the loop, previews, memory tiers,
checkpoints, resume, grids, export. It asks the run's ``ModelFamily`` for everything that depends on the
architecture, and nothing else in the tree names a family's classes, shapes or key names:

- **weights**: the diffusers pipeline and transformer classes, the Hub id(s), which folders a checkpoint needs,
  the full-size transformer config (for estimates and benchmarks) and the built-in tiny stand-in (random weights,
  built in code, saved in the real on-disk layout);
- **conditioning**: how prompts become embeddings (text encoders, token limit), how an image becomes latents
  (VAE normalisation), how latents are packed into tokens and their position ids, what the transformer's
  forward takes (pooled text, guidance embedded or not), and the timestep shift for an image size;
- **rendering**: the preview/inference pipeline built from the parts already in memory, and its call arguments;
- **the LoRA**: which Linear layers it targets, which layers a memory tier may quantize, and how its keys map to
  the original checkpoint names other tools load (``KohyaLayout``, used by ``trainer.review.export``);
- **words**: the label, license and download size the page shows before anything is fetched.

A family is an object (``trainer.families.FAMILIES`` lists them); a new family is one new module implementing this
class plus its presets. ``trainer.families.family_of_*`` finds the family of a model spec, a folder (its
``model_index.json``), a transformer or a checkpoint's keys.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch


@dataclass(frozen=True)
class KohyaLayout:
    """The original (BFL) checkpoint's layer names, as kohya/ComfyUI name LoRA keys, for diffusers' module paths.

    ``double_block[name]`` / ``single_block[name]``: the diffusers modules inside one block that the original fused
    layer ``name`` stands for, in output-row order (a fused layer's LoRA stacks its parts' A matrices and puts their B
    matrices on the block diagonal). ``global_layers``: layers outside the blocks. ``swapped``: layers whose output
    halves (scale, shift) are stored in the other order by the two layouts."""
    double_block: Mapping[str, tuple[str, ...]]
    single_block: Mapping[str, tuple[str, ...]]
    global_layers: Mapping[str, str]
    swapped: frozenset[str] = frozenset()
    double_prefix: str = "double_blocks"
    single_prefix: str = "single_blocks"
    # How a key is spelled: the layer's name, then ``.{down_key}`` / ``.{up_key}`` / ``.{alpha_key}``. kohya's own
    # spelling (FLUX.1) joins the original path with underscores under ``lora_unet_``; a family whose consumers read
    # the original dotted path (FLUX.2) says so. ``alpha_key=None``: no alpha tensors, alpha/rank folded into up.
    block_format: str = "lora_unet_{prefix}_{index}_{name}"
    global_format: str = "lora_unet_{name}"
    down_key: str = "lora_down.weight"
    up_key: str = "lora_up.weight"
    alpha_key: str | None = "alpha"
    network_module: str = "networks.lora_flux"  # what kohya's sd-scripts writes as ss_network_module
    base_model_version: str = "flux1"  # ss_base_model_version


@dataclass(frozen=True)
class TextReader:
    """One of a family's text encoders as it reads a caption: its tokenizer (a diffusers subfolder) and how many
    tokens it reads; the rest of a longer caption is cut off (``trainer.dataset.caption_length`` says so)."""
    name: str  # "T5"
    tokenizer: str  # the subfolder of its tokenizer: "tokenizer_2"
    limit: int | None = None  # None: the job's max_text_tokens (the family's own)
    chat: bool = False  # the caption is wrapped in the tokenizer's chat template first (FLUX.2's Qwen3)
    pooled: bool = False  # only a pooled summary vector (FLUX.1's CLIP): past it, the other encoder still reads


class ModelFamily(ABC):
    # ---- identity and words
    name: ClassVar[str]  # short id written into run.json and checkpoint metadata: "flux1"
    label: ClassVar[str]  # what the page shows: "FLUX.1 [dev]"
    default_hub_id: ClassVar[str]
    hub_ids: ClassVar[tuple[str, ...]] = ()  # every Hub id of the family the page offers (default first)
    gated: ClassVar[bool] = False  # its Hub repos need an accepted license and a token
    tiny_id: ClassVar[str]  # the built-in random-weight stand-in's model spec ("tiny-demo")
    tiny_version: ClassVar[int]  # bump when the tiny architecture changes, so cached copies are rebuilt
    tiny_notice: ClassVar[str]
    license_notice: ClassVar[str]  # shown before a download
    card_license: ClassVar[Mapping[str, str]]  # a published LoRA's model-card license fields (base model's license)
    card_tags: ClassVar[tuple[str, ...]]  # model-card tags that say which family the LoRA is for
    usage_steps: ClassVar[int]  # the model card's diffusers example: denoising steps and guidance
    usage_guidance: ClassVar[float]
    download_gb: ClassVar[float]  # what a Hub download of the diffusers folders weighs
    download_notice: ClassVar[str]  # size to download, GPU memory needed

    # ---- weights on disk
    pipeline_classes: ClassVar[tuple[str, ...]]  # model_index.json "_class_name" values of this family
    transformer_class_name: ClassVar[str]
    required_parts: ClassVar[tuple[str, ...]]  # subfolders a diffusers folder of this family must have
    weight_parts: ClassVar[tuple[str, ...]]  # of which these hold .safetensors weights
    hub_patterns: ClassVar[tuple[str, ...]]  # what to download of a Hub repo (diffusers layout only)
    transformer_config: ClassVar[Mapping[str, Any]]  # the full-size transformer (estimates, benchmarks)
    tiny_transformer_config: ClassVar[Mapping[str, Any]]

    # ---- the LoRA and memory
    lora_target_modules: ClassVar[str]  # peft regex over module names, anchored to the blocks
    quantizable_layer: ClassVar[re.Pattern]  # Linear layers a memory tier may store in fp8/NF4 (inside the blocks)
    kohya: ClassVar[KohyaLayout]
    max_text_tokens: ClassVar[int]  # the most text tokens its text encoder is read to
    text_readers: ClassVar[tuple[TextReader, ...]]  # its text encoders, the one the transformer attends to first
    # (steps, guidance) of the family's distilled model, which can draw a job's previews and render in Compare /
    # Try it (trainer/training/preview_model.py); None where the family has none to offer.
    distilled_render: ClassVar[tuple[int, float] | None] = None
    distilled_hub_id: ClassVar[str | None] = None
    # Whether its pipeline takes reference images (``image=``) and renders the subject in them as told: the zero-shot
    # source of candidates in trainer/grow/ (FLUX.2 [klein] does, as FLUX.1 Kontext does; FLUX.1 [dev] does not).
    takes_reference_images: ClassVar[bool] = False
    tiers_dir: ClassVar[str] = "presets/memory"  # its GPU memory tiers (trainer.model.tiers), relative to the project

    def keeps_full_precision(self, name: str, layer) -> bool:
        """A memory tier's ``skip``: this Linear stays in full precision (``trainer.model.quantize``)."""
        return self.quantizable_layer.search(name) is None

    # ---- classes
    @abstractmethod
    def pipeline_class(self) -> type: ...

    def transformer_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.transformer_class_name)

    def meta_transformer(self, config: Mapping[str, Any] | None = None):
        """The transformer built on the meta device (no memory, no weights): layer shapes for estimates."""
        with torch.device("meta"):
            return self.transformer_class()(**dict(config or self.transformer_config))

    @abstractmethod
    def build_tiny_pipeline(self, seed: int = 0):
        """The whole pipeline at a CPU-friendly size with random weights, as ``save_pretrained`` will write it."""

    # ---- conditioning
    @abstractmethod
    def encode_prompts(self, parts, prompts: list[str], max_tokens: int) -> dict:
        """``{prompt: PromptEmbedding}``, computed where the text encoders are and moved where the transformer runs."""

    @abstractmethod
    def encode_image(self, parts, pixels: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) of ``pixels`` (B, 3, H, W in [-1, 1]), normalised as the family's pipeline expects."""

    @abstractmethod
    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents → (B, tokens, D) transformer input."""

    @abstractmethod
    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The inverse of ``pack`` for a latent of ``height`` x ``width``."""

    @abstractmethod
    def image_ids(self, height: int, width: int, device, dtype) -> torch.Tensor:
        """Position ids of the packed tokens of a ``height`` x ``width`` latent."""

    @abstractmethod
    def training_shift(self, scheduler, image_tokens: int) -> float:
        """``mu`` of the timestep shift for ``image_tokens`` tokens, as the family's sampler shifts its schedule."""

    @abstractmethod
    def transformer_inputs(self, transformer, tokens: torch.Tensor, sigmas: torch.Tensor, caption,
                           image_ids: torch.Tensor, guidance_scale: float) -> dict[str, Any]:
        """Keyword arguments of the transformer's forward for one training step (``return_dict`` excluded)."""

    # ---- rendering
    @abstractmethod
    def pipeline_for(self, parts, text_encoders: bool = False):
        """A diffusers pipeline over the parts already loaded; without text encoders it renders cached embeddings."""

    @abstractmethod
    def pipeline_inputs(self, embeddings: list, guidance: float) -> dict[str, Any]:
        """The pipeline call's conditioning arguments for a batch of cached ``PromptEmbedding``s."""

    def __repr__(self) -> str:
        return f"<model family {self.name}>"
