"""What the training loop consumes, computed once: latents of the image and the prompts' text embeddings.

With one image there is nothing else to load, so latents and embeddings are cached and the text encoders can
leave the GPU before training. How a prompt or an image is encoded is the model family's (``parts.family``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.dataset.prepare import TrainingImage, latent_weights


@dataclass(frozen=True)
class PromptEmbedding:
    prompt: str
    embeds: torch.Tensor  # (1, T, D) text tokens (FLUX.1: T5)
    pooled: torch.Tensor | None  # (1, D) pooled text (FLUX.1: CLIP); None for a family without one
    text_ids: torch.Tensor  # the text tokens' position ids
    # the empty prompt's embeds, for a family that renders with classifier-free guidance (FLUX.2 [klein] base)
    negative: torch.Tensor | None = None


@dataclass(frozen=True)
class EncodedExample:
    latents: torch.Tensor  # (1, C, h, w), scaled and shifted like the pipeline expects
    weights: torch.Tensor | None  # (1, 1, h, w) or None when unmasked
    image_ids: torch.Tensor  # the packed latent tokens' position ids (FLUX.1: (h/2 * w/2, 3))
    caption: PromptEmbedding
    # (N, C, h, w): the subject composited onto N varied backgrounds (``trainer.dataset.augment``), trained unmasked
    augmented: torch.Tensor | None = None

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.latents.shape[-2], self.latents.shape[-1]


def encode_prompts(parts, prompts: list[str], max_tokens: int) -> dict[str, PromptEmbedding]:
    """Each distinct prompt once, where the text encoders are; the embeddings end up where the transformer runs."""
    return parts.family.encode_prompts(parts, prompts, max_tokens)


def encode_image(parts, image: TrainingImage) -> torch.Tensor:
    """VAE latents of the image, normalised as the family's pipeline expects (the distribution's mean, so caching
    is exact)."""
    return parts.family.encode_image(parts, image.pixels)


def encode_example(parts, image: TrainingImage, caption: str, prompt_cache: dict[str, PromptEmbedding],
                   masked: bool, background_weight: float) -> EncodedExample:
    latents = encode_image(parts, image)
    h, w = latents.shape[-2:]
    weights = None
    if masked and image.mask is not None:
        weights = latent_weights(image.mask, h, w, background_weight).to(parts.device)
    return EncodedExample(latents=latents, weights=weights,
                          image_ids=parts.family.image_ids(h, w, parts.device, parts.dtype),
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
