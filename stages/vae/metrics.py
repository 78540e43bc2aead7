"""Reconstruction metrics per image: L1, PSNR, SSIM and (when built) LPIPS.

Reconstructions are clamped to [-1, 1] first, as a decoded image would be when saved. PSNR
and SSIM are on [0, 1] pixels; PSNR is capped at 100 dB (MSE floored at 1e-10) so identical
images give a finite number that averages. SSIM is kornia's (11x11 Gaussian window).
"""

from __future__ import annotations

import kornia.metrics
import torch
from torch import nn

PSNR_CAP_MSE = 1e-10  # -> 100 dB


@torch.no_grad()
def reconstruction_metrics(
    x: torch.Tensor, recon: torch.Tensor, lpips_net: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """x, recon (B,3,H,W) in [-1,1] -> {"l1", "psnr", "ssim"[, "lpips"]}, each (B,) float."""
    x = x.float()
    recon = recon.float().clamp(-1.0, 1.0)
    a, b = (x + 1) / 2, (recon + 1) / 2  # [0, 1]
    mse = (a - b).square().mean(dim=(1, 2, 3))
    out = {
        "l1": (x - recon).abs().mean(dim=(1, 2, 3)),
        "psnr": -10.0 * torch.log10(mse.clamp_min(PSNR_CAP_MSE)),
        "ssim": kornia.metrics.ssim(a, b, window_size=11, max_val=1.0).mean(dim=(1, 2, 3)),
    }
    if lpips_net is not None:
        out["lpips"] = lpips_net(recon, x).flatten()
    return out
