"""What the training loop consumes, computed once: latents of the image and the prompts' text embeddings.

With one image there is nothing else to load, so latents and embeddings are cached and the text encoders can
leave the GPU before training.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.dataset.prepare import TrainingImage, latent_weights
from trainer.training.flow import latent_image_ids


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
    # (N, C, h, w): the subject composited onto N varied backgrounds (``trainer.dataset.augment``), trained unmasked
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
