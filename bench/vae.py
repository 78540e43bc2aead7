"""VAE encode and decode at 512 px: ours vs diffusers' ``AutoencoderKL`` of equal shape.

Encode: image (B, 3, 512, 512) -> posterior (ours: ``encode`` -> DiagonalGaussian; peer:
``encode(x).latent_dist``). Decode: latents (B, 4, 64, 64) -> image. Inference mode, fp32
(the pipeline decodes in fp32 on every device).
"""

from __future__ import annotations

from typing import Any

import torch

from . import models
from .harness import Case, Settings, Workload


def make(impl: str, params: dict[str, Any], device: str) -> Workload:
    cfg = models.vae_config(params["preset"])
    torch.manual_seed(0)
    vae = (models.our_vae if impl == "ours" else models.peer_vae)(cfg).to(device).eval()
    batch, px = params["batch"], params["px"]
    g = torch.Generator().manual_seed(0)
    if params["op"] == "encode":
        x = (torch.rand(batch, cfg.in_channels, px, px, generator=g) * 2 - 1).to(device)
    else:
        side = px // cfg.factor
        x = torch.randn(batch, cfg.latent_channels, side, side, generator=g).to(device)

    @torch.inference_mode()
    def work() -> None:
        # Both compute the posterior's mean and std eagerly; decode returns the image.
        if params["op"] == "encode":
            vae.encode(x)
        else:
            vae.decode(x)

    return work


def cases(settings: Settings) -> list[Case]:
    preset = "tiny" if settings.quick else models.PRESET
    px = 32 if settings.quick else 512
    out = []
    for op in ("encode", "decode"):
        params = {"preset": preset, "px": px, "batch": 1, "op": op}
        out.append(
            Case(
                "vae",
                f"VAE {op} {px} px b1",
                params,
                lambda impl, p=params: make(impl, p, settings.device),
                **settings.plan(heavy=op == "decode", warmup=not settings.lean),
            )
        )
    return out
