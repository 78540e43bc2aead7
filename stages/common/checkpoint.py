"""Atomic, verified training checkpoints with rotation and a mirror (to be completed)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 500
    every_minutes: float = 10.0  # wall-clock saves: a Colab runtime dies without a signal
    keep_last: int = 2  # plus the best by validation metric and the final one
    mirror: str = ""  # a folder (e.g. a mounted Drive) that receives a verified copy
