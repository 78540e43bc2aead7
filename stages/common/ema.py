"""Exponential moving average of weights with warm-up, saved and restored with its step count.

The average lives in deep copies of the trainable modules (eval mode, no gradients), so
validation, previews and the export call real modules and "EMA" and "raw" previews can be
drawn side by side. Update ``t`` (counting from 0) uses

    decay_t = min(decay, 1 - (1 + t) ** -warmup_power)        ema <- lerp(ema, w, 1 - decay_t)

so the first update copies the weights (decay_0 = 0) and early averages forget the random
initialisation quickly. Floating parameters and buffers are averaged; integer buffers
(``num_batches_tracked``) are copied. Nothing copies the average back into the trained
modules: callers that want it use ``ema.modules`` directly.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class EMAConfig:
    enabled: bool = True
    decay: float = 0.999  # the ceiling; warm-up ramps towards it
    warmup_power: float = 0.75  # decay_t = min(decay, 1 - (1 + t) ** -power)
    update_every: int = 1


def ema_decay(t: int, cfg: EMAConfig) -> float:
    """The decay of update number ``t`` (0-based)."""
    return min(cfg.decay, 1.0 - (1.0 + t) ** -cfg.warmup_power)


def _pairs(ema: nn.Module, model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Matching (average, current) tensors: parameters then buffers, by name."""
    current = dict(model.named_parameters())
    current.update(model.named_buffers())
    for name, tensor in [*ema.named_parameters(), *ema.named_buffers()]:
        yield tensor, current[name]


class EMA:
    """The moving average of a dict of modules (pass unwrapped modules, not DDP wrappers)."""

    def __init__(self, modules: Mapping[str, nn.Module], cfg: EMAConfig):
        self.cfg = cfg
        self.step = 0  # updates done so far
        self.modules: dict[str, nn.Module] = {}
        for name, module in modules.items():
            average = copy.deepcopy(module).eval()
            average.requires_grad_(False)
            self.modules[name] = average

    @torch.no_grad()
    def update(self, modules: Mapping[str, nn.Module]) -> None:
        weight = 1.0 - ema_decay(self.step, self.cfg)
        for name, module in modules.items():
            floats_avg, floats_cur = [], []
            for avg, cur in _pairs(self.modules[name], module):
                if avg.is_floating_point():
                    floats_avg.append(avg)
                    floats_cur.append(cur.detach().to(avg.dtype))
                else:
                    avg.copy_(cur)
            if floats_avg:
                torch._foreach_lerp_(floats_avg, floats_cur, weight)
        self.step += 1

    @torch.no_grad()
    def copy_from(self, modules: Mapping[str, nn.Module]) -> None:
        """Restart the average at ``modules``' current weights."""
        for name, module in modules.items():
            for avg, cur in _pairs(self.modules[name], module):
                avg.copy_(cur)

    def state_dict(self) -> dict[str, object]:
        """``{"step": int, "modules": {name: {key: tensor}}}`` (tensors only, no pickling needed)."""
        return {
            "step": self.step,
            "modules": {n: dict(m.state_dict()) for n, m in self.modules.items()},
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        missing = sorted(set(self.modules) - set(state["modules"]))  # type: ignore[arg-type]
        if missing:
            raise KeyError(f"EMA state has no average for module(s) {missing}")
        for name, module in self.modules.items():
            module.load_state_dict(state["modules"][name])  # type: ignore[index]
        self.step = int(state["step"])  # type: ignore[arg-type]
