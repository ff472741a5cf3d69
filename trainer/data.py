"""From an image (and its mask) to what the training loop consumes, computed once.

The image is resized to the training area with its aspect ratio kept (sides multiples of 16, so the
latent packs into 2x2 patches); the mask becomes per-latent-pixel loss weights by area averaging, so a
gray or edge pixel weighs in proportion. Latents and text embeddings are computed once and cached:
with one image there is nothing else to load, and the text encoders can leave the GPU before training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from trainer.flow import latent_image_ids

SIDE_MULTIPLE = 16  # VAE downsamples 8x, then 2x2 packing


def training_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """Width and height with about ``resolution**2`` pixels, the image's aspect, sides multiples of 16."""
    scale = math.sqrt(resolution * resolution / (width * height))
    w = max(SIDE_MULTIPLE, int(width * scale) // SIDE_MULTIPLE * SIDE_MULTIPLE)
    h = max(SIDE_MULTIPLE, int(height * scale) // SIDE_MULTIPLE * SIDE_MULTIPLE)
    return w, h


def _fit(image: Image.Image, size: tuple[int, int], resample) -> Image.Image:
    """Scale to cover ``size`` and center-crop the few pixels rounding to 16 left over."""
    w, h = size
    scale = max(w / image.width, h / image.height)
    scaled = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))), resample)
    left, top = (scaled.width - w) // 2, (scaled.height - h) // 2
    return scaled.crop((left, top, left + w, top + h))


@dataclass(frozen=True)
class TrainingImage:
    pixels: torch.Tensor  # (1, 3, H, W) in [-1, 1]
    mask: torch.Tensor | None  # (1, 1, H, W) in [0, 1]; 1 = subject

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[-1], self.pixels.shape[-2]


def prepare_image(image: Image.Image, mask: Image.Image | None, resolution: int) -> TrainingImage:
    size = training_size(image.width, image.height, resolution)
    rgb = _fit(image.convert("RGB"), size, Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    mask_tensor = None
    if mask is not None:
        m = _fit(mask.convert("L").resize(image.size, Image.Resampling.BILINEAR), size, Image.Resampling.BILINEAR)
        mask_tensor = torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)[None, None]
    return TrainingImage(pixels=pixels.contiguous(), mask=mask_tensor)


def latent_weights(mask: torch.Tensor, latent_height: int, latent_width: int,
                   background_weight: float = 0.0) -> torch.Tensor:
    """Per-latent-pixel loss weights: the mask area-averaged to latent size, floored at ``background_weight``."""
    coverage = F.interpolate(mask.float(), size=(latent_height, latent_width), mode="area")
    return background_weight + (1.0 - background_weight) * coverage.clamp(0.0, 1.0)


@dataclass(frozen=True)
class PromptEmbedding:
    prompt: str
    embeds: torch.Tensor  # (1, T, D) T5 tokens
    pooled: torch.Tensor  # (1, D) CLIP pooled
    text_ids: torch.Tensor  # (T, 3)


@dataclass(frozen=True)
class EncodedExample:
    latents: torch.Tensor  # (1, C, h, w), scaled and shifted like the pipeline expects
    weights: torch.Tensor | None  # (1, 1, h, w) or None when unmasked
    image_ids: torch.Tensor  # (h/2 * w/2, 3)
    caption: PromptEmbedding
    # (N, C, h, w): the subject composited onto N varied backgrounds (``trainer.augment``), trained unmasked
    augmented: torch.Tensor | None = None

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.latents.shape[-2], self.latents.shape[-1]


@torch.no_grad()
def encode_prompts(parts, prompts: list[str], max_tokens: int) -> dict[str, PromptEmbedding]:
    from diffusers import FluxPipeline

    encoder = FluxPipeline(scheduler=parts.scheduler, vae=None, text_encoder=parts.text_encoder,
                           tokenizer=parts.tokenizer, text_encoder_2=parts.text_encoder_2,
                           tokenizer_2=parts.tokenizer_2, transformer=None)
    max_tokens = min(max_tokens, parts.tokenizer_2.model_max_length)
    # Encoded where the encoders are: on the GPU in a training job, in host memory for rendering on a small card
    # (``models.load_parts(encoders_on_device=False)``); the embeddings then go where the transformer runs.
    encoder_device = next(parts.text_encoder_2.parameters()).device
    out = {}
    for prompt in dict.fromkeys(prompts):
        embeds, pooled, text_ids = encoder.encode_prompt(prompt=prompt, prompt_2=None, device=encoder_device,
                                                         max_sequence_length=max_tokens)
        out[prompt] = PromptEmbedding(prompt, embeds.to(parts.device, parts.dtype), pooled.to(parts.device, parts.dtype),
                                      text_ids.to(parts.device))
    return out


@torch.no_grad()
def encode_image(parts, image: TrainingImage) -> torch.Tensor:
    """VAE latents of the image, normalised as the Flux pipeline expects (the distribution's mean, so caching is exact)."""
    vae = parts.vae
    pixels = image.pixels.to(parts.device, dtype=vae.dtype)
    latents = vae.encode(pixels).latent_dist.mode()
    return ((latents - vae.config.shift_factor) * vae.config.scaling_factor).to(parts.dtype)


def encode_example(parts, image: TrainingImage, caption: str, prompt_cache: dict[str, PromptEmbedding],
                   masked: bool, background_weight: float) -> EncodedExample:
    latents = encode_image(parts, image)
    h, w = latents.shape[-2:]
    weights = None
    if masked and image.mask is not None:
        weights = latent_weights(image.mask, h, w, background_weight).to(parts.device)
    return EncodedExample(latents=latents, weights=weights,
                          image_ids=latent_image_ids(h, w, parts.device, parts.dtype),
                          caption=prompt_cache[caption])


def free_encoders(parts) -> None:
    """Drop the text encoders and the VAE encoder from the accelerator before training: their outputs are cached."""
    parts.text_encoder = None
    parts.text_encoder_2 = None
    # Dropped, not moved to the CPU: a diffusers pipeline takes its device from the VAE's first parameter, which
    # is the encoder's, so an encoder left on the CPU made the previews run there (seen on an H100).
    parts.vae.encoder = None
    if parts.device.type == "cuda":
        torch.cuda.empty_cache()
