"""Batch augmentations on the training device (kornia), applied to the VAE's input only.

An autoencoder's target is its input, so augmenting the batch once augments both. Flips are
off by default: emoji and text are not mirror-symmetric. Randomness comes from torch's
global generator, which the trainer checkpoints, so resume stays exact.
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
    return K.AugmentationSequential(*ops) if ops else None
