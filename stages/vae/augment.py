"""Batch augmentations on the training device (kornia), applied to the VAE's input only.

An autoencoder's target is its input, so augmenting the batch once augments both. Flips are
off by default: emoji and text are not mirror-symmetric. A random hue rotation shows the VAE
every colour equally often (a data set of mostly yellow faces has little green or purple);
off by default: in a 500-step tiny run it made every colour worse (docs/measurements.md,
"Images that follow the prompt"), a longer run may differ. The UNet and CLIP never see augmented images.
Randomness comes from torch's global generator, which the trainer checkpoints, so resume stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import kornia.augmentation as K
from torch import nn


@dataclass(frozen=True)
class AugmentConfig:
    hflip: float = 0.0  # probability of a horizontal flip
    affine: float = 0.0  # probability of a small random affine transform
    degrees: float = 5.0  # affine rotation range (+-)
    translate: float = 0.05  # affine translation, fraction of the side
    scale: tuple[float, float] = (0.95, 1.05)
    hue: float = 0.0  # probability of a hue rotation by a uniform angle (any colour)


class InUnitRange(nn.Module):
    """Runs a colour op that expects [0, 1] images on [-1, 1] ones."""

    def __init__(self, op: nn.Module):
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.op((x + 1) / 2) * 2 - 1


def build_augment(cfg: AugmentConfig) -> nn.Module | None:
    """A kornia pipeline on (B,3,H,W) batches, or None when every augmentation is off."""
    ops: list[nn.Module] = []
    if cfg.hflip > 0:
        ops.append(K.RandomHorizontalFlip(p=cfg.hflip))
    if cfg.affine > 0:
        ops.append(
            K.RandomAffine(
                degrees=cfg.degrees,
                translate=(cfg.translate, cfg.translate),
                scale=cfg.scale,
                padding_mode="reflection",  # no grey borders from zero padding in [-1, 1]
                p=cfg.affine,
            )
        )
    stages: list[nn.Module] = [K.AugmentationSequential(*ops)] if ops else []
    if cfg.hue > 0:  # hue in kornia's units: a fraction of the colour circle, +-0.5 = all
        stages.append(InUnitRange(K.RandomHue(hue=(-0.5, 0.5), p=cfg.hue)))
    if not stages:
        return None
    return stages[0] if len(stages) == 1 else nn.Sequential(*stages)
