"""GPU only: UNet training-step MFU at 512 px bf16, with ``torch.compile`` off and on.

MFU = counted FLOPs per step (``bench.flops``, forward + backward) / measured step time /
the device's dense bf16 peak (``bench.flops.PEAK_BF16``; unknown devices get TFLOP/s only).
Each (impl, compile) pair is built, warmed up (compilation happens there), then timed over
a few steps. On a CPU nothing runs and a note says so.
"""

from __future__ import annotations

import statistics

import torch

from . import models
from .data import Figure
from .flops import peak_flops, train_step_flops
from .harness import Settings, timed
from .unet_train import build

SIDE = 64  # 512 px through the f8 VAE


def figures(settings: Settings, batch: int = 8, warmup: int = 3, reps: int = 5) -> list[Figure]:
    if not settings.cuda:
        print("gpu: skipped (no CUDA device): MFU, torch.compile and bf16 need a GPU")
        return []
    preset = models.PRESET
    cfg = models.unet_config(SIDE, preset)
    context = models.clip_config(preset).text.context_length
    name = torch.cuda.get_device_name()
    peak = peak_flops(name)
    flops = train_step_flops("ours", cfg, batch, context)
    out = []
    for impl in ("ours", "peer"):
        for compiled in (False, True):
            step = build(impl, cfg, batch, context, settings.device, "bf16", compiled)
            for _ in range(warmup):
                timed(step, settings.device)
            seconds = statistics.median(timed(step, settings.device)[0] for _ in range(reps))
            del step
            torch.cuda.empty_cache()
            achieved = flops / seconds
            mfu = f", MFU {100 * achieved / peak:.1f}% of {peak / 1e12:.0f}" if peak else ""
            out.append(
                Figure(
                    f"unet train 512 px b{batch} bf16 {impl}, compile {'on' if compiled else 'off'}",
                    seconds * 1e3,
                    "ms/step",
                    f"{achieved / 1e12:.1f} TFLOP/s{mfu} ({flops / 1e12:.2f} TFLOP/step, {name})",
                )
            )
    return out
