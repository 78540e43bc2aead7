"""Tiny real VAE, CLIP and UNet exports for the pipeline tests, built by the stages' own
export code from untrained models (16 px images, 8x8x4 latents), laid out like a run
folder: ``<root>/runs/tiny/{vae,clip,unet}/export``.

The UNet zero-initialises its output convolution and its cross-attention output projections
(an untrained UNet predicts v = 0 and ignores the text), so those are re-drawn here: the tests
need a velocity that depends on the text, or CFG and negative prompts change nothing.
Built once per test session (conftest's ``tiny_exports``); tests must not modify the
folders (``copy_exports`` gives a test its own copy).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch

from pipeline.load import ExportFolders
from stages.clip.export import save_clip_export
from stages.clip.loss import LogitScale
from stages.clip.model import ImageTower, ImageTowerConfig, TextEncoder, TextEncoderConfig
from stages.clip.tokenizer import train_tokenizer
from stages.common.data import DataConfig
from stages.common.stage import RunContext
from stages.unet.model import UNet, UNetModelConfig
from stages.unet.stage import UNetStage, UNetStageConfig
from stages.vae.export import save_vae_export
from stages.vae.model import AutoencoderKL, VAEModelConfig

RESOLUTION = 16
PRESET = "tiny"
CAPTIONS = [
    f"{colour} {shape}; flat colour emoji"
    for colour in ("red", "green", "blue", "yellow", "black")
    for shape in ("apple", "heart", "circle", "square", "face")
]

VAE_CONFIG = VAEModelConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4)


def write_vae_export(folder: Path) -> str:
    """An untrained 16 px VAE export (factor 2, 4 channels) from torch's current RNG state."""
    vae = AutoencoderKL(VAE_CONFIG)
    return save_vae_export(
        vae,
        VAE_CONFIG,
        folder,
        mean=torch.tensor([0.1, -0.1, 0.0, 0.2]),
        std=torch.tensor([0.5, 0.8, 1.0, 1.2]),
        resolution=RESOLUTION,
    )


def _transformers(unet: UNet) -> list[torch.nn.Module]:
    return [m for m in unet.modules() if hasattr(m, "proj_out")]


def build_exports(root: Path, seed: int = 0) -> ExportFolders:
    """Write the three exports under ``root/runs/tiny`` and return their folders."""
    torch.manual_seed(seed)
    runs = Path(root) / "runs"
    folders = ExportFolders.from_runs(runs, PRESET)

    vae_hash = write_vae_export(folders.vae)

    latent_side = RESOLUTION // VAE_CONFIG.factor
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=300, context_length=16, min_frequency=1)
    text = TextEncoder(
        TextEncoderConfig(context_length=16, width=32, layers=1, heads=2),
        tokenizer.vocab_size,
        embed_dim=32,
    )
    image = ImageTower(
        ImageTowerConfig(input="latent", patch_size=2, width=32, layers=1, heads=2),
        in_channels=VAE_CONFIG.latent_channels,
        size=latent_side,
        embed_dim=32,
    )
    save_clip_export(folders.clip, text, image, LogitScale(), tokenizer, vae_hash=vae_hash)

    config = UNetStageConfig(
        data=DataConfig(path=str(root / "no-data"), resolution=RESOLUTION),
        model=UNetModelConfig(
            base_channels=16,
            channel_mult=(1, 2),
            attention_resolutions=(8, 4),
            head_dim=8,
            groups=4,  # 4 channels per group: GroupNorm keeps the per-channel time embedding
        ),
    )
    stage = UNetStage(config, RunContext(runs_root=runs, preset=PRESET, stage="unet"))
    unet = UNet(stage.config.model)
    with torch.no_grad():
        for weight in (unet.conv_out.weight, *(m.proj_out.weight for m in _transformers(unet))):
            torch.nn.init.normal_(weight, std=0.1)
    stage.export({"unet": unet}, folders.unet)
    return folders


@contextlib.contextmanager
def one_torch_thread():
    """Run tiny models on one intra-op thread (restored afterwards): they gain nothing from
    more, and on a busy shared CPU OpenMP's spinning threads make every op wait a time slice
    (measured here: 6 s instead of 2 ms per forward of the tiny UNet)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def copy_exports(source: ExportFolders, root: Path) -> ExportFolders:
    """A private copy a test may tamper with."""
    target = ExportFolders.from_runs(Path(root) / "runs", PRESET)
    for stage, folder in source.items():
        shutil.copytree(folder, getattr(target, stage))
    return target
