"""Rectified-flow (flow-matching) math for Flux, as pure functions.

Follows diffusers' ``train_dreambooth_lora_flux.py`` and the Flux pipeline: the latent is packed into
2x2 patches, the noise level sigma is drawn logit-normally and then shifted by image size exactly as
the sampler shifts its schedule, the model sees ``x_t = (1 - sigma) x_0 + sigma * noise`` and predicts the
velocity ``noise - x_0``.
"""
from __future__ import annotations

import math

import torch


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2 * W/2, C*4): each token is a 2x2 patch (same layout as FluxPipeline)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of ``pack_latents`` for a latent of ``height`` x ``width``."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def latent_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """Position ids (0, row, col) of the packed tokens of a ``height`` x ``width`` latent."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def resolution_shift(image_tokens: int, base_tokens: int = 256, max_tokens: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's ``mu``: larger images are trained (and sampled) at higher noise."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return image_tokens * slope + (base_shift - slope * base_tokens)


def shift_sigmas(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))


def sample_sigmas(batch: int, mu: float, generator: torch.Generator, device,
                  logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """Logit-normal noise levels in (0, 1), shifted by ``mu``."""
    u = torch.randn(batch, generator=generator, device=device) * logit_std + logit_mean
    return shift_sigmas(torch.sigmoid(u), mu)


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.view(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
    return (1.0 - s) * latents + s * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - latents


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None,
               normalize: bool = True) -> torch.Tensor:
    """Mean squared error weighted per latent pixel.

    ``weights`` is (B, 1, H, W) in [0, 1] (1 = subject, trained fully). With ``normalize`` the loss is divided
    by the mean weight, so a small subject gets the same step size as one that fills the frame.
    """
    error = (prediction.float() - target.float()).pow(2)
    if weights is None:
        return error.mean()
    w = weights.float().expand_as(error)
    loss = (error * w).mean()
    if normalize:
        loss = loss / w.mean().clamp_min(1e-6)
    return loss
