"""``python -m stages.vae import-diffusers PATH``: a diffusers AutoencoderKL as a VAE export.

    python -m stages.vae import-diffusers PATH --preset P --data DIR [--runs R] [key=value ...]

PATH is an AutoencoderKL folder (``config.json`` + safetensors) or a pipeline folder with a
``vae/`` in it. Its weights are converted (``stages.vae.interop``; read without diffusers
and never unpickled: pickle-only folders are refused), the per-channel latent statistics
are measured on the preset's training data exactly as the VAE stage measures its own after
training (``stats.batches`` batches, ``stats.seed``), and the export is written where the
stage writes it, ``<runs>/<preset>/vae/export``, with its hash and manifest, recording the
source folder and the sha256 of its weights as ``info.init``. ``make clip`` and
``make unet`` then go on from it as from a trained VAE. The preset's ``model`` section is
replaced by the imported architecture; its data, stats and resolution sections apply.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from stages.common.config import ConfigError, load_config
from stages.common.data import ShardLoader
from stages.common.export import ExportError
from stages.common.interop import read_safetensors_model
from stages.common.run import RunFolderBusy, RunLock
from stages.common.shards import ManifestError
from stages.common.stage import RunContext

from .export import save_vae_export
from .interop import config_from_diffusers, from_diffusers
from .model import AutoencoderKL
from .stage import VAEStageConfig, latent_statistics


def model_folder(path: Path) -> Path:
    """The AutoencoderKL folder: ``path`` itself, or the ``vae/`` of a pipeline folder."""
    path = Path(path)
    if (path / "model_index.json").is_file() and (path / "vae").is_dir():
        return path / "vae"
    return path


def import_vae(source: Path, config: VAEStageConfig, folder: Path, device: torch.device) -> str:
    """Convert ``source``, measure its latent statistics on ``config.data``, write the
    export to ``folder``; returns the export hash."""
    source = model_folder(source)
    diffusers_config, tensors, digest = read_safetensors_model(source)
    model_config = config_from_diffusers(diffusers_config)
    factor = model_config.factor
    if config.data.resolution % factor:
        raise ConfigError(
            f"data.resolution = {config.data.resolution} is not divisible by the imported "
            f"VAE's factor {factor}"
        )
    vae = AutoencoderKL(model_config)
    try:
        vae.load_state_dict(from_diffusers(tensors, model_config), strict=True)
    except (RuntimeError, ValueError) as err:
        raise ExportError(f"{source}: the weights do not fit its config.json: {err}") from err
    vae.to(device).eval()
    loader = ShardLoader.from_config(config.data, "train", seed=config.stats.seed)
    generator = torch.Generator(device=device).manual_seed(config.stats.seed)
    mean, std = latent_statistics(vae, loader, config.stats.batches, generator)
    resolved = replace(config, model=model_config)
    started = {"from": str(source), "hash": digest, "format": "diffusers AutoencoderKL"}
    return save_vae_export(vae, resolved, folder, mean, std, started_from=started)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stages.vae import-diffusers",
        description="Turn a diffusers AutoencoderKL folder into this project's VAE export.",
    )
    parser.add_argument("path", type=Path, help="AutoencoderKL folder (or a pipeline's)")
    parser.add_argument("--preset", default="tiny", help="configs/<preset>/ (default: tiny)")
    parser.add_argument("--data", help="shard folder the statistics are measured on (data.path)")
    parser.add_argument("--runs", default="runs", help="runs root (default: runs)")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="config overrides (TOML values)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 written, 1 an unreadable source, missing data or a busy run folder,
    2 a config error or an architecture the VAE cannot express (the key is named)."""
    # Intermixed: PATH, options and overrides in any order.
    args = build_parser().parse_intermixed_args(argv)
    overrides = ([f"data.path={args.data}"] if args.data else []) + list(args.overrides)
    ctx = RunContext(Path(args.runs), args.preset, "vae")
    try:
        config = load_config(VAEStageConfig, args.preset, "vae", overrides)
        if not config.data.path:
            raise ConfigError("data.path: pass --data <shard folder> to measure the statistics on")
        folder = ctx.export_dir()
        if (folder / "manifest.json").exists() or (ctx.run_dir / "checkpoints").exists():
            raise ExportError(
                f"{ctx.run_dir} already holds a VAE run or export; move it aside first "
                "(the CLIP and UNet runs on it would be retrained)"
            )
        lock = RunLock(ctx.run_dir)
        lock.acquire()
        try:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            digest = import_vae(args.path, config, folder, device)
        finally:
            lock.release()
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (ExportError, ManifestError, RunFolderBusy, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"VAE export written: {folder} (hash {digest[:12]})")
    return 0
