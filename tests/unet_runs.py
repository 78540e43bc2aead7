"""Tiny UNet stage runs for the UNet tests, of two kinds. Latent space (16 px): the stage
on untrained VAE and CLIP exports (``build_vae_export``, ``build_clip_export``; conftest's
``upstream_runs`` holds one of each), configured by ``stage_config``. Pixel space (8 px, the
identity autoencoder): ``config`` and ``train_stage`` on conftest's ``pixel_shards``, with
pixel-input CLIP exports (``write_pixel_clip``) where text is used."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from stages.clip.export import build_clip_modules, save_clip_export
from stages.clip.model import CLIPModelConfig, ImageTowerConfig, TextEncoderConfig
from stages.clip.tokenizer import train_tokenizer
from stages.common.data import iter_split
from stages.common.stage import RunContext
from stages.common.trainer import train
from stages.unet.model import UNetModelConfig
from stages.unet.samplers import SamplerConfig
from stages.unet.stage import InputsConfig, UNetStage, UNetStageConfig
from stages.vae.export import save_vae_export
from stages.vae.model import AutoencoderKL, VAEModelConfig

# ------------------------------------------------------------------------ latent space


def build_vae_export(
    folder: Path,
    seed: int = 0,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> str:
    """An untrained 16 px VAE export with latent statistics ``mean``/``std`` (0 and 1)."""
    torch.manual_seed(seed)
    cfg = VAEModelConfig(
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        latent_channels=4,
        norm_groups=4,
        mid_attention=False,
    )
    mean = torch.zeros(4) if mean is None else mean
    std = torch.ones(4) if std is None else std
    return save_vae_export(AutoencoderKL(cfg), cfg, folder, mean, std, resolution=16)


def build_clip_export(folder: Path, shards: Path, vae_hash: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    captions = [b for batch in iter_split(shards / "train", 96, 16) for b in batch["caption"]]
    tokenizer = train_tokenizer(captions, vocab_size=300, context_length=12)
    cfg = CLIPModelConfig(
        embed_dim=16,
        text=TextEncoderConfig(context_length=12, width=32, layers=1, heads=2),
        image=ImageTowerConfig(input="latent", patch_size=2, width=32, layers=1, heads=2),
    )
    m = build_clip_modules(cfg, tokenizer.vocab_size, image_channels=4, image_size=8)
    return save_clip_export(
        folder, m["text"], m["image"], m["logit_scale"], tokenizer, vae_hash=vae_hash
    )


def copy_runs(exports: Path, tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    shutil.copytree(exports, runs)
    return runs


TEST_MODEL = UNetModelConfig(
    base_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    head_dim=8,
    ff_mult=2,
    groups=8,
)


def stage_config(shards: Path, **train) -> UNetStageConfig:
    cfg = UNetStageConfig()
    return replace(
        cfg,
        data=replace(cfg.data, path=str(shards), resolution=16, batch_size=8),
        train=replace(cfg.train, trackers=(), log_every=1, **train),
        optim=replace(cfg.optim, lr=1e-3, warmup_steps=2, schedule="constant"),
        ckpt=replace(cfg.ckpt, every_steps=0, every_minutes=0.0),
        model=TEST_MODEL,
        cache=replace(cfg.cache, shard_size=40, batch_size=32),
        sample=SamplerConfig(steps=3, cfg_scale=2.0),
        eval=replace(cfg.eval, num_images=8, grid_rows=2, grid_seeds=2, batch_size=16),
    )


# ------------------------------------------------------------------------- pixel space


RES = 8  # pixel space: the UNet denoises 3 x 8 x 8 images
PRESET = "modes"
KINDS = ("flow", "eps", "v", "vdm")
# (sampler, eta): every sampler, DDIM deterministic and stochastic.
SAMPLER_RUNS = (("euler", 0.0), ("heun", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("ancestral", 0.0))
MODEL = UNetModelConfig(
    base_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    head_dim=8,
    ff_mult=0,
    groups=4,
)
MODEL_TOML = """
[model]
base_channels = 8
channel_mult = [1, 2]
num_res_blocks = 1
attention_resolutions = [4]
head_dim = 8
ff_mult = 0
groups = 4
"""


def write_pixel_clip(folder: Path, shards: Path, image_size: int, seed: int = 0) -> str:
    """An untrained CLIP export whose image tower reads [-1, 1] pixels (no VAE upstream)."""
    torch.manual_seed(seed)
    captions = [c for batch in iter_split(shards / "train", 64, RES) for c in batch["caption"]]
    tokenizer = train_tokenizer(captions, vocab_size=300, context_length=12)
    cfg = CLIPModelConfig(
        embed_dim=16,
        text=TextEncoderConfig(context_length=12, width=32, layers=1, heads=2),
        image=ImageTowerConfig(input="pixel", patch_size=4, width=32, layers=1, heads=2),
    )
    m = build_clip_modules(cfg, tokenizer.vocab_size, image_channels=3, image_size=image_size)
    return save_clip_export(folder, m["text"], m["image"], m["logit_scale"], tokenizer)


def config(
    shards: Path, kind: str = "flow", autoencoder: str = "identity", text: bool = False, **train_kw
) -> UNetStageConfig:
    cfg = UNetStageConfig()
    train_kw = {"max_steps": 2, "val_every": 0, "preview_every": 0, **train_kw}
    return replace(
        cfg,
        data=replace(cfg.data, path=str(shards), resolution=RES, batch_size=8),
        train=replace(cfg.train, trackers=(), log_every=1, **train_kw),
        optim=replace(cfg.optim, lr=1e-3, warmup_steps=0, schedule="constant"),
        ckpt=replace(cfg.ckpt, every_steps=0, every_minutes=0.0),
        model=MODEL,
        inputs=InputsConfig(autoencoder=autoencoder, text=text),  # type: ignore[arg-type]
        objective=replace(cfg.objective, kind=kind),
        sample=SamplerConfig(steps=3, cfg_scale=2.0),
        eval=replace(
            cfg.eval, num_images=8, grid_rows=2, grid_seeds=2, batch_size=16, bpd_images=16
        ),
    )


def train_stage(cfg: UNetStageConfig, runs: Path) -> Path:
    """Train through the shared loop (resuming if the run folder has a checkpoint)."""
    ctx = RunContext(runs, PRESET, "unet")
    assert train(UNetStage(cfg, ctx), ctx) == 0
    return ctx.run_dir


def val_lines(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["split"] == "val"]


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def pixels(generated) -> np.ndarray:
    return np.asarray(generated.image, dtype=np.int16)


def finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)
