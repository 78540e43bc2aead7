"""The command line of every stage: ``python -m stages.<name> --preset tiny --data DIR ...``.

Each stage's ``__main__`` is ``raise SystemExit(run_stage("vae", VAEStageConfig, VAEStage))``.
The config is defaults <- ``configs/<preset>/<name>.toml`` <- ``section.key=value``
overrides (``--data X`` is the override ``data.path=X``); ``--dry-run`` prints it and exits.
Otherwise a GPU preset started without CUDA says what a CPU step costs (``cpu_warning.py``),
the run folder ``<runs>/<preset>/<name>/`` is locked (a second process on it is
refused at once, naming the holder), the stage is built (which moves a run folder trained on
other upstream exports aside), the resolved config goes to its ``config.json`` and the stage
is handed to the shared trainer, whose exit code is returned (``exits.py``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch.distributed
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from .config import CONFIGS_DIR, ConfigError, dumps, load_config, save_json
from .cpu_warning import cpu_warning
from .exits import EXIT_ABORTED, EXIT_CONFIG, EXIT_ERROR, EXIT_OK, describe_exit_codes
from .export import ExportError
from .log import setup_console_logging
from .run import RunFolderBusy, RunLock
from .shards import ManifestError
from .stage import RunContext, Stage
from .trainer import force_cpu, train

log = logging.getLogger(__name__)

EPILOG = (
    "Re-running the same command resumes from the newest valid checkpoint.\n"
    "Runs on a CPU, one GPU, or many: accelerate launch / torchrun -m stages.<name> ...\n\n"
    + describe_exit_codes()
)


def build_parser(name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.{name}",
        description=f"Train the {name} stage (resumable, preemption-safe).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="tiny", help="configs/<preset>/ (default: tiny)")
    parser.add_argument("--data", help="shard folder holding train/ and val/ (data.path)")
    parser.add_argument("--runs", default="runs", help="runs root (default: runs)")
    parser.add_argument("--configs", type=Path, help="folder of presets (default: configs/)")
    parser.add_argument("--dry-run", action="store_true", help="print the config and exit")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="config overrides (TOML values)"
    )
    return parser


def run_stage(
    name: str,
    config_cls: type,
    make_stage: Callable[[Any, RunContext], Stage],
    argv: Sequence[str] | None = None,
    configs_dir: Path = CONFIGS_DIR,
) -> int:
    """Parse ``argv``, load the config, build the stage and train it; returns the exit code."""
    args = build_parser(name).parse_args(argv)
    overrides = ([f"data.path={args.data}"] if args.data else []) + list(args.overrides)
    try:
        config = load_config(config_cls, args.preset, name, overrides, args.configs or configs_dir)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if args.dry_run:
        print(dumps(config))
        return EXIT_OK
    data = getattr(config, "data", None)
    if hasattr(data, "configure_remote"):
        data.configure_remote()  # where remote shards are kept, before anything reads data
    # The device and rank, before the stage is built; this starts the process group.
    loop = getattr(config, "train", None)
    group = loop.process_group_kwargs() if hasattr(loop, "process_group_kwargs") else {}
    state = PartialState(cpu=force_cpu(), **group)
    setup_console_logging(state.is_main_process)
    if state.is_main_process and state.device.type == "cpu" and loop is not None:
        # Before the stage is built: building may encode a cache, the first of the long waits.
        cache = getattr(config, "cache", None)
        warning = cpu_warning(args.preset, name, loop.max_steps, getattr(cache, "enabled", False))
        if warning:
            log.warning(warning)
    ctx = RunContext(Path(args.runs), args.preset, name, state.device)
    lock = RunLock(ctx.run_dir)
    busy: list[str | None] = [None]
    if state.is_main_process:  # one launch = one holder; its other ranks learn the outcome
        try:
            lock.acquire()
        except RunFolderBusy as err:
            busy = [str(err)]
    if state.num_processes > 1:
        broadcast_object_list(busy)
    if busy[0] is not None:
        print(f"error: {busy[0]}", file=sys.stderr)
        return EXIT_ERROR
    try:
        stage = make_stage(config, ctx)
        if state.is_main_process:  # after the stage: a stale folder has been moved aside
            save_json(config, ctx.run_dir / "config.json")
        return train(stage, ctx)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except (ExportError, ManifestError) as err:
        # A missing or mismatched upstream export or data folder: one clear line, no trace.
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_ABORTED
    finally:
        lock.release()
        if state.num_processes > 1 and torch.distributed.is_initialized():
            # Joined here, not in the interpreter's teardown, where gloo's threads can abort
            # a rank that finished cleanly ("terminate called without an active exception").
            torch.distributed.destroy_process_group()
