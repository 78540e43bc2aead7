"""The resume policy: which checkpoint a run continues from, and whether it may.

The main rank picks the newest valid checkpoint (local or mirror) and every rank opens the
same one. It continues this run only when written by the same number of processes and with
a config that differs at most in resume-safe keys (``RESUME_SAFE_KEYS`` plus the stage's
own ``resume_safe_keys``); otherwise ``ResumeError`` names what changed, old -> new.
Loading the state itself is the trainer's (``Trainer._load_state``).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

from accelerate.utils import broadcast_object_list

from .checkpoint import Checkpoint, CheckpointError, CheckpointManager
from .config import changed_keys, merge, to_dict
from .finetune import InitConfig

# Config keys that may differ from the checkpoint's on resume (fnmatch patterns). Anything
# else (model, loss, data, seed, batch, grad_accum, optimizer kind) breaks exact resume.
RESUME_SAFE_KEYS = (
    "train.max_steps",  # extend a run: the cosine then spans the new length
    "train.log_every",
    "train.val_every",
    "train.preview_every",
    "train.max_consecutive_skips",
    "train.trackers",
    "train.grad_clip",
    "train.mixed_precision",  # e.g. fp16 on a T4 resumed as bf16 on an A100 (not bitwise)
    "train.ddp_find_unused_parameters",
    "train.compile",
    "train.pg_timeout_minutes",
    "optim.lr",
    "optim.betas",
    "optim.eps",
    "optim.weight_decay",
    "optim.warmup_steps",
    "optim.schedule",
    "optim.min_lr_ratio",
    "ema.decay",
    "ema.warmup_power",
    "ema.update_every",
    "ckpt.*",
    "data.num_workers",  # the reader's cursor counts samples, not worker batches
    "data.pin_memory",
    "data.shard_cache",  # where remote shards are kept locally, not which ones
    "data.shard_cache_gb",
    "data.prefetch_shards",
)


class ResumeError(RuntimeError):
    """The checkpoint cannot continue this run (changed config keys, world size)."""


def unsafe_changes(saved: dict, current: dict, extra_safe: tuple[str, ...] = ()) -> list[str]:
    """Changed dotted keys that are not resume-safe."""
    patterns = RESUME_SAFE_KEYS + tuple(extra_safe)
    return [
        key
        for key in changed_keys(saved, current)
        if not any(fnmatch.fnmatchcase(key, p) for p in patterns)
    ]


def _get(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def choose_checkpoint(
    checkpoints: CheckpointManager, is_main: bool, world: int
) -> Checkpoint | None:
    """The main rank picks the newest valid checkpoint; every rank opens the same one."""
    choice: list[Any] = [None]
    if is_main:
        try:
            found = checkpoints.latest()
            choice = [("ok", str(found.path), found.manifest) if found else None]
        except CheckpointError as err:
            choice = [("error", str(err), None)]
    if world > 1:
        broadcast_object_list(choice)
    if choice[0] is None:
        return None
    kind, value, manifest = choice[0]
    if kind == "error":
        raise ResumeError(value)
    return Checkpoint(Path(value), manifest)


def check_resumable(
    checkpoint: Checkpoint, config: Any, world: int, extra_safe: tuple[str, ...] = ()
) -> None:
    """Raise ``ResumeError`` unless ``checkpoint`` can continue a run of ``config`` on
    ``world`` processes: the same world size, no change outside the resume-safe keys."""
    saved_world = int(checkpoint.manifest.get("world_size", 1))
    if saved_world != world:
        raise ResumeError(
            f"{checkpoint.path} was written by {saved_world} processes, this run has "
            f"{world}: the per-rank data cursors and random streams do not carry over"
        )
    saved, current = checkpoint.read("config"), to_dict(config)
    # Checkpoints from before fine-tuning existed have no init section: random weights.
    saved.setdefault("init", to_dict(InitConfig()))
    # A key added to the code since the checkpoint was written takes its default (keys
    # are added with the default that keeps the old behaviour).
    saved = merge(to_dict(type(config)()), saved)
    bad = unsafe_changes(saved, current, extra_safe)
    if bad:
        changes = ", ".join(f"{k} ({_get(saved, k)!r} -> {_get(current, k)!r})" for k in bad)
        raise ResumeError(
            f"the config differs from {checkpoint.path} in keys that break resume: "
            f"{changes}. Restore them, or use another --runs folder for a new run"
        )
