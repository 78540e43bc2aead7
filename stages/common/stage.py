"""The small interface every stage implements; the shared trainer does the rest.

A stage owns its networks, its loss and its outputs. It knows nothing of optimizers,
checkpoints, precision, devices or signals: those belong to ``stages.common.trainer``.
The trainer calls, in this order:

    modules = stage.build()                      # once; trainable networks by name
    loader  = stage.train_loader(rank, world)    # resumable: state_dict/load_state_dict
    for step ...:
        losses = stage.loss(modules, batch, step)    # {"loss": scalar to backprop, ...}
        every val_every:     stage.validate(modules, step) -> {"metric": ..., ...}
        every preview_every: stage.preview({"ema": ..., "raw": ...}, step, folder)
    stage.export(ema_modules, folder)            # at the end, from EMA weights if any

``modules`` is a ``dict[str, nn.Module]`` as wrapped by accelerate (use them to call, use
``unwrap`` from the trainer to reach attributes). Frozen networks a stage needs (the VAE
for the UNet, LPIPS for the VAE) are held by the stage itself and are not in ``modules``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class RunContext:
    """Where a run lives: ``runs/<preset>/<stage>/`` and its neighbours."""

    runs_root: Path
    preset: str
    stage: str
    device: torch.device = torch.device("cpu")

    @property
    def run_dir(self) -> Path:
        return self.runs_root / self.preset / self.stage

    def export_dir(self, stage: str | None = None) -> Path:
        """The export folder of this stage or of an upstream one (``"vae"``, ``"clip"``)."""
        return self.runs_root / self.preset / (stage or self.stage) / "export"


class ResumableLoader(Protocol):
    """An iterable of batches whose position can be saved and restored exactly."""

    def __iter__(self): ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Stage(Protocol):
    """What the shared trainer needs from a stage (see the module docstring)."""

    name: str
    config: Any  # the stage's resolved frozen config: has .train, .optim, .ema, .ckpt, .data
    # The validation metric used to keep the best checkpoint, and its direction.
    best_metric: tuple[str, Literal["min", "max"]]

    def build(self) -> dict[str, nn.Module]: ...

    def train_loader(self, rank: int, world_size: int) -> ResumableLoader: ...

    def loss(
        self, modules: dict[str, nn.Module], batch: Any, step: int
    ) -> dict[str, torch.Tensor]: ...

    def validate(self, modules: dict[str, nn.Module], step: int) -> dict[str, float]: ...

    def preview(
        self, modules: dict[str, dict[str, nn.Module]], step: int, folder: Path
    ) -> None: ...

    def export(self, modules: dict[str, nn.Module], folder: Path) -> None: ...
