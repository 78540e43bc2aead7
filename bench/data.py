"""Data path: the shard reader's images/s per worker, and the UNet stage's training
throughput from the latent cache vs. encoding on the fly vs. synthetic batches.

Reader: ``bench/reader_throughput.py``'s synthetic shards (PNG shapes, written once under
/tmp and reused) and its timing function, at 64 and 512 px with 0 workers (the main process
is the one worker) and 2 workers (the rate is divided by 2).

Stage: tiny-preset VAE and CLIP exports from untrained models (the speed does not depend on
the weights) over 32 px synthetic shards, the tiny UNet preset, and the stage's own
``train_loader`` / ``loss`` with AdamW, one warm-up step then timed steps in three modes:
``cache`` (the default: latents and text states read from the cache), ``on the fly``
(``cache.enabled=false``: VAE and text encoder run on every batch) and ``synthetic`` (one
cached batch reused: no data cost at all, the reference for "the reader is never the
bottleneck"). The three are built up front and their steps alternate (ABC, CBA, ...), as
the impls of the other benchmarks do, so a change of machine load hits all three alike; the
ratio to synthetic is the median over rounds. Each mode also reports its *data wait*: the
median time a step spends in ``next(loader)``, the part of the step that is the reader's.
The one-off cache build is timed separately.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import models


@dataclass(frozen=True)
class Figure:
    name: str
    value: float
    unit: str
    note: str = ""


def reader_figures(batches: int, resolutions: tuple[int, ...] = (64, 512)) -> list[Figure]:
    from . import reader_throughput as reader  # writes its shards under /tmp once

    root = Path(tempfile.gettempdir()) / "minisd-reader-bench"
    out = []
    for px in resolutions:
        split = reader.shards_at(root, px)
        for workers in (0, 2):
            rate = reader.images_per_second(split, px, workers, batches)
            per_worker = rate / max(1, workers)
            out.append(
                Figure(
                    f"reader {px} px, num_workers={workers}",
                    per_worker,
                    "images/s per worker",
                    f"{rate:,.0f} images/s in all; {batches} batches of {reader.BATCH}",
                )
            )
    return out


def _tiny_exports(root: Path, shards: Path) -> None:
    """Untrained tiny-preset VAE and CLIP exports under ``root/tiny/{vae,clip}/export``."""
    from stages.clip.export import save_clip_export
    from stages.clip.loss import LogitScale
    from stages.clip.model import ImageTower, TextEncoder
    from stages.clip.tokenizer import train_tokenizer
    from stages.common.data import iter_split
    from stages.vae.export import save_vae_export

    torch.manual_seed(0)
    vae_cfg, clip_cfg = models.vae_config("tiny"), models.clip_config("tiny")
    vae = models.our_vae(vae_cfg)
    vae_hash = save_vae_export(
        vae,
        vae_cfg,
        root / "tiny" / "vae" / "export",
        mean=torch.zeros(vae_cfg.latent_channels),
        std=torch.ones(vae_cfg.latent_channels),
        resolution=32,
    )
    captions = [c for b in iter_split(shards / "train", 64, 32) for c in b["caption"]]
    tokenizer = train_tokenizer(captions, 512, clip_cfg.text.context_length, min_frequency=1)
    text = TextEncoder(clip_cfg.text, tokenizer.vocab_size, clip_cfg.embed_dim)
    side = 32 // vae_cfg.factor
    image = ImageTower(clip_cfg.image, vae_cfg.latent_channels, side, clip_cfg.embed_dim)
    save_clip_export(
        root / "tiny" / "clip" / "export", text, image, LogitScale(), tokenizer, vae_hash=vae_hash
    )


def _timed_step(stage, loader, modules, optimizer, synthetic: bool):
    """One training step of ``stage`` -> (step seconds, seconds waited for the batch).

    ``synthetic`` reuses the loader's first batch: the step without any data cost.
    """
    fixed = next(loader)
    count = itertools.count()

    def step() -> tuple[float, float]:
        start = time.perf_counter()
        batch = fixed if synthetic else next(loader)
        waited = time.perf_counter() - start
        loss = stage.loss(modules, batch, next(count))["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, waited

    return step


def stage_figures(rounds: int, samples: int = 512) -> list[Figure]:
    import sys

    from stages.common.config import load_config
    from stages.common.optim import make_optimizer
    from stages.common.stage import RunContext
    from stages.unet.stage import UNetStage, UNetStageConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from synthetic import make_shards

    modes = ("cache", "on the fly", "synthetic")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = make_shards(root / "shapes-32", n_train=samples, resolution=32, shard_size=128)
        runs = root / "runs"
        _tiny_exports(runs, shards)
        steps, batch_size = {}, 0
        for mode in modes:
            overrides = [
                f"data.path={shards}",
                f"cache.enabled={str(mode != 'on the fly').lower()}",
            ]
            cfg = load_config(UNetStageConfig, "tiny", "unet", overrides)
            batch_size = cfg.data.batch_size
            stage = UNetStage(cfg, RunContext(runs, "tiny", "unet"))
            start = time.perf_counter()
            loader = iter(stage.train_loader(0, 1))
            if mode == "cache":
                out.append(
                    Figure(
                        "latent cache build",
                        time.perf_counter() - start,
                        "s",
                        f"{samples} samples, once per (exports, shards)",
                    )
                )
            modules = stage.build()
            optimizer = make_optimizer(modules, cfg.optim)
            steps[mode] = _timed_step(stage, loader, modules, optimizer, mode == "synthetic")
            steps[mode]()  # warm-up: the loader's workers start, the allocator settles
        times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
        for r in range(rounds):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                times[mode].append(steps[mode]())
        median = {mode: statistics.median(t for t, _ in times[mode]) for mode in modes}
        for mode in modes:
            ratio = statistics.median(
                t / s for (t, _), (s, _) in zip(times[mode], times["synthetic"])
            )
            wait = statistics.median(w for _, w in times[mode])
            out.append(
                Figure(
                    f"unet stage (tiny) step, {mode}",
                    batch_size / median[mode],
                    "samples/s",
                    f"{median[mode] * 1e3:.0f} ms/step, batch {batch_size}; "
                    f"{ratio:.2f}x the synthetic step; data wait {wait * 1e3:.1f} ms/step",
                )
            )
    return out
