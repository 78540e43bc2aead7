"""The UNet export and its loader: EMA weights, the model config, the upstream hashes.

``<run>/unet/export/manifest.json`` records ``upstream = {"vae": <hash>, "clip": <hash>}``,
the exports the UNet was trained against, and in ``info`` what sampling needs: the model
config, the latent shape (C, h, w), the image resolution and the default sampling settings.
``load_unet`` verifies every file's sha256 and refuses a VAE or CLIP export other than the
recorded ones, naming both hashes; nothing is unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from stages.common.config import ConfigError, from_dict
from stages.common.export import ExportError, check_upstream, load_tensors, read_export

from .flow import SamplingConfig
from .model import UNet, UNetConfig

STAGE = "unet"


@dataclass
class LoadedUNet:
    model: UNet  # eval mode, no gradients
    hash: str
    upstream: dict[str, str]
    latent_shape: tuple[int, int, int]  # (C, h, w) of the normalised latents it denoises
    resolution: int  # image side in pixels after decoding
    sampling: SamplingConfig  # defaults recorded at training time
    info: dict[str, Any]


def load_unet(
    folder: Path,
    vae_hash: str,
    clip_hash: str,
    device: torch.device | str = "cpu",
) -> LoadedUNet:
    """Load a verified UNet export trained against exactly these VAE and CLIP exports."""
    folder = Path(folder)
    manifest = read_export(folder, STAGE, verify=True)
    for name, actual in (("vae", vae_hash), ("clip", clip_hash)):
        # Names the recorded and the given hash; the given export's folder is unknown here.
        check_upstream(manifest, name, actual, Path(f"the {name} export given to load_unet"))
    info = manifest.get("info", {})
    try:
        config = from_dict(UNetConfig, info["model"], prefix="model.")
        sampling = from_dict(SamplingConfig, info["sampling"], prefix="sampling.")
        latent_shape = tuple(int(v) for v in info["latent_shape"])
        resolution = int(info["resolution"])
    except (KeyError, TypeError, ValueError, ConfigError) as err:
        raise ExportError(f"{folder}/manifest.json: malformed UNet info: {err}") from err
    model = UNet(replace(config, gradient_checkpointing=False))
    try:
        model.load_state_dict(load_tensors(folder), strict=True)
    except RuntimeError as err:
        raise ExportError(f"{folder}: weights do not match the recorded model: {err}") from err
    model.requires_grad_(False).eval().to(device)
    return LoadedUNet(
        model=model,
        hash=manifest["hash"],
        upstream=dict(manifest["upstream"]),
        latent_shape=latent_shape,  # type: ignore[arg-type]
        resolution=resolution,
        sampling=sampling,
        info=info,
    )
