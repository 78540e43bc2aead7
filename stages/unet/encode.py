"""What the UNet stage caches per sample, and how a cached (or fresh) batch becomes its input.

The frozen VAE and text encoder give, per sample:

    latent_mean, latent_std  (C, h, w) float32   the raw VAE posterior: training samples
                                                 z = mean + std * eps, so sampling stays possible
    tokens (L, D), pooled (D,)  float16 (or float32)  the text encoder's output
    mask (L,) bool                                    True = real token

``encode_batch`` is the stage's encode function for the shared cache
(``stages/common/cache.py``) and the on-the-fly path (``cache.enabled = false``) alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from stages.clip.export import LoadedCLIP, TextCondition
from stages.common.cache import CacheConfig
from stages.vae.export import LoadedVAE


@dataclass(frozen=True)
class UNetCacheConfig(CacheConfig):
    text_dtype: Literal["float16", "float32"] = "float16"  # storage of tokens and pooled


@torch.no_grad()
def encode_batch(
    vae: LoadedVAE,
    clip: LoadedCLIP,
    images: torch.Tensor,
    captions: list[str],
    text_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Images (B,3,H,W) in [-1,1] and captions -> the cached fields (on the encoders' device)."""
    mean, std = vae.encode(images)
    cond = clip.encode_text(list(captions))
    return {
        "latent_mean": mean,
        "latent_std": std,
        "tokens": cond.tokens.to(text_dtype),
        "mask": cond.mask,
        "pooled": cond.pooled.to(text_dtype),
    }


def latents_and_condition(
    batch: dict[str, torch.Tensor], vae: LoadedVAE, device: torch.device
) -> tuple[torch.Tensor, TextCondition]:
    """Cached (or freshly encoded) fields -> normalised latents x0 and the text condition.

    z = mean + std * eps draws from the posterior (global RNG, saved by the trainer), and the
    UNet sees (z - latent_mean) / latent_std with the VAE export's statistics.
    """
    mean = batch["latent_mean"].to(device, torch.float32)
    std = batch["latent_std"].to(device, torch.float32)
    z = mean + std * torch.randn(mean.shape, device=device)
    cond = TextCondition(
        batch["tokens"].to(device, torch.float32),
        batch["mask"].to(device, torch.bool),
        batch["pooled"].to(device, torch.float32),
    )
    return vae.normalize(z), cond
