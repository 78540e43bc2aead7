"""VDM's bound estimator on trained exports: its mean (bits/dim) and the spread of the
per-sample diffusion term, the quantity the schedule's variance gradient minimises.

    .venv/bin/python -m bench.vdm_variance RUNS_A RUNS_B ... [--data data/emoji-32]

Each RUNS folder holds a ``vdm`` UNet export (``<runs>/vdm/unet/export``). Every export is
evaluated on the same val images with the same draws of (u, noise): u on an even grid over
[0, 1] (the low-discrepancy times of training), so the figures differ only by the models.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from stages.common.data import iter_split
from stages.unet.export import load_unet
from stages.unet.objectives import vdm_diffusion


@torch.no_grad()
def diffusion_terms(loaded, x0: torch.Tensor, u: torch.Tensor, noise: torch.Tensor):
    """(B,) per-sample diffusion term of the export's bound, in bits/dim."""
    gamma, dgamma = loaded.objective.learned_schedule(u)
    nats = vdm_diffusion(loaded.model, x0, None, u, noise, gamma, dgamma)
    return nats / (x0[0].numel() * math.log(2))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.vdm_variance")
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, default=Path("data/emoji-32"))
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--draws", type=int, default=4)
    args = parser.parse_args()
    exports = [load_unet(r / "vdm" / "unet" / "export", None, None) for r in args.runs]
    side = exports[0].resolution
    x0 = torch.cat([b["image"] for b in iter_split(args.data / "val", 64, side)])[: args.images]
    g = torch.Generator().manual_seed(0)
    draws = [
        (
            (torch.arange(len(x0)) + torch.rand(1, generator=g)) / len(x0) % 1.0,
            torch.randn(x0.shape, generator=g),
        )
        for _ in range(args.draws)
    ]
    print("| run | gamma_0 | gamma_1 | diffusion bits/dim (mean) | per-sample std | std / mean |")
    print("|---|---:|---:|---:|---:|---:|")
    for runs, loaded in zip(args.runs, exports):
        terms = torch.cat([diffusion_terms(loaded, x0, u, n) for u, n in draws])
        schedule = loaded.objective.learned_schedule
        ends, _ = schedule(torch.tensor([0.0, 1.0]))
        mean, std = terms.mean().item(), terms.std().item()
        print(
            f"| {runs} | {ends[0]:.3f} | {ends[1]:.3f} | {mean:.4f} | {std:.4f} | {std / mean:.3f} |"
        )


if __name__ == "__main__":
    main()
