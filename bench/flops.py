"""FLOPs of a UNet training step, counted (not guessed) by ``FlopCounterMode`` on the meta device.

The network and its inputs are built on ``meta``: no memory, no arithmetic, the same
dispatch to matmul / convolution / attention kernels whose FLOPs the counter adds up
(forward + backward; the optimiser's elementwise work is not counted, as usual for MFU).
Ours and the diffusers peer give the same count at equal config, which checks the configs.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from stages.unet.model import UNetModelConfig

from . import models

# Dense bf16 tensor-core peak (FLOP/s) by device-name substring, from the vendors' sheets.
PEAK_BF16 = {
    "H200": 989.4e12,
    "H100 PCIe": 756.0e12,
    "H100 NVL": 835.0e12,
    "H100": 989.4e12,
    "A100": 312.0e12,
    "L40S": 362.0e12,
    "L4": 121.0e12,
    "A10G": 70.0e12,
    "A10": 125.0e12,
}


def peak_flops(device_name: str) -> float | None:
    for key, value in PEAK_BF16.items():  # most specific keys first
        if key in device_name:
            return value
    return None


def train_step_flops(impl: str, cfg: UNetModelConfig, batch: int, context_length: int) -> int:
    """Forward + backward FLOPs of one training step of ``impl`` at ``batch``."""
    cond = models.random_condition(batch, context_length, cfg.context_dim)
    with torch.device("meta"):
        net = models.our_unet(cfg) if impl == "ours" else models.peer_unet(cfg)
        side = cfg.sample_size
        x = torch.randn(batch, cfg.in_channels, side, side)
        t = torch.rand(batch)
    cond = cond.to("meta")
    with FlopCounterMode(display=False) as counter:
        if impl == "ours":
            v = net(x, t, cond)
        else:
            v = net(
                x,
                t * cfg.time_scale,
                encoder_hidden_states=cond.tokens,
                class_labels=cond.pooled,
                encoder_attention_mask=cond.mask,
            ).sample
        v.float().square().mean().backward()
    return counter.get_total_flops()
