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

What each call gets (the trainer guarantees it):

- ``build()`` runs after ``seed_all(train.seed)`` on every rank; module names are Python
  identifiers (they name checkpoint files). All parameters that require grad are trained
  by one optimizer; the trainer moves the modules to the device.
- ``loss(modules, batch, step)``: ``modules`` are the training modules as wrapped by
  accelerate (call them; use ``trainer.unwrap`` to reach attributes); the batch has been
  moved to the device; the call runs under autocast. ``step`` is the number of updates
  done so far (a skipped non-finite step does not advance it). Return ``"loss"`` (the
  scalar to backpropagate) plus any scalar terms to log (averaged over micro-batches and
  ranks). It may draw from the global random generators: their states are checkpointed.
- ``train_loader(rank, world_size)``: an infinite iterable whose ``state_dict()`` counts
  only batches already handed out; ``load_state_dict`` is called before ``iter``. Batch
  fetches run under ``preserve_rng``, so a loader's draws never shift the training streams.
- ``validate``, ``preview`` and ``export`` run on the main process only, under
  ``torch.no_grad()``, with bare (unwrapped) modules in eval mode; ``validate`` and
  ``preview`` also run under autocast and ``preserve_rng``. ``validate`` and ``export`` get
  the EMA modules (the raw ones when EMA is off); ``preview`` gets both as
  ``{"ema": ..., "raw": ...}`` (the same modules under both keys when EMA is off).

Optional attributes: ``best_metric = None`` keeps no best checkpoint; ``resume_safe_keys``
(fnmatch patterns such as ``"val.*"``) adds the stage's own config keys that may change on
resume to ``resume.RESUME_SAFE_KEYS``.

Fine-tuning (``init.from``, see ``finetune.py``) needs ``init_weights(folder) ->
({module: state_dict}, export hash)``: the weights of an export of this stage by module name
(modules left out keep their built weights), refusing an export that does not fit the run.
Before the loop the trainer sets ``stage.started_from`` (None, or ``{"from", "hash"}`` of
that export) for ``export`` to record.

Frozen networks a stage needs (the VAE for the UNet, LPIPS for the VAE) are held by the
stage itself and are not in ``modules``; ``RunContext.device`` is this process's device.
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
    # The validation metric used to keep the best checkpoint, and its direction (or None).
    best_metric: tuple[str, Literal["min", "max"]] | None

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
