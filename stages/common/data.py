"""Shard reader with a resumable cursor (to be completed)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataConfig:
    path: str = "data/emoji-32"  # holds train/ and val/ shard folders with manifest.json
    resolution: int = 32  # images are resized/cropped to this if stored otherwise
    batch_size: int = 16  # per rank, per micro-step
    num_workers: int = 0
