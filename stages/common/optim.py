"""AdamW / 8-bit AdamW over parameter groups, and the learning rate as a pure function of the step.

No scheduler object: ``lr_at(step, cfg, max_steps)`` is recomputed and written into the
parameter groups before every update, so nothing about the schedule needs saving and a
resumed run follows the same curve. Norm weights, biases, embeddings and other vectors get
no weight decay. 8-bit AdamW (bitsandbytes) keeps fp32 state for tensors under 4096
elements (its ``min_8bit_size``) and blockwise-quantised uint8 state for the rest; it is
imported only when asked for (the import is slow).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "adamw8bit"] = "adamw"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate of the update that follows ``step`` completed updates.

    Linear warm-up: ``lr * (step + 1) / warmup_steps`` for ``step < warmup_steps`` (the first
    update already moves). Then ``constant``: ``lr``; or ``cosine``:
    ``lr_min + (lr - lr_min) * (1 + cos(pi * p)) / 2`` with
    ``p = (step - warmup) / (max_steps - warmup)`` clamped to [0, 1] and
    ``lr_min = lr * min_lr_ratio``, so ``lr_at(warmup) == lr`` and ``lr_at(max_steps) == lr_min``.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    lr_min = cfg.lr * cfg.min_lr_ratio
    return lr_min + (cfg.lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))


_NO_DECAY_MODULES = (
    nn.Embedding,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.modules.batchnorm._NormBase,
)


def _decays(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    """Weight decay only on matrices and kernels (not norms, biases, embeddings, scales)."""
    if param.ndim < 2 or isinstance(module, _NO_DECAY_MODULES):
        return False
    return "embed" not in name  # positional / class embeddings held as bare Parameters


def param_groups(modules: Mapping[str, nn.Module], weight_decay: float) -> list[dict]:
    """Two groups, ``decay`` and ``no_decay``, over every trainable parameter once (in order)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in modules.values():
        for sub in module.modules():
            for name, param in sub.named_parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue  # frozen, or tied to a parameter already placed
                seen.add(id(param))
                (decay if _decays(sub, name, param) else no_decay).append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """Write betas, eps and weight decay from the config into the groups (after a resume,
    ``load_state_dict`` brings back the saved ones; these keys are resume-safe)."""
    for group in optimizer.param_groups:
        group["betas"] = tuple(cfg.betas)
        group["eps"] = cfg.eps
        group["weight_decay"] = cfg.weight_decay if group.get("name") == "decay" else 0.0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


FUSED_CPU_MIN_PARAMS = 10_000_000


def make_optimizer(modules: Mapping[str, nn.Module], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA) or 8-bit AdamW.

    Build it after the modules are on their device: the fused kernel is chosen from there.
    """
    groups = param_groups(modules, cfg.weight_decay)
    if not groups:
        raise ValueError("the stage's modules have no trainable parameters")
    params: list[nn.Parameter] = [p for g in groups for p in g["params"]]
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if cfg.name == "adamw8bit":
        import bitsandbytes as bnb  # slow import: only when asked for

        return bnb.optim.AdamW8bit(groups, **kwargs)
    # Fused kernels on CUDA. On CPU the fused kernel is slower than the plain loop for the
    # many small tensors of a small network, but 19% faster per step for the base UNet
    # (bench/RESULTS.md, finding 1): fuse above FUSED_CPU_MIN_PARAMS.
    devices = {p.device.type for p in params}
    large = sum(p.numel() for p in params) >= FUSED_CPU_MIN_PARAMS
    fused = devices == {"cuda"} or (devices == {"cpu"} and large)
    return torch.optim.AdamW(groups, **kwargs, fused=fused or None)
