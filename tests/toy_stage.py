"""A tiny Stage for the trainer's tests: two small modules, a resumable loader of random
tensors, and hooks that make failures happen on purpose.

- Batch ``i`` of rank ``r`` is drawn from a generator seeded by ``(seed, r, i)``: the loader
  is deterministic and its cursor is the batch index. ``toy.source = "shards"`` reads real
  shards through ``stages.common.data.ShardLoader`` instead.
- The loss draws noise from torch's global generator and the net has dropout, so a resume
  that forgot a random state would not be bitwise equal.
- ``toy.nan_batches`` poisons batches with NaN; ``toy.crash_at_batch`` raises ``ToyCrash``
  (a kill without any saving); ``toy.sleep`` slows steps so a signal can land mid-run.
- ``toy.source = "cache"`` trains on the shared encode-once cache (``stages.common.cache``)
  of a colour summary of each image, built by every rank in parallel; ``"cache_ram"`` reads
  the same rows from one in-memory copy (the old in-RAM caches' path), for comparison.
  Each encoded batch's keys go to ``encoded.rank<r>.jsonl``; ``toy.kill_encoding_rank``
  makes that rank die (``os._exit``) after its first encoded cache shard.
- Every loss call appends ``{"step", "ids", "weights"}`` (sample ids and a digest of the net)
  to ``seen.rank<r>.jsonl`` in the run folder and to ``stage.seen``.

Run as ``python tests/toy_stage.py --configs DIR --runs DIR ...`` (the CLI of a stage).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from stages.common.cache import CacheConfig, CachedRows, cached_batches, ensure_cache
from stages.common.checkpoint import CheckpointConfig
from stages.common.cli import run_stage
from stages.common.data import DataConfig, ResumableBatches, ShardLoader
from stages.common.ema import EMAConfig
from stages.common.files import write_json_atomic
from stages.common.finetune import InitConfig
from stages.common.optim import OptimConfig
from stages.common.stage import RunContext
from stages.common.trainer import TrainConfig, unwrap

DIM = 8


class ToyCrash(RuntimeError):
    """Raised by the toy loss to simulate a process killed without saving."""


@dataclass(frozen=True)
class ToyModelConfig:
    width: int = 16  # 64 makes the hidden layer 4096 elements: 8-bit optimizer state
    source: Literal["random", "shards", "cache", "cache_ram"] = "random"
    kill_encoding_rank: int = -1  # this rank dies after writing its first cache shard
    nan_batches: tuple[int, ...] = ()  # batch indices whose inputs are NaN
    crash_at_batch: int = -1  # raise ToyCrash when this batch reaches the loss
    sleep: float = 0.0  # seconds per loss call


@dataclass(frozen=True)
class ToyConfig:
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=4, resolution=16))
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            max_steps=8, log_every=1, val_every=0, preview_every=0, trackers=()
        )
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-2, warmup_steps=2, weight_decay=0.01)
    )
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(decay=0.9))
    ckpt: CheckpointConfig = field(
        default_factory=lambda: CheckpointConfig(every_steps=4, every_minutes=0, keep_last=2)
    )
    init: InitConfig = field(default_factory=InitConfig)
    cache: CacheConfig = field(default_factory=lambda: CacheConfig(shard_size=16, batch_size=8))
    toy: ToyModelConfig = field(default_factory=ToyModelConfig)


class ToyNet(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.embed = nn.Embedding(4, width)
        self.inp = nn.Linear(DIM, width)
        self.norm = nn.LayerNorm(width)
        self.hidden = nn.Linear(width, width)
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(width, DIM)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        h = self.inp(x) + self.embed(label)  # (B, width)
        return self.out(self.drop(torch.nn.functional.silu(self.hidden(self.norm(h)))))


def two_rank_env() -> dict[str, str]:
    """The environment of two plain rank processes on this machine (as a scheduler starts
    them, each adding its RANK): a free loopback port, this checkout importable, one thread."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    return env


def random_batch(seed: int, rank: int, index: int, batch_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + index)
    return {
        "x": torch.randn(batch_size, DIM, generator=generator),
        "label": torch.randint(0, 4, (batch_size,), generator=generator),
        "ids": torch.arange(index * batch_size, (index + 1) * batch_size) + rank * 10**6,
    }


class RandomBatches:
    """Infinite deterministic batches; the cursor is the index of the next batch."""

    def __init__(self, seed: int, rank: int, batch_size: int, nan_batches: tuple[int, ...]):
        self.seed, self.rank, self.batch_size = seed, rank, batch_size
        self.nan_batches = set(nan_batches)
        self.index = 0

    def __iter__(self):
        # Like a DataLoader without a generator, draw a base seed from the global generator
        # when iteration starts (lazily, at the first batch): the trainer must keep such
        # draws out of its training streams, or a resumed run would drift.
        torch.randint(0, 2**62, (1,))
        while True:
            batch = random_batch(self.seed, self.rank, self.index, self.batch_size)
            batch["index"] = self.index
            if self.index in self.nan_batches:
                batch["x"][0, 0] = float("nan")
            self.index += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


def colour_summary(images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, R, R) -> (B, 8): the mean colour of the top and bottom halves, twice."""
    pooled = torch.nn.functional.adaptive_avg_pool2d(images, (2, 1)).flatten(1)
    return torch.cat([pooled, pooled], dim=1)[:, :DIM]


class InMemoryRows(torch.utils.data.Dataset):
    """Every row of a cache held in RAM, gathered per batch (what the old caches did)."""

    def __init__(self, rows: CachedRows):
        batch = rows.__getitems__(list(range(len(rows))))
        self.x, self.keys = batch["x"].clone(), list(batch["key"])

    def __len__(self) -> int:
        return len(self.keys)

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        rows = torch.as_tensor(indices, dtype=torch.long)
        return {"x": self.x[rows], "key": [self.keys[i] for i in indices]}


class ToyEncoder:
    """The toy's encode function: records what it encoded, dies on request."""

    def __init__(self, run_dir: Path, rank: int, kill: bool):
        self.path = run_dir / f"encoded.rank{rank}.jsonl"
        self.kill, self.shards_seen = kill, set()

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        shard = int(batch["key"][0][-6:]) // 16  # tiny_shards keys: train000042
        if self.kill and self.shards_seen and shard not in self.shards_seen:
            os._exit(9)  # its first shard is committed, the second one only begun
        self.shards_seen.add(shard)
        with open(self.path, "a") as f:
            f.write(json.dumps(batch["key"]) + "\n")
        return {"x": colour_summary(batch["image"])}


def digest(module: nn.Module) -> str:
    sha = hashlib.sha256()
    for value in unwrap(module).state_dict().values():
        sha.update(value.detach().cpu().numpy().tobytes())
    return sha.hexdigest()[:16]


class ToyStage:
    name = "toy"
    best_metric = ("mse", "min")
    resume_safe_keys = ("toy.crash_at_batch", "toy.sleep")

    def __init__(self, config: ToyConfig, ctx: RunContext):
        self.config, self.ctx = config, ctx
        self.rank = 0
        self.seen: list[dict[str, Any]] = []
        self.val_batch = random_batch(seed=999, rank=0, index=0, batch_size=16)
        ctx.run_dir.mkdir(parents=True, exist_ok=True)

    def build(self) -> dict[str, nn.Module]:
        return {"net": ToyNet(self.config.toy.width), "critic": nn.Linear(DIM, 1)}

    def train_loader(self, rank: int, world_size: int):
        self.rank = rank
        cfg = self.config
        if cfg.toy.source == "shards":
            return ShardLoader.from_config(
                cfg.data, "train", seed=cfg.train.seed, rank=rank, world_size=world_size
            )
        if cfg.toy.source in ("cache", "cache_ram"):
            encode = ToyEncoder(self.ctx.run_dir, rank, cfg.toy.kill_encoding_rank == rank)
            split = cfg.data.split_dir("train")
            rows = ensure_cache(
                self.ctx.run_dir / "cache",
                {"encoder": "toy"},
                encode,
                split,
                cfg.data.resolution,
                cfg.cache,
                rank,
                world_size,
            )
            if cfg.toy.source == "cache":
                return cached_batches(rows, cfg.data.batch_size, cfg.train.seed, rank, world_size)
            return ResumableBatches(
                InMemoryRows(rows),
                cfg.data.batch_size,
                seed=cfg.train.seed,
                rank=rank,
                world_size=world_size,
                collate_fn=lambda batch: batch,
            )
        return RandomBatches(cfg.train.seed, rank, cfg.data.batch_size, cfg.toy.nan_batches)

    def _inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, list]:
        if self.config.toy.source == "shards":
            x = colour_summary(batch["image"])
            return x, torch.zeros(len(x), dtype=torch.long), list(batch["key"])
        if self.config.toy.source in ("cache", "cache_ram"):
            x = batch["x"]
            return x, torch.zeros(len(x), dtype=torch.long), list(batch["key"])
        return batch["x"], batch["label"], batch["ids"].tolist()

    def loss(self, modules: dict[str, nn.Module], batch: Any, step: int) -> dict[str, torch.Tensor]:
        toy = self.config.toy
        if batch.get("index", -2) == toy.crash_at_batch:
            raise ToyCrash(f"simulated kill at batch {toy.crash_at_batch}")
        if toy.sleep:
            time.sleep(toy.sleep)
        x, label, ids = self._inputs(batch)
        record = {"step": step, "ids": ids, "weights": digest(modules["net"])}
        self.seen.append(record)
        with open(self.ctx.run_dir / f"seen.rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        noisy = x + 0.01 * torch.randn_like(x)  # global generator: RNG state matters on resume
        recon = modules["net"](noisy, label)
        mse = (recon - x).square().mean()
        critic = modules["critic"](x).square().mean()
        return {"loss": mse + 0.1 * critic, "mse": mse.detach(), "critic": critic.detach()}

    @torch.no_grad()
    def validate(self, modules: dict[str, nn.Module], step: int) -> dict[str, float]:
        net = modules["net"]
        x = self.val_batch["x"]
        return {"mse": float((net(x, self.val_batch["label"]) - x).square().mean())}

    def preview(self, modules: dict[str, dict[str, nn.Module]], step: int, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        out = {kind: digest(group["net"]) for kind, group in modules.items()}
        (folder / f"toy_{step:07d}.json").write_text(json.dumps(out))

    def init_weights(self, folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], str]:
        """The net's weights from a toy export (the critic keeps its built ones)."""
        weights = folder / "model.safetensors"
        return {"net": load_file(str(weights))}, hashlib.sha256(weights.read_bytes()).hexdigest()

    def export(self, modules: dict[str, nn.Module], folder: Path) -> None:
        """model.safetensors + manifest.json, built aside and renamed (a minimal export)."""
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        weights = {k: v.clone() for k, v in unwrap(modules["net"]).state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        manifest = {"stage": "toy", "width": self.config.toy.width, "init": self.started_from}
        write_json_atomic(tmp / "manifest.json", manifest)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)


if __name__ == "__main__":
    raise SystemExit(run_stage("toy", ToyConfig, ToyStage))
