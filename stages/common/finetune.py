"""Fine-tuning: a new run that starts from an export's weights instead of random ones.

    init.from = "runs/tiny/unet/export"    any stage; an export of the same stage
    init.freeze = ["text"]                 optional: modules or submodules kept fixed

Before the first step the export's weights (its EMA weights: what every export holds)
replace the built ones and the EMA restarts there; the optimizer, the LR schedule and the
step count start fresh, and data, LR and steps are the run's own config. The stage reads its
own export (``Stage.init_weights``) and refuses one that does not fit the run (another
architecture; for the UNet, other VAE or CLIP exports than the run's).

``init.freeze`` entries are ``<module>`` or ``<module>.<submodule path>`` of the stage's
``build()`` (``text`` or ``image`` for CLIP, ``vae.encoder`` for the VAE, ``unet.down``...):
their parameters get no gradient and no optimizer state.

The run records what it started from, ``{"from": folder, "hash": export hash}``, in
``<run>/init.json``, in every checkpoint and in its export (``stage.started_from``). A
resume restores everything from the checkpoint and never reads ``init.from`` again: the
export may since have changed or gone, and the record stays the first one. Changing
``init.from`` or ``init.freeze`` on resume is refused like any key that breaks resume.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ConfigError, changed_keys
from .export import ExportError

INIT_FILE = "init.json"


@dataclass(frozen=True)
class InitConfig:
    from_: str = field(default="", metadata={"key": "from"})  # "": random weights
    freeze: tuple[str, ...] = ()


def freeze(modules: Mapping[str, nn.Module], cfg: InitConfig) -> None:
    """Stop gradients to the modules ``cfg.freeze`` names (before the optimizer is built)."""
    if cfg.freeze and not cfg.from_:
        raise ConfigError("init.freeze keeps weights from an export: it needs init.from")
    for entry in cfg.freeze:
        name, _, path = entry.partition(".")
        try:
            target = modules[name].get_submodule(path) if path else modules[name]
        except (KeyError, AttributeError):
            raise ConfigError(
                f"init.freeze: {entry!r} names no module (this stage trains "
                f"{', '.join(modules)}; give <module> or <module>.<submodule>)"
            ) from None
        target.requires_grad_(False)
    if cfg.freeze and not any(p.requires_grad for m in modules.values() for p in m.parameters()):
        raise ConfigError(f"init.freeze = {list(cfg.freeze)} leaves nothing to train")


def load_init(stage: Any, modules: Mapping[str, nn.Module], cfg: InitConfig) -> dict[str, str]:
    """Copy the export's weights into ``modules``; returns the record of what was loaded."""
    folder = Path(cfg.from_)
    init_weights = getattr(stage, "init_weights", None)
    if init_weights is None:
        raise ConfigError(f"init.from: the {stage.name} stage cannot start from an export")
    weights, export_hash = init_weights(folder)
    for name, state in weights.items():
        try:
            modules[name].load_state_dict(state, strict=True)
        except (KeyError, RuntimeError) as err:
            raise ExportError(
                f"init.from: {folder} does not fit this run's {name!r}: {err}"
            ) from None
    return {"from": str(folder), "hash": export_hash}


def state_dicts_by_prefix(
    tensors: Mapping[str, torch.Tensor], prefixes: Mapping[str, str]
) -> dict[str, dict[str, torch.Tensor]]:
    """Split an export's flat tensors into module state dicts: ``{module: prefix}`` ("" for
    the rest, which takes every key no other prefix claims)."""
    out: dict[str, dict[str, torch.Tensor]] = {name: {} for name in prefixes}
    rest = [name for name, prefix in prefixes.items() if not prefix]
    for key, value in tensors.items():
        for name, prefix in prefixes.items():
            if prefix and key.startswith(prefix):
                out[name][key[len(prefix) :]] = value
                break
        else:
            if rest:
                out[rest[0]][key] = value
    return out


def check_same_model(recorded: Mapping[str, Any], current: Mapping[str, Any], folder: Path):
    """Refuse an export of another architecture, naming the keys that differ."""
    differ = changed_keys(dict(recorded), dict(current))
    if differ:
        changes = ", ".join(f"model.{k}" for k in differ)
        raise ConfigError(
            f"init.from: {folder} holds another model than this run's ({changes} differ): "
            "fine-tuning keeps the architecture; set those keys as the export has them"
        )
