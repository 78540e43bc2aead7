"""The one training loop shared by every stage (to be completed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 1000
    grad_accum: int = 1
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    grad_clip: float = 1.0  # 0 disables
    seed: int = 0
    log_every: int = 10
    val_every: int = 500
    preview_every: int = 500
    max_consecutive_skips: int = 10  # non-finite steps in a row before training stops
    trackers: tuple[str, ...] = ("tensorboard",)  # "tensorboard", "wandb"
