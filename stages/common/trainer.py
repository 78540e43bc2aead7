"""The one training loop shared by every stage: ``train(stage, ctx) -> exit code``.

accelerate owns devices, mixed precision ("auto": bf16 where the GPU has it, fp16 with a
gradient scaler on older GPUs, none on CPU), gradient accumulation and multi-process launch;
the stage only builds modules, a resumable loader and a loss (``stage.py``). One step reads
top to bottom in ``Trainer.loop``. What is notable:

- ``step`` counts optimizer updates of ``train.grad_accum`` batches per rank. A step whose
  loss or gradient norm is not finite on any rank is *skipped*: its batches are consumed,
  nothing else moves (weights, optimizer, EMA, ``step``, so the LR schedule neither). An fp16
  overflow with a finite loss is the gradient scaler's business, not a skip.
- Checkpoints every ``ckpt.every_steps`` and ``ckpt.every_minutes``, at a new best validation
  metric, on a stop signal and at the end. Re-running the command resumes (``resume.py``),
  bitwise equal on CPU to an uninterrupted run: the random streams are restored last, and
  validation, previews and batch fetches run under ``preserve_rng``. A finished run re-run
  does nothing. Non-finite weights are never saved nor exported.
- Exit codes and stop signals: ``exits.py``; fine-tuning (``init.from``): ``finetune.py``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
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
    extract_model_from_parallel,
    send_to_device,
)
from torch import nn
from tqdm.contrib.logging import logging_redirect_tqdm

from .checkpoint import Checkpoint, CheckpointError, CheckpointManager
from .config import ConfigError, to_dict
from .ema import EMA
from .exits import (
    EXIT_ABORTED,
    EXIT_CANNOT_RESUME,
    EXIT_DISK_FULL,
    EXIT_ERROR,
    EXIT_NONFINITE,
    EXIT_OK,
    EXIT_PREEMPTED,
    Preemption,
)
from .files import DiskFull, disk_full, write_json_atomic
from .finetune import INIT_FILE, freeze, load_init
from .lease import Lease, LeaseHeld
from .log import MetricsLog, available_trackers, flat_config, progress_bar
from .optim import apply_hyperparameters, lr_at, make_optimizer, set_lr
from .resume import ResumeError, check_resumable, choose_checkpoint
from .run import IDENTITY_FILE, UPSTREAM_FILE, mirror_lease, run_identity
from .seeding import derive_seed, preserve_rng, rng_state, seed_all, set_rng_state
from .stage import RunContext, Stage

log = logging.getLogger(__name__)


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
        self.best: dict[str, Any] | None = None  # {"metric", "mode", "value", "step"}
        self.metrics: MetricsLog | None = None  # main rank only, opened by run() after resume
        self.last_save = 0.0  # time.monotonic(); the loop starts the wall clock
        self.last_log = (0.0, 0)  # (time.monotonic(), step) of the last train log line
        mirror = None
        self.lease: Lease | None = None  # the mirrored run's, held by the main rank
        if self.is_main:  # only the main rank finds, commits and mirrors checkpoints
            mirror = self._mirror_folder(ctx)
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints",
            keep_last=cfg.ckpt.keep_last,
            mirror=mirror,
            mirror_timeout_s=60 * cfg.ckpt.mirror_timeout_minutes,
            lease=self.lease,
        )

    def _mirror_folder(self, ctx: RunContext) -> Path | None:
        """``<mirror>/<preset>/<stage>/<run id>/checkpoints``, beside copies of the run's
        identity, upstream record and config (``run.json`` is drawn here at the first start)."""
        base = Path(self.cfg.ckpt.mirror) / ctx.preset / ctx.stage if self.cfg.ckpt.mirror else None
        identity = run_identity(self.run_dir, ctx.runs_root, base)
        if base is None:
            return None
        folder = base / identity["id"]
        # Before anything is written there: a second live runtime on the same Drive stops.
        try:
            self.lease = mirror_lease(folder, 60 * self.cfg.ckpt.mirror_lease_minutes)
        except OSError as err:  # an unwritable mirror: its copies will warn, as ever
            log.warning("could not take the lease of the mirror %s: %s", folder, err)
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

    def resume(self) -> bool:
        """Restore everything from the newest valid checkpoint; False if there is none."""
        checkpoint = choose_checkpoint(self.checkpoints, self.is_main, self.world)
        if checkpoint is None:
            if self.cfg.init.from_:
                self.start_from_export()
            self.stage.started_from = self.started_from
            seed_all(derive_seed(self.cfg.train.seed, "train", self.rank))
            return False
        extra_safe = tuple(getattr(self.stage, "resume_safe_keys", ()))
        check_resumable(checkpoint, self.cfg, self.world, extra_safe)
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

    # ------------------------------------------------------------------- train

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
        bar = progress_bar(cfg.max_steps, self.step, self.is_main)
        with bar, logging_redirect_tqdm():  # log lines above the bar, not through it
            code = self.loop(batches, bar)
        if code is not None:
            return code
        if cfg.val_every and self.step % cfg.val_every:
            self.validate()
        if cfg.preview_every and self.step % cfg.preview_every:
            self.preview()
        self.save(final=True)  # a signal during it lets it finish, then stops (below)
        if self._stop_requested():
            return EXIT_PREEMPTED  # export on the next run: the grace period may be short
        self.export()
        return EXIT_PREEMPTED if self._stop_requested() else EXIT_OK

    def loop(self, batches: Iterator[Any], bar: Any) -> int | None:
        """Steps until ``max_steps`` (returns None: run() validates, saves and exports) or an
        early stop (returns its exit code)."""
        cfg, ckpt, acc = self.cfg.train, self.cfg.ckpt, self.accelerator
        accum = cfg.grad_accum
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        self.last_save = time.monotonic()
        self.last_log = (self.last_save, self.step)
        while self.step < cfg.max_steps:
            # Forward and backward over the grad_accum micro-batches (accelerate syncs the
            # gradients on the last one); the mean of each loss term.
            losses: dict[str, torch.Tensor] = {}
            for _ in range(accum):
                with preserve_rng():  # a loader never moves the training streams
                    batch = next(batches)
                self.batches_seen += 1
                batch = send_to_device(batch, acc.device, non_blocking=True)
                with acc.accumulate(*self.modules.values()):
                    with acc.autocast():
                        terms = self.stage.loss(self.modules, batch, self.step)
                    if not isinstance(terms, dict) or "loss" not in terms:
                        raise TypeError(f"{self.stage.name}.loss must return a dict with a 'loss'")
                    acc.backward(terms["loss"])  # divided by grad_accum by accelerate
                for key, value in terms.items():
                    value = torch.as_tensor(value, device=acc.device).detach().float() / accum
                    losses[key] = losses[key] + value if key in losses else value
            grad_norm = acc.clip_grad_norm_(self.params, clip)  # unscales fp16 first
            grad_norm = torch.as_tensor(grad_norm, device=acc.device).float()

            # One all-reduce for every decision the ranks must share: a non-finite loss or
            # gradient, a stop signal, a wall-clock save being due.
            since_save = time.monotonic() - self.last_save
            time_due = ckpt.every_minutes > 0 and since_save >= 60 * ckpt.every_minutes
            bad_loss, bad_grad, preempt, time_due = (
                total > 0
                for total in self._agree(
                    [
                        float(not torch.isfinite(losses["loss"])),
                        float(not torch.isfinite(grad_norm)),
                        float(bool(self.preemption.requested)),
                        float(time_due),
                    ]
                )
            )

            # Skip (nothing updated, the LR schedule stays) or step.
            skipped = bad_loss or bad_grad
            if skipped:
                self.optimizer.zero_grad(set_to_none=True)
                if acc.scaler is not None:
                    acc.scaler.update()  # records the overflow, lowers the scale
                if acc.scaler is not None and not bad_loss:
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
            else:
                set_lr(self.optimizer, lr_at(self.step, self.cfg.optim, cfg.max_steps))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.consecutive_skips = 0
                if self.ema is not None and self.step % self.cfg.ema.update_every == 0:
                    self.ema.update(self.raw)
            if self.consecutive_skips >= cfg.max_consecutive_skips:
                log.error(
                    "stopping: %d non-finite steps in a row at step %d; lower optim.lr or "
                    "check the data, then re-run (resumes from the last checkpoint)",
                    self.consecutive_skips,
                    self.step,
                )
                return EXIT_NONFINITE

            # Log, validate, preview: what is due at this step. After a stop signal only the
            # log line: the save comes first (a grace period may be short), and this step's
            # validation and previews are not made up for later.
            save = preempt or time_due
            if not skipped:
                bar.update(1)
                bar.set_postfix(loss=f"{float(losses['loss']):.4g}", refresh=False)
                if cfg.log_every and self.step % cfg.log_every == 0:
                    self._log_metrics(losses, float(grad_norm))
                if not preempt:
                    if cfg.val_every and self.step % cfg.val_every == 0:
                        save |= self.validate()  # a new best is saved (and kept by the rotation)
                    if cfg.preview_every and self.step % cfg.preview_every == 0:
                        self.preview()
                    save |= bool(ckpt.every_steps and self.step % ckpt.every_steps == 0)

            # Save what is due. A stop signal saves and exits (at the last step that save is
            # the final one, and the export waits for the re-run).
            if preempt:
                self.save(final=self.step >= cfg.max_steps)
                return EXIT_PREEMPTED
            if save and self.step < cfg.max_steps:  # at max_steps run() saves the final one
                self.save()
        return None

    # ---------------------------------------------------- what the loop calls

    def _agree(self, values: list[float]) -> list[float]:
        """Sum over ranks: every rank takes the same decision from the same numbers."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        if self.world > 1:
            tensor = self.accelerator.reduce(tensor, reduction="sum")
        return tensor.tolist()

    def _log_metrics(self, losses: dict[str, torch.Tensor], grad_norm: float) -> None:
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

    def export(self) -> None:
        self._check_finite("export")
        if self.is_main:
            folder = self.run_dir / "export"
            try:
                with torch.no_grad(), _eval(self.raw):
                    self.stage.export(self._eval_modules(), folder)
            except OSError as err:
                # Stages build the export aside (``.export.tmp``): a full disk leaves no part
                # of it, and the previous export, if any, in place.
                shutil.rmtree(folder.with_name(f".{folder.name}.tmp"), ignore_errors=True)
                needed = sum(
                    t.numel() * t.element_size()
                    for m in self._eval_modules().values()
                    for t in m.state_dict().values()
                )
                full = disk_full(err, f"the {self.stage.name} export", folder, needed)
                if full is None:
                    raise
                raise full from err
            write_json_atomic(self.run_dir / "exported.json", {"step": self.step})
            log.info("exported to %s", self.run_dir / "export")
        self.accelerator.wait_for_everyone()

    def exported(self) -> bool:
        marker = self.run_dir / "exported.json"
        if not (self.run_dir / "export" / "manifest.json").exists() or not marker.exists():
            return False
        return json.loads(marker.read_text()).get("step") == self.step

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
        except LeaseHeld as err:
            log.error("stopping: %s", err)
            return EXIT_ERROR
        except DiskFull as err:
            log.error(
                "stopping: %s. The partial folder was removed and the previous checkpoint is "
                "kept: free some space (or lower ckpt.keep_last) and re-run to resume",
                err,
            )
            return EXIT_DISK_FULL
        except KeyboardInterrupt as err:
            log.error("interrupted: %s", err or "stopped without saving")
            return EXIT_ABORTED
        finally:
            if trainer is not None:
                trainer.checkpoints.wait()  # a mirror copy in flight finishes before exit
                if trainer.lease is not None:
                    trainer.lease.release()
                trainer.accelerator.end_training()
