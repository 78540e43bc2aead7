"""A learnable toy for stage tests: a stage's own loss on one fixed batch, fixed draws."""

from __future__ import annotations

from typing import Any

import torch


def fixed_batch_losses(
    stage: Any, modules: dict[str, torch.nn.Module], batch: Any, steps: int = 40, lr: float = 3e-3
) -> tuple[float, float]:
    """The stage's loss on ``batch`` before and after ``steps`` AdamW steps on it alone, with
    the same random draws (time, noise, dropout) at every evaluation: it must fall."""
    params = [p for m in modules.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr)

    def fixed_loss() -> torch.Tensor:
        torch.manual_seed(1)
        return stage.loss(modules, batch, 0)["loss"]

    before = fixed_loss().item()
    for _ in range(steps):
        optimizer.zero_grad()
        fixed_loss().backward()
        optimizer.step()
    return before, fixed_loss().item()
