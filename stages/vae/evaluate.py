"""Reconstruction quality of a VAE on a split: overall, per data style, worst images, probe.

Used by the VAE stage's validation (logged during training) and by ``python -m pipeline
evaluate`` on an export. Per image: L1, PSNR, SSIM, (LPIPS), and the mean CIE76 colour
difference ``delta_e`` in CIELAB (a flat-colour emoji whose green comes back orange has a
fine PSNR and a large delta E). The style of a sample is its caption's ``; style`` suffix
(``"flat colour emoji"``), ``all`` for captions without one; the keys read
``psnr/flat colour emoji``. The ``worst`` images by delta E are kept for a grid. The probe
(``stages.common.probe``) counts how many of the data's own coloured "red heart"-style images
come back with their named colour.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.utils import make_grid, save_image

from stages.common.captions import split_caption
from stages.common.probe import ColourShapeJudge, Reference, delta_e

from .metrics import reconstruction_metrics

Reconstruct = Callable[[torch.Tensor], torch.Tensor]  # (B,3,H,W) in [-1,1] -> same
# The same, plus per-image extras to average (e.g. {"kl": (B,)}).
ReconstructWithExtras = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def style_of(caption: str) -> str:
    return split_caption(caption)[2] or "all"


@torch.no_grad()
def reconstruction_report(
    reconstruct: ReconstructWithExtras,
    batches: Iterable[dict[str, Any]],
    lpips_net: nn.Module | None = None,
    worst: int = 8,
) -> tuple[dict[str, float], torch.Tensor | None]:
    """Mean metrics (overall and ``metric/style``) and the ``worst`` (original, recon)
    pairs by delta E as (2 * worst, 3, H, W), or None for ``worst = 0``."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    kept: list[tuple[float, torch.Tensor, torch.Tensor]] = []
    for batch in batches:
        recon, extras = reconstruct(batch["image"])
        recon = recon.float().clamp(-1, 1)  # on the VAE's device; metrics are computed there
        x = batch["image"].to(recon.device)
        per_image = reconstruction_metrics(x, recon, lpips_net)
        per_image["delta_e"] = delta_e(x, recon)
        per_image = {k: v.float().cpu() for k, v in {**per_image, **extras}.items()}
        x, recon = x.cpu(), recon.cpu()
        styles = [style_of(c) for c in batch["caption"]]
        for key, values in per_image.items():
            for value, style in zip(values.double().tolist(), styles):
                for name in (key, f"{key}/{style}"):
                    sums[name] = sums.get(name, 0.0) + value
                    counts[name] = counts.get(name, 0) + 1
        if worst:
            kept += [(float(d), a, b) for d, a, b in zip(per_image["delta_e"], x, recon)]
            kept = sorted(kept, key=lambda item: -item[0])[:worst]
    if not counts:
        raise ValueError("no image to evaluate the reconstructions on")
    metrics = {name: total / counts[name] for name, total in sums.items()}
    if len({k.split("/", 1)[1] for k in metrics if "/" in k}) <= 1:
        metrics = {k: v for k, v in metrics.items() if "/" not in k}  # one style: no split
    pairs = None
    if kept:
        pairs = torch.stack([t for _, a, b in kept for t in (a, b)])
    return metrics, pairs


def save_worst_grid(pairs: torch.Tensor, path: Path) -> Path:
    """Originals on the top row, their reconstructions below, worst on the left."""
    originals, recons = pairs[0::2], pairs[1::2]
    grid = make_grid(torch.cat([originals, recons]), nrow=len(originals), padding=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((grid.clamp(-1, 1) + 1) / 2, path)
    return path


@torch.no_grad()
def colours_kept(
    reconstruct: Reconstruct, references: list[Reference], judge: ColourShapeJudge
) -> dict[str, Any]:
    """Share of the probe's reference images whose reconstruction keeps the named colour,
    and the ones that lose it (caption -> colour seen)."""
    images = torch.stack([r.image for r in references])
    seen = judge.colours(reconstruct(images).float().cpu().clamp(-1, 1))
    lost = {r.caption: c for r, c in zip(references, seen) if c != r.attribute}
    return {"probe_colours_kept": 1 - len(lost) / len(references), "lost": lost}
