"""The one training loop shared by every stage: ``train(stage, ctx) -> exit code``.

accelerate owns devices, mixed precision ("auto": bf16 where the GPU has it, fp16 with a
gradient scaler on older GPUs, none on CPU), gradient accumulation and multi-process launch
(``accelerate launch`` / ``torchrun``). The stage only builds modules, a resumable loader
and a loss (see ``stages/common/stage.py``); everything else happens here, top to bottom:
set up, build, resume, loop, finish.

Steps. ``step`` counts optimizer updates; one step consumes ``train.grad_accum`` batches
per rank. The learning rate of the update after ``step`` updates is ``lr_at(step)``.
A step whose loss or gradient norm is NaN/inf on any rank (the ranks agree by an
all-reduce) is *skipped*: its batches are consumed, but weights, optimizer state, EMA and
``step`` are untouched, so the LR schedule does not move either and training still makes
``max_steps`` real updates. Under fp16, an overflow of the scaled gradients with a finite
loss is the gradient scaler's business (it lowers its scale); it is counted apart and does
not count towards ``train.max_consecutive_skips``.

Resume. Re-running the same command resumes from the newest valid checkpoint (local or
mirror) and equals an uninterrupted run, bitwise on CPU: weights, optimizer, EMA, the
random streams (restored last) and the data cursor all come back. Validation, previews and
batch fetching run under ``preserve_rng`` so they never move the training streams. A config
that differs from the checkpoint's in a key outside ``RESUME_SAFE_KEYS`` (plus the stage's
own ``resume_safe_keys``) is refused, naming the keys. Checkpoints are written every
``ckpt.every_steps`` steps, every ``ckpt.every_minutes`` of wall clock, at a new best
validation metric, on preemption and at the end. A finished run re-run does nothing.

Fine-tuning (``init.from``, ``init.freeze``: ``finetune.py``): a run without a checkpoint
starts from an export's weights; what it started from is checkpointed and never re-read.

Exit codes (also printed by ``python -m stages.<name> --help``):
    0    trained; or already trained and exported (nothing to do)
    1    an unexpected error (traceback above); the run folder is in use (see cli)
    2    bad config, preset or override (named)
    3    cannot resume: the config changed in keys that break resume (named), the number of
         processes changed, or every existing checkpoint is unusable
    4    stopped after ``train.max_consecutive_skips`` non-finite steps in a row, or the
         weights became non-finite (they are never saved nor exported): nothing was saved
         after the last checkpoint; lower optim.lr or fix the data and re-run
    75   preempted (EX_TEMPFAIL): SIGTERM/SIGINT/SIGHUP received, a checkpoint was saved at
         the step boundary; re-run the same command to resume
    130  a second Ctrl-C: stopped at once, without saving
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
from accelerate.utils import (
    GradientAccumulationPlugin,
    ProjectConfiguration,
    broadcast_object_list,
    extract_model_from_parallel,
    send_to_device,
)
from torch import nn
from tqdm.contrib.logging import logging_redirect_tqdm

from .checkpoint import Checkpoint, CheckpointError, CheckpointManager
from .config import ConfigError, changed_keys, merge, to_dict
from .ema import EMA
from .finetune import INIT_FILE, InitConfig, freeze, load_init
from .log import MetricsLog, available_trackers, flat_config, progress_bar
from .optim import apply_hyperparameters, lr_at, make_optimizer, set_lr
from .run import IDENTITY_FILE, UPSTREAM_FILE, run_identity
from .seeding import derive_seed, preserve_rng, rng_state, seed_all, set_rng_state
from .shards import write_json_atomic
from .stage import RunContext, Stage

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1  # an unexpected error, or a missing or mismatched upstream export or data
EXIT_CONFIG = 2
EXIT_CANNOT_RESUME = 3
EXIT_NONFINITE = 4
EXIT_PREEMPTED = 75
EXIT_ABORTED = 130

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


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 1000
    grad_accum: int = 1
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    grad_clip: float = 1.0  # 0 disables
    seed: int = 0
    log_every: int = 10
    val_every: int = 500  # 0 disables
    preview_every: int = 500  # 0 disables
    max_consecutive_skips: int = 10  # non-finite steps in a row before training stops
    trackers: tuple[str, ...] = ("tensorboard",)  # "tensorboard", "wandb"
    ddp_find_unused_parameters: bool = False  # for modules some steps do not use (GAN warm-up)
    # torch.compile (inductor) the trained modules: the first steps wait for compilation,
    # later ones fuse the elementwise ops around the convolutions and attention. Off by default:
    # on a CPU the compile of a large UNet takes minutes. Checkpoints are the same either way.
    compile: bool = False
    # How long a rank may wait for the others at a collective before the run fails. The
    # longest wait is the encode-once cache build (every rank encodes its slice, then they
    # meet); at the base preset a million samples take tens of minutes per GPU. Errors on
    # a rank are shared at once, so this only bounds a silent hang (a stuck file system).
    pg_timeout_minutes: float = 120.0

    def process_group_kwargs(self) -> dict[str, Any]:
        """``init_process_group`` arguments (accelerate's PartialState takes them)."""
        return InitProcessGroupKwargs(
            timeout=timedelta(minutes=self.pg_timeout_minutes)
        ).to_kwargs()


@dataclass
class StepResult:
    losses: dict[str, torch.Tensor]  # mean over the micro-batches of each loss term
    grad_norm: float
    skipped: bool  # non-finite loss or gradient: nothing was updated
    preempt: bool  # some rank received a preemption signal
    time_due: bool  # ckpt.every_minutes have passed since the last save


class ResumeError(RuntimeError):
    """The checkpoint cannot continue this run (changed config keys, world size)."""


class NonFiniteWeights(RuntimeError):
    """Weights (or their EMA) hold NaN/inf: they are never saved nor exported."""


def unwrap(module: nn.Module) -> nn.Module:
    """The bare network inside accelerate's / DDP's wrappers (to reach its attributes)."""
    return extract_model_from_parallel(module)


def force_cpu() -> bool:
    """Several processes without CUDA: accelerate needs ``cpu=True`` to pick gloo."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _get(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def unsafe_changes(saved: dict, current: dict, extra_safe: tuple[str, ...] = ()) -> list[str]:
    """Changed dotted keys that are not resume-safe."""
    patterns = RESUME_SAFE_KEYS + tuple(extra_safe)
    return [
        key
        for key in changed_keys(saved, current)
        if not any(fnmatch.fnmatchcase(key, p) for p in patterns)
    ]


class Preemption:
    """SIGTERM, SIGINT and SIGHUP set ``requested``; a second SIGINT aborts at once.

    A signal the process inherited as ignored (``nohup`` ignores SIGHUP, a background job
    of a non-interactive shell SIGINT) stays ignored: the user asked for exactly that.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.requested = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second {name}: aborting without saving")
        if not self.requested:
            self.requested = name
            log.warning("%s: saving a checkpoint after this step, then exiting", name)

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextmanager
def _eval(modules: dict[str, nn.Module]) -> Iterator[None]:
    """Modules in eval mode inside the block, back to their previous mode after."""
    modes = {name: module.training for name, module in modules.items()}
    for module in modules.values():
        module.eval()
    try:
        yield
    finally:
        for name, module in modules.items():
            module.train(modes[name])


class Trainer:
    """One run: set up in ``__init__``, then ``resume()``, then ``run()`` (see ``train``)."""

    def __init__(self, stage: Stage, ctx: RunContext, preemption: Preemption):
        self.stage, self.ctx, self.preemption = stage, ctx, preemption
        self.cfg = cfg = stage.config
        if cfg.train.grad_accum < 1 or cfg.train.max_steps < 0:
            raise ConfigError("train.grad_accum must be >= 1 and train.max_steps >= 0")
        self.run_dir = ctx.run_dir
        trackers = available_trackers(cfg.train.trackers)
        self.accelerator = acc = Accelerator(
            cpu=force_cpu(),
            mixed_precision=resolve_precision(cfg.train.mixed_precision),
            dynamo_backend="inductor" if cfg.train.compile else "no",  # compiled in prepare()
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=cfg.train.grad_accum, sync_with_dataloader=False
            ),
            log_with=trackers or None,
            project_config=ProjectConfiguration(
                project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")
            ),
            kwargs_handlers=[
                DistributedDataParallelKwargs(
                    find_unused_parameters=cfg.train.ddp_find_unused_parameters
                ),
                InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.train.pg_timeout_minutes)),
            ],
        )
        self.rank, self.world = acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process

        # Build: the same initial weights on every rank and for every world size.
        seed_all(cfg.train.seed)
        modules = stage.build()
        for name, module in modules.items():
            if not name.isidentifier():
                raise ValueError(f"{stage.name}.build(): module name {name!r} is not an identifier")
            module.to(acc.device).train()
        freeze(modules, cfg.init)  # before the optimizer: frozen parameters get no state
        self.raw: dict[str, nn.Module] = modules  # the bare networks (DDP shares them)
        self.started_from: dict[str, str] | None = None  # fine-tuning: the export's record
        self.ema = EMA(modules, cfg.ema) if cfg.ema.enabled else None  # copies, before wrapping
        optimizer = make_optimizer(modules, cfg.optim)
        *wrapped, self.optimizer = acc.prepare(*modules.values(), optimizer)
        self.modules = dict(zip(modules, wrapped))
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.loader = stage.train_loader(self.rank, self.world)

        self.step = 0
        self.batches_seen = 0  # per rank, since the start (skipped steps included)
        self.skipped_steps = 0  # non-finite loss or gradient
        self.overflow_steps = 0  # fp16 scaler overflows
        self.consecutive_skips = 0
        self.best: dict[str, Any] | None = None
        mirror = None
        if self.is_main:  # only the main rank finds, commits and mirrors checkpoints
            mirror = self._mirror_folder(ctx)
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints", keep_last=cfg.ckpt.keep_last, mirror=mirror
        )

    def _mirror_folder(self, ctx: RunContext) -> Path | None:
        """``<mirror>/<preset>/<stage>/<run id>/checkpoints``, beside copies of the run's
        identity, upstream record and config (``run.json`` is drawn here at the first start)."""
        base = Path(self.cfg.ckpt.mirror) / ctx.preset / ctx.stage if self.cfg.ckpt.mirror else None
        identity = run_identity(self.run_dir, ctx.runs_root, base)
        if base is None:
            return None
        folder = base / identity["id"]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(folder / IDENTITY_FILE, identity)
            upstream = self.run_dir / UPSTREAM_FILE
            write_json_atomic(
                folder / UPSTREAM_FILE,
                json.loads(upstream.read_text()) if upstream.exists() else {},
            )
            write_json_atomic(folder / "config.json", to_dict(self.cfg))
        except OSError as err:  # as with checkpoint copies: a failing mirror never stops a run
            log.warning("could not write the run's files to the mirror %s: %s", folder, err)
        return folder / "checkpoints"

    # ------------------------------------------------------------------ resume

    def _find_checkpoint(self) -> Checkpoint | None:
        """The main rank picks the newest valid checkpoint; every rank opens the same one."""
        choice: list[Any] = [None]
        if self.is_main:
            try:
                found = self.checkpoints.latest()
                choice = [("ok", str(found.path), found.manifest) if found else None]
            except CheckpointError as err:
                choice = [("error", str(err), None)]
        if self.world > 1:
            broadcast_object_list(choice)
        if choice[0] is None:
            return None
        kind, value, manifest = choice[0]
        if kind == "error":
            raise ResumeError(value)
        return Checkpoint(Path(value), manifest)

    def _load_state(self, checkpoint: Checkpoint) -> None:
        """Everything a checkpoint holds; the config's resume-safe hyperparameters win."""
        for name, module in self.raw.items():
            module.load_state_dict(checkpoint.read(f"model.{name}"))
        if self.ema is not None:
            if checkpoint.has("ema"):
                self.ema.load_state_dict(checkpoint.read("ema"))
            else:
                log.warning("%s holds no EMA: the average restarts here", checkpoint.path)
                self.ema.copy_from(self.raw)
        self.optimizer.load_state_dict(checkpoint.read("optimizer"))
        apply_hyperparameters(self.optimizer, self.cfg.optim)
        state = checkpoint.read("trainer")
        self.step, self.batches_seen = state["step"], state["batches_seen"]
        self.skipped_steps, self.overflow_steps = state["skipped_steps"], state["overflow_steps"]
        self.consecutive_skips, self.best = state["consecutive_skips"], state["best"]
        self.started_from = state.get("init")
        scaler = self.accelerator.scaler
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        mine = checkpoint.read(f"rank{self.rank}")
        self.loader.load_state_dict(mine["data"])
        set_rng_state(mine["rng"])  # last: nothing after this may draw before the loop

    def resume(self) -> bool:
        """Restore everything from the newest valid checkpoint; False if there is none."""
        checkpoint = self._find_checkpoint()
        if checkpoint is None:
            if self.cfg.init.from_:
                self.start_from_export()
            self.stage.started_from = self.started_from
            seed_all(derive_seed(self.cfg.train.seed, "train", self.rank))
            return False
        saved_world = int(checkpoint.manifest.get("world_size", 1))
        if saved_world != self.world:
            raise ResumeError(
                f"{checkpoint.path} was written by {saved_world} processes, this run has "
                f"{self.world}: the per-rank data cursors and random streams do not carry over"
            )
        saved, current = checkpoint.read("config"), to_dict(self.cfg)
        # Checkpoints from before fine-tuning existed have no init section: random weights.
        saved.setdefault("init", to_dict(InitConfig()))
        # A key added to the code since the checkpoint was written takes its default (keys
        # are added with the default that keeps the old behaviour).
        saved = merge(to_dict(type(self.cfg)()), saved)
        bad = unsafe_changes(saved, current, tuple(getattr(self.stage, "resume_safe_keys", ())))
        if bad:
            changes = ", ".join(f"{k} ({_get(saved, k)!r} -> {_get(current, k)!r})" for k in bad)
            raise ResumeError(
                f"the config differs from {checkpoint.path} in keys that break resume: "
                f"{changes}. Restore them, or use another --runs folder for a new run"
            )
        try:
            self._load_state(checkpoint)
        except (CheckpointError, KeyError, RuntimeError, ValueError) as err:
            raise ResumeError(f"{checkpoint.path} does not fit this run: {err!r}") from err
        self.stage.started_from = self.started_from
        log.info("resumed from %s (step %d)", checkpoint.path, self.step)
        return True

    def start_from_export(self) -> None:
        """A new fine-tuning run: the export's weights, the EMA restarted there."""
        self.started_from = load_init(self.stage, self.raw, self.cfg.init)
        if self.ema is not None:
            self.ema.copy_from(self.raw)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.run_dir / INIT_FILE, self.started_from)
        log.info("starting from %s (export %s)", self.cfg.init.from_, self.started_from["hash"])

    # ------------------------------------------------------------------ saving

    def _check_finite(self, what: str) -> None:
        """Refuse to ``what`` (save, export) weights that hold NaN/inf, on every rank.

        A step's loss and gradient norm are checked, yet an update can still overflow
        (a huge LR, a zero eps); such weights saved would make every resume fail.
        """
        modules = dict(self.raw)
        if self.ema is not None:
            modules.update({f"ema.{n}": m for n, m in self.ema.modules.items()})
        bad = [
            f"{prefix}.{name}"
            for prefix, module in modules.items()
            for name, t in (*module.named_parameters(), *module.named_buffers())
            if t.is_floating_point() and not bool(torch.isfinite(t).all())
        ]
        if self._agree([float(bool(bad))])[0] > 0:
            where = ", ".join(bad[:3]) or "on another rank"
            raise NonFiniteWeights(
                f"the weights at step {self.step} are not finite ({where}): not {what}d; the "
                "last checkpoint is kept. Lower optim.lr (or raise optim.eps) and re-run, "
                "which resumes from it"
            )

    def save(self, final: bool = False) -> None:
        self._check_finite("save")
        shared: dict[str, Any] = {}
        if self.is_main:
            scaler = self.accelerator.scaler
            shared = {
                "config": to_dict(self.cfg),
                "trainer": {
                    "step": self.step,
                    "batches_seen": self.batches_seen,
                    "skipped_steps": self.skipped_steps,
                    "overflow_steps": self.overflow_steps,
                    "consecutive_skips": self.consecutive_skips,
                    "best": self.best,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "init": self.started_from,
                },
                "optimizer": self.optimizer.state_dict(),
                **{f"model.{n}": m.state_dict() for n, m in self.raw.items()},
            }
            if self.ema is not None:
                shared["ema"] = self.ema.state_dict()
        per_rank = {f"rank{self.rank}": {"rng": rng_state(), "data": self.loader.state_dict()}}
        info = {
            "batches_seen": self.batches_seen,
            "world_size": self.world,
            "final": final,
            "best": self.best,
        }
        path = self.checkpoints.save(
            self.step,
            shared,
            per_rank,
            info,
            self.rank,
            any_failed=lambda failed: self._agree([float(failed)])[0] > 0,
        )
        self.last_save = time.monotonic()
        log.info("saved %s", path)

    # ------------------------------------------------------------- evaluation

    def _eval_modules(self) -> dict[str, nn.Module]:
        return self.ema.modules if self.ema is not None else self.raw

    def validate(self) -> bool:
        """Main rank validates with EMA weights; returns (on every rank) whether it is a new best."""
        new_best = 0.0
        if self.is_main:
            with preserve_rng(), torch.no_grad(), self.accelerator.autocast(), _eval(self.raw):
                metrics = self.stage.validate(self._eval_modules(), self.step)
            metrics = {k: float(v) for k, v in metrics.items()}
            self.metrics.write(self.step, "val", metrics)
            self.accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=self.step)
            best_metric = getattr(self.stage, "best_metric", None)
            if best_metric is not None and best_metric[0] not in metrics:
                log.warning("validation returned no %r: no best checkpoint", best_metric[0])
            elif best_metric is not None:
                name, mode = best_metric
                value = float(metrics[name])
                better = self.best is None or (
                    value < self.best["value"] if mode == "min" else value > self.best["value"]
                )
                if better and math.isfinite(value):
                    self.best = {"metric": name, "mode": mode, "value": value, "step": self.step}
                    new_best = 1.0
        return self._agree([new_best])[0] > 0

    def preview(self) -> None:
        if self.is_main:
            modules = {"ema": self._eval_modules(), "raw": self.raw}
            with preserve_rng(), torch.no_grad(), self.accelerator.autocast(), _eval(self.raw):
                self.stage.preview(modules, self.step, self.run_dir / "previews")
        self.accelerator.wait_for_everyone()

    def export(self) -> None:
        self._check_finite("export")
        if self.is_main:
            with torch.no_grad(), _eval(self.raw):
                self.stage.export(self._eval_modules(), self.run_dir / "export")
            write_json_atomic(self.run_dir / "exported.json", {"step": self.step})
            log.info("exported to %s", self.run_dir / "export")
        self.accelerator.wait_for_everyone()

    def exported(self) -> bool:
        marker = self.run_dir / "exported.json"
        if not (self.run_dir / "export" / "manifest.json").exists() or not marker.exists():
            return False
        return json.loads(marker.read_text()).get("step") == self.step

    # -------------------------------------------------------------------- loop

    def _agree(self, values: list[float]) -> list[float]:
        """Sum over ranks: every rank takes the same decision from the same numbers."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        if self.world > 1:
            tensor = self.accelerator.reduce(tensor, reduction="sum")
        return tensor.tolist()

    def _forward_backward(self, batches: Any) -> dict[str, torch.Tensor]:
        """``grad_accum`` micro-batches through the stage's loss; mean of each loss term."""
        acc, accum = self.accelerator, self.cfg.train.grad_accum
        totals: dict[str, torch.Tensor] = {}
        for _ in range(accum):
            with preserve_rng():  # a loader never moves the training streams
                batch = next(batches)
            self.batches_seen += 1
            batch = send_to_device(batch, acc.device, non_blocking=True)
            with acc.accumulate(*self.modules.values()):
                with acc.autocast():
                    losses = self.stage.loss(self.modules, batch, self.step)
                if not isinstance(losses, dict) or "loss" not in losses:
                    raise TypeError(f"{self.stage.name}.loss must return a dict with a 'loss'")
                acc.backward(losses["loss"])  # divided by grad_accum by accelerate
            for key, value in losses.items():
                value = torch.as_tensor(value, device=acc.device).detach().float() / accum
                totals[key] = totals[key] + value if key in totals else value
        return totals

    def train_step(self, batches: Any) -> StepResult:
        """One step, or a skip when the loss or gradient norm is not finite on some rank.

        One all-reduce per step carries every decision the ranks must share: non-finite
        loss, non-finite gradient, a preemption signal, a wall-clock save being due.
        """
        cfg, ckpt = self.cfg.train, self.cfg.ckpt
        losses = self._forward_backward(batches)
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = self.accelerator.clip_grad_norm_(self.params, clip)  # unscales fp16 first
        grad_norm = torch.as_tensor(grad_norm, device=self.accelerator.device).float()
        due = (
            ckpt.every_minutes > 0 and time.monotonic() - self.last_save >= 60 * ckpt.every_minutes
        )
        bad_loss, bad_grad, preempt, due = self._agree(
            [
                float(not torch.isfinite(losses["loss"])),
                float(not torch.isfinite(grad_norm)),
                float(bool(self.preemption.requested)),
                float(due),
            ]
        )
        result = StepResult(losses, float(grad_norm), False, preempt > 0, due > 0)
        scaler = self.accelerator.scaler
        if bad_loss or bad_grad:
            self.optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()  # records the overflow, lowers the scale
            if scaler is not None and not bad_loss:
                self.overflow_steps += 1
            else:
                self.skipped_steps += 1
                self.consecutive_skips += 1
                log.warning(
                    "step %d: non-finite %s, skipped (%d in a row)",
                    self.step + 1,
                    "loss" if bad_loss else "gradient norm",
                    self.consecutive_skips,
                )
            result.skipped = True
            return result
        set_lr(self.optimizer, lr_at(self.step, self.cfg.optim, cfg.max_steps))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.consecutive_skips = 0
        if self.ema is not None and self.step % self.cfg.ema.update_every == 0:
            self.ema.update(self.raw)
        return result

    def log_step(self, losses: dict[str, torch.Tensor], grad_norm: float) -> None:
        """Loss terms (mean over ranks), LR, grad norm, speed -> metrics.jsonl and trackers."""
        names = sorted(losses)
        means = self.accelerator.reduce(torch.stack([losses[k] for k in names]), "mean")
        values = {k: float(v) for k, v in zip(names, means.tolist())}
        now = time.monotonic()
        last_time, last_step = self.last_log
        values.update(
            lr=lr_at(self.step - 1, self.cfg.optim, self.cfg.train.max_steps),
            grad_norm=grad_norm,
            steps_per_s=(self.step - last_step) / max(now - last_time, 1e-9),
            skipped_steps=self.skipped_steps,
            overflow_steps=self.overflow_steps,
        )
        self.last_log = (now, self.step)
        if self.is_main:
            self.metrics.write(self.step, "train", values)
            self.accelerator.log({f"train/{k}": v for k, v in values.items()}, step=self.step)

    def after_update(self, result: StepResult) -> bool:
        """Logging, validation and previews due at this step; whether a save is due too.

        After a stop signal only logging runs: the save comes first (a grace period may be
        short), the validation and previews of this step are not made up for later."""
        cfg, every_steps = self.cfg.train, self.cfg.ckpt.every_steps
        save = False
        if cfg.log_every and self.step % cfg.log_every == 0:
            self.log_step(result.losses, result.grad_norm)
        if result.preempt:
            return True
        if cfg.val_every and self.step % cfg.val_every == 0:
            save |= self.validate()  # a new best is saved (and kept by the rotation)
        if cfg.preview_every and self.step % cfg.preview_every == 0:
            self.preview()
        return save or bool(every_steps and self.step % every_steps == 0)

    def loop(self, batches: Any, bar: Any) -> int | None:
        """Steps until ``max_steps`` (returns None) or an early exit (returns its code)."""
        cfg = self.cfg.train
        self.last_save = time.monotonic()
        self.last_log = (self.last_save, self.step)
        while self.step < cfg.max_steps:
            result = self.train_step(batches)
            self.preempted = result.preempt
            if self.consecutive_skips >= cfg.max_consecutive_skips:
                log.error(
                    "stopping: %d non-finite steps in a row at step %d; lower optim.lr or "
                    "check the data, then re-run (resumes from the last checkpoint)",
                    self.consecutive_skips,
                    self.step,
                )
                return EXIT_NONFINITE
            save = result.preempt or result.time_due
            if not result.skipped:
                bar.update(1)
                bar.set_postfix(loss=f"{float(result.losses['loss']):.4g}", refresh=False)
                save |= self.after_update(result)
            if self.step >= cfg.max_steps:
                return None  # the final save follows
            if save:
                self.save()
            if result.preempt:
                return EXIT_PREEMPTED
        return None

    def run(self) -> int:
        """Train from the current step to ``max_steps``, save, export; returns an exit code."""
        cfg = self.cfg.train
        if self.is_main:
            self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", resume_step=self.step)
            if self.accelerator.log_with:
                self.accelerator.init_trackers(f"minisd-{self.stage.name}", flat_config(self.cfg))
        if self.step >= cfg.max_steps:
            if self.step > cfg.max_steps:
                log.warning("checkpoint step %d is past train.max_steps", self.step)
            if self.exported():
                log.info("already trained to step %d and exported: nothing to do", self.step)
            else:
                self.export()
            return EXIT_OK
        with preserve_rng():
            batches = iter(self.loader)
        self.preempted = False
        bar = progress_bar(cfg.max_steps, self.step, self.is_main)
        with bar, logging_redirect_tqdm():  # log lines above the bar, not through it
            code = self.loop(batches, bar)
        if code is not None:
            return code
        if self.preempted:  # a stop at the last step: save before anything else, export later
            self.save(final=True)
            return EXIT_PREEMPTED
        if cfg.val_every and self.step % cfg.val_every:
            self.validate()
        if cfg.preview_every and self.step % cfg.preview_every:
            self.preview()
        self.save(final=True)  # a signal during it lets it finish, then stops (below)
        if self._stop_requested():
            return EXIT_PREEMPTED  # export on the next run: the grace period may be short
        self.export()
        return EXIT_PREEMPTED if self._stop_requested() else EXIT_OK

    def _stop_requested(self) -> bool:
        """A stop signal on any rank since the loop ended (validation, previews, the save)."""
        return self._agree([float(bool(self.preemption.requested))])[0] > 0


def train(stage: Stage, ctx: RunContext) -> int:
    """Train ``stage`` to ``train.max_steps`` (resuming if possible); returns an exit code."""
    with Preemption() as preemption:
        trainer = None
        try:
            trainer = Trainer(stage, ctx, preemption)
            trainer.resume()
            return trainer.run()
        except ResumeError as err:
            log.error("cannot resume: %s", err)
            return EXIT_CANNOT_RESUME
        except NonFiniteWeights as err:
            log.error("stopping: %s", err)
            return EXIT_NONFINITE
        except KeyboardInterrupt as err:
            log.error("interrupted: %s", err or "stopped without saving")
            return EXIT_ABORTED
        finally:
            if trainer is not None:
                trainer.checkpoints.wait()  # a mirror copy in flight finishes before exit
                trainer.accelerator.end_training()
