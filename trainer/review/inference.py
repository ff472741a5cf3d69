"""Render with a base model and any saved LoRA at any weight: one pipeline, LoRAs swapped, prompts encoded once.

Shared by the comparison grid and the try-it tab. The base model is loaded once (``models.load_parts``, the one
place weights are loaded); each checkpoint is loaded as a named adapter with diffusers' own loading code
(``lora_state_dict`` + ``load_lora_into_transformer``, so an exported kohya file renders too) and switched with ``set_adapters(name, weight)``.
The base model's image is the same pipeline with LoRA disabled, so "with" and "without" differ by nothing else.
Prompt embeddings are cached, like the trainer's: a grid of N checkpoints x M seeds encodes each prompt once.

Rendering a checkpoint at weight 1.0 with the run's preview settings reproduces the preview the trainer drew
at that step (the tests check it): what the grid shows is what training showed.
"""
from __future__ import annotations

import gc
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from trainer.training.encode import PromptEmbedding, encode_prompts
from trainer.errors import UserError
from trainer.families import family_of_folder, family_of_metadata, family_of_spec
from trainer.model.weights import load_lora
from trainer.model.tiers import AUTO, choose_tier
from trainer.model.loading import ModelParts, is_tiny_demo, load_parts, pick_device, place_transformer, resolve_model

log = logging.getLogger(__name__)

MAX_ADAPTERS = 12  # loaded LoRAs kept in memory (a rank-16 FLUX.1-dev LoRA is ~80 MB); the oldest is dropped
MAX_PROMPTS = 128
MIN_WEIGHT, MAX_WEIGHT = 0.0, 2.0


@dataclass(frozen=True)
class RenderSettings:
    width: int
    height: int
    steps: int
    guidance: float
    max_text_tokens: int = 512

    def __post_init__(self) -> None:
        if self.width < 16 or self.height < 16 or self.width % 16 or self.height % 16:
            raise UserError(f"Image size {self.width}x{self.height} must be multiples of 16 pixels.")
        if self.width * self.height > 2048 * 2048:
            raise UserError("Image size is limited to 4 megapixels (e.g. 2048x2048).")
        if not 1 <= self.steps <= 200:
            raise UserError("Steps must be between 1 and 200.")


def base_model_folder(run, token: str | None = None) -> Path:
    """The local folder of the base model a run was trained on (resolved again if it moved)."""
    if run.model_path and Path(run.model_path).is_dir():
        return Path(run.model_path)
    return resolve_model(run.model, token)


def render_options(run) -> list[tuple[str, str]]:
    """The models a run's checkpoints can render with: its base model, and its family's distilled model (klein),
    or the preview model the run was previewed with. (label, model spec); "" is the base model."""
    family = family_of_spec(run.model)
    options = [(f"the run's base model ({run.config.preview_steps} steps, guidance {run.config.preview_guidance:g})",
                "")]
    if family.distilled_render is not None:
        steps, guidance = family.distilled_render
        for spec in dict.fromkeys(s for s in (run.config.preview_model, family.distilled_hub_id) if s):
            options.append((f"{Path(spec).name} — distilled ({steps} steps, guidance {guidance:g})", spec))
    return options


def default_render_model(run) -> str:
    """What the run's previews were drawn by (its preview model, or "" for the base model)."""
    return run.config.preview_model or ""


def render_defaults(run, render_with: str) -> tuple[int, float]:
    """(steps, guidance) to render with ``render_with``: the distilled model's own, or the run's preview settings."""
    family = family_of_spec(run.model)
    if (render_with or "").strip() and family.distilled_render is not None:
        return family.distilled_render
    return run.config.preview_steps, run.config.preview_guidance


def render_model_folder(run, render_with: str = "", token: str | None = None) -> Path:
    """The folder of the model that renders a run's checkpoints: its base model, or (``render_with``) another model
    of the same family — klein's distilled model, where a base-trained LoRA is used."""
    spec = (render_with or "").strip()
    if not spec:
        return base_model_folder(run, token)
    folder = resolve_model(spec, token)
    family, trained_on = family_of_folder(folder), family_of_spec(run.model)
    if family is not trained_on:
        raise UserError(f"'{folder.name}' is {family.label}; this run was trained on {trained_on.label}. Render it "
                        f"with a {trained_on.label} model.")
    return folder


class LoraPipeline:
    """A loaded base model that renders with a chosen LoRA file and weight, or with none (the base model)."""

    def __init__(self, parts: ModelParts):
        self.parts = parts
        self.model_path = Path(parts.model_path)
        self.pipe = parts.family.pipeline_for(parts, text_encoders=True)
        self._adapters: OrderedDict[tuple, str] = OrderedDict()  # (path, mtime, size) → adapter name
        self._counter = 0
        self._embeddings: OrderedDict[tuple[str, int], PromptEmbedding] = OrderedDict()
        self.lock = threading.RLock()  # one render at a time on this pipeline
        self.memory_tier = "full"  # how ``load`` placed the model (``memory.choose_tier``)

    @classmethod
    def load(cls, model_path: Path, device: torch.device | None = None, dtype: torch.dtype | None = None,
             memory_tier: str = AUTO) -> "LoraPipeline":
        """Load the base model for rendering as the GPU's memory tier says (``memory.choose_tier``, as training).

        The ``full`` tier keeps everything on the GPU in bf16. A smaller card's tier stores the transformer's frozen
        weights as fp8 / NF4 exactly as in training, and keeps the text encoders in host memory: new prompts are
        encoded there (slower, but once per prompt: embeddings are cached), so T5 never shares the GPU with the
        transformer. Without this the bf16 model (~31 GiB with T5) could not render on a 24, 16 or 12 GB card.
        """
        folder = Path(model_path)
        device, dtype = pick_device(device, dtype)  # the tier is chosen for this device, before loading
        choice = choose_tier(memory_tier, device, tiny_model=is_tiny_demo(folder), task="rendering",
                             family=family_of_folder(folder))
        weights = choice.tier.weights
        parts = load_parts(folder, device, dtype, transformer_on_device=False, encoders_on_device=weights == "bf16")
        place_transformer(parts, weights, matmul=choice.tier.matmul, training=False)
        log.info("rendering with %s", choice.reason)
        pipeline = cls(parts)
        pipeline.memory_tier = choice.tier.name
        return pipeline

    # ---- prompts
    def embed(self, prompts: list[str], max_tokens: int) -> dict[str, PromptEmbedding]:
        """Embeddings for ``prompts``, encoding only those not seen before."""
        with self.lock:
            missing = [p for p in dict.fromkeys(prompts) if (p, max_tokens) not in self._embeddings]
            if missing:
                for prompt, embedding in encode_prompts(self.parts, missing, max_tokens).items():
                    self._embeddings[(prompt, max_tokens)] = embedding
            out = {}
            for p in prompts:
                self._embeddings.move_to_end((p, max_tokens))
                out[p] = self._embeddings[(p, max_tokens)]
            while len(self._embeddings) > MAX_PROMPTS:
                self._embeddings.popitem(last=False)
            return out

    # ---- LoRAs
    def adapter_for(self, lora: Path) -> str:
        """Load ``lora`` as a named adapter (once; reloaded if the file changed). Returns its name."""
        lora = Path(lora).resolve()
        try:
            stat = lora.stat()
        except OSError:
            raise UserError(f"The checkpoint '{lora.name}' no longer exists.") from None
        key = (str(lora), stat.st_mtime_ns, stat.st_size)
        with self.lock:
            if key in self._adapters:
                self._adapters.move_to_end(key)
                return self._adapters[key]
            self._counter += 1
            name = f"lora_{self._counter}"
            _, metadata = load_lora(lora)  # refuse anything but a sane LoRA .safetensors before diffusers opens it
            trained_on, here = family_of_metadata(metadata), self.parts.family
            if trained_on is not here:
                raise UserError(f"'{lora.name}' was trained on {trained_on.label}; the base model here is "
                                f"{here.label}. Use it with a {trained_on.label} base model.")
            try:
                self._load_adapter(lora, name)
            except (ValueError, KeyError, RuntimeError, OSError) as err:
                raise UserError(f"Could not load '{lora.name}' onto {self.model_path.name}: {err}. Was it trained "
                                "on this base model?") from None
            self._adapters[key] = name
            while len(self._adapters) > MAX_ADAPTERS:
                _, old = self._adapters.popitem(last=False)
                self.pipe.delete_adapters(old)
            return name

    def _load_adapter(self, lora: Path, name: str) -> None:
        """diffusers' ``load_lora_weights`` minus two steps that don't apply here: its check for Flux Control LoRAs
        that widen layers reads every targeted Linear's weight as a 2-D matrix (an NF4-stored layer keeps its codes
        packed in one dimension, so the 12 GB tier could load no LoRA), and its text-encoder part (prompts are
        encoded without a LoRA and cached). ``lora_state_dict`` still converts kohya / other trainers' keys."""
        import inspect

        # FLUX.1's loader returns and takes kohya network alphas; FLUX.2's folds them in (no alphas argument).
        with_alphas = "network_alphas" in inspect.signature(self.pipe.load_lora_into_transformer).parameters
        if with_alphas:
            state_dict, alphas, metadata = self.pipe.lora_state_dict(str(lora), return_alphas=True,
                                                                     return_lora_metadata=True)
        else:
            (state_dict, metadata), alphas = self.pipe.lora_state_dict(str(lora), return_lora_metadata=True), None
        if not any("lora" in key for key in state_dict):
            raise ValueError("the file holds no LoRA weights")
        extra = dict(network_alphas=alphas) if with_alphas else {}
        self.pipe.load_lora_into_transformer(state_dict, transformer=self.pipe.transformer, adapter_name=name,
                                             metadata=metadata, _pipeline=self.pipe, **extra)

    def use(self, lora: Path | None, weight: float = 1.0) -> None:
        """Make the next render use ``lora`` at ``weight``; ``None`` renders the base model."""
        with self.lock:
            if lora is None:
                if self._adapters:
                    self.pipe.disable_lora()
                return
            if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
                raise UserError(f"LoRA weight {weight} is outside {MIN_WEIGHT}–{MAX_WEIGHT}.")
            name = self.adapter_for(lora)
            self.pipe.enable_lora()
            self.pipe.set_adapters([name], adapter_weights=[float(weight)])

    # ---- images
    @torch.no_grad()
    def render(self, prompt: str, seed: int, settings: RenderSettings, lora: Path | None = None,
               weight: float = 1.0, references: Sequence[Image.Image] = ()) -> Image.Image:
        """One image; ``references``: pictures a reference-editing family (``takes_reference_images``) renders the
        subject of, as the prompt tells it."""
        family = self.parts.family
        if references and not family.takes_reference_images:
            raise UserError(f"{family.label} takes no reference images; use a FLUX.2 [klein] model to render the "
                            "subject of a picture without training.")
        with self.lock:
            embedding = self.embed([prompt], settings.max_text_tokens)[prompt]
            self.use(lora, weight)
            generator = torch.Generator(device=self.parts.device).manual_seed(int(seed))
            extra = dict(image=[r.convert("RGB") for r in references]) if references else {}
            try:
                return self.pipe(**family.pipeline_inputs([embedding], settings.guidance),
                                 width=settings.width, height=settings.height, num_inference_steps=settings.steps,
                                 generator=generator, **extra).images[0]
            except torch.OutOfMemoryError:
                raise UserError("The GPU ran out of memory while rendering (a training job may be using it). "
                                "Try a smaller size, or wait until training finishes.") from None

    def close(self) -> None:
        with self.lock:
            self.pipe = None
            self.parts = None
            self._adapters.clear()
            self._embeddings.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class InferenceService:
    """Holds at most one loaded base model for the app, shared by the grid and the try-it tab.

    Loading FLUX.1-dev takes tens of seconds and ~34 GB, so it is loaded on first use and kept; asking for
    another base model replaces it.
    """

    def __init__(self, loader=LoraPipeline.load):
        self._loader = loader
        self._current: LoraPipeline | None = None
        self._lock = threading.Lock()

    def get(self, model_path: Path) -> LoraPipeline:
        model_path = Path(model_path)
        with self._lock:
            if self._current is not None and self._current.model_path == model_path:
                return self._current
            if self._current is not None:
                self._current.close()
                self._current = None
            try:
                self._current = self._loader(model_path)
            except torch.OutOfMemoryError:
                raise UserError("Not enough GPU memory to load the base model for rendering (a training job may "
                                "be using the GPU). Try again when it has finished.") from None
            return self._current

    def close(self) -> None:
        with self._lock:
            if self._current is not None:
                self._current.close()
                self._current = None
