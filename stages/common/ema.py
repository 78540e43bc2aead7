"""Exponential moving average of weights with warm-up (to be completed)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EMAConfig:
    enabled: bool = True
    decay: float = 0.999  # the ceiling; warm-up ramps towards it
    warmup_power: float = 0.75  # decay_t = min(decay, 1 - (1 + t) ** -power)
    update_every: int = 1
