"""What a run reports: ``metrics.jsonl``, tracker plumbing (accelerate) and the progress bar.

``metrics.jsonl`` in the run folder gets one JSON object per logged step (``{"step", "time",
"split", ...values}``). On resume, lines past the resumed step (logged after the checkpoint
by the interrupted run) are dropped, so the file reads as one uninterrupted run. Trackers go
through accelerate (``log_with`` + ``init_trackers``): TensorBoard by default, W&B when
listed; a requested tracker whose package is missing is dropped with a warning.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .config import to_dict

log = logging.getLogger(__name__)

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def setup_console_logging(main_process: bool) -> None:
    """INFO messages of this project on stderr (warnings only on the other ranks)."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if main_process else logging.WARNING,
    )


class MetricsLog:
    """Append-only JSON lines, truncated to ``resume_step`` when a run resumes."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate(resume_step)

    def _truncate(self, step: int) -> None:
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, step: int, split: str, values: Mapping[str, Any]) -> None:
        record = {"step": step, "time": round(time.time(), 3), "split": split, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def available_trackers(requested: Sequence[str]) -> list[str]:
    """The requested trackers whose packages are installed (the others are warned about)."""
    out = []
    for name in requested:
        package = TRACKER_PACKAGES.get(name)
        if package is None:
            raise ValueError(
                f"train.trackers: unknown tracker {name!r} (known: {sorted(TRACKER_PACKAGES)})"
            )
        if importlib.util.find_spec(package) is None:
            log.warning("tracker %r requested but %r is not installed: skipped", name, package)
            continue
        out.append(name)
    return out


def flat_config(cfg: Any) -> dict[str, int | float | str | bool]:
    """The config as ``{"section.key": scalar}`` (lists as strings), what trackers accept."""

    def walk(value: Any, prefix: str) -> dict[str, Any]:
        if isinstance(value, Mapping):
            out: dict[str, Any] = {}
            for key, sub in value.items():
                out.update(walk(sub, f"{prefix}{key}."))
            return out
        if isinstance(value, bool | int | float | str):
            return {prefix[:-1]: value}
        return {prefix[:-1]: json.dumps(value)}

    return walk(to_dict(cfg), "")


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    """Step counter with it/s and an ETA measured from the resumed step (main process only)."""
    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        unit="step",
        dynamic_ncols=True,
        smoothing=0.05,
    )
