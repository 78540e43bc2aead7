"""The VAE export: what the CLIP and UNet stages and the pipeline load.

``save_vae_export`` writes the autoencoder's weights (safetensors), the resolved config and a
manifest whose ``info`` holds the factor, the latent channels, the image resolution, the
model config and the per-channel latent statistics measured on training data. ``load_vae``
verifies every file's sha256 before reading anything and rebuilds the model from the
manifest alone; nothing is unpickled. Latents handed to the UNet are ``(z - mean) / std``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.common.config import ConfigError, from_dict, to_dict
from stages.common.data import DataConfig
from stages.common.export import ExportError, load_tensors, read_export, write_export

from .model import AutoencoderKL, VAEModelConfig

STAGE = "vae"


def _unwrap(model: nn.Module) -> AutoencoderKL:
    """The bare AutoencoderKL inside a DDP / torch.compile wrapper."""
    while not isinstance(model, AutoencoderKL):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"expected an AutoencoderKL, got {type(model).__name__}")
        model = inner
    return model


def _stat_list(values: torch.Tensor, channels: int, name: str) -> list[float]:
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if values.numel() != channels or not torch.isfinite(values).all():
        raise ValueError(f"latent {name} must be {channels} finite values, got {values.tolist()}")
    return values.tolist()


def save_vae_export(
    model: nn.Module,
    config: Any,
    folder: Path,
    mean: torch.Tensor,
    std: torch.Tensor,
    resolution: int | None = None,
    started_from: dict[str, str] | None = None,
) -> str:
    """Write a VAE export of ``model`` (even an untrained one); returns the export hash.

    ``config`` is written as ``config.json`` (the stage's resolved VAEStageConfig, or just a
    VAEModelConfig in tests). ``mean`` / ``std`` are the per-channel latent statistics, (C,).
    ``resolution`` defaults to ``config.data.resolution`` when the config has a data section,
    else to the DataConfig default (32 px). ``started_from``: the export a fine-tuning run
    started from (recorded as ``info["init"]``).
    """
    vae = _unwrap(model)
    channels = vae.config.latent_channels
    std_list = _stat_list(std, channels, "std")
    if min(std_list) <= 0:
        raise ValueError(f"latent std must be positive, got {std_list}")
    if resolution is None:
        data = getattr(config, "data", None)
        resolution = data.resolution if data is not None else DataConfig().resolution
    info = {
        "factor": vae.factor,
        "channels": channels,
        "resolution": int(resolution),
        "latent_mean": _stat_list(mean, channels, "mean"),
        "latent_std": std_list,
        "model": to_dict(vae.config),
    }
    if started_from is not None:
        info["init"] = dict(started_from)
    return write_export(Path(folder), STAGE, vae.plain_state_dict(), config, info=info)


@dataclass
class LoadedVAE:
    """A frozen VAE from an export, with its latent statistics (see interfaces.md)."""

    model: AutoencoderKL
    hash: str
    factor: int
    channels: int
    resolution: int
    mean: torch.Tensor  # (C,) per-channel mean of the posterior means on training data
    std: torch.Tensor  # (C,) per-channel std of sampled latents on training data

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B,3,H,W) in [-1,1] -> raw posterior (mean, std), each (B,C,H/f,W/f)."""
        posterior = self.model.encode(images.to(self.device, self._dtype()))
        return posterior.mean.float(), posterior.std.float()

    @torch.no_grad()
    def decode(self, z_raw: torch.Tensor) -> torch.Tensor:
        """Raw latents (B,C,h,w) -> images (B,3,h*f,w*f), nominally in [-1,1] (not clamped)."""
        return self.model.decode(z_raw.to(self.device, self._dtype())).float()

    def normalize(self, z_raw: torch.Tensor) -> torch.Tensor:
        return (z_raw - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def denormalize(self, z_norm: torch.Tensor) -> torch.Tensor:
        return z_norm * self.std.view(1, -1, 1, 1) + self.mean.view(1, -1, 1, 1)


def load_vae(folder: Path, device: str | torch.device = "cpu") -> LoadedVAE:
    """Load and verify a VAE export; a corrupt or mismatched folder raises ExportError."""
    folder = Path(folder)
    manifest = read_export(folder, STAGE, verify=True)
    info = manifest.get("info", {})
    try:
        model_config = from_dict(VAEModelConfig, info["model"], prefix="model.")
        mean = torch.tensor(info["latent_mean"], dtype=torch.float32)
        std = torch.tensor(info["latent_std"], dtype=torch.float32)
        factor, channels, resolution = info["factor"], info["channels"], info["resolution"]
    except (KeyError, TypeError, ConfigError) as err:
        raise ExportError(f"{folder}/manifest.json: malformed VAE info: {err}") from err
    model = AutoencoderKL(model_config)
    try:
        model.load_state_dict(load_tensors(folder, manifest=manifest), strict=True)
    except RuntimeError as err:
        raise ExportError(f"{folder}: weights do not match the recorded model: {err}") from err
    if factor != model.factor or channels != model_config.latent_channels:
        raise ExportError(f"{folder}/manifest.json: factor/channels disagree with the model")
    if mean.numel() != channels or std.numel() != channels:
        raise ExportError(f"{folder}/manifest.json: latent statistics are not {channels} values")
    model.requires_grad_(False).eval().to(device)
    return LoadedVAE(
        model=model,
        hash=manifest["hash"],
        factor=int(factor),
        channels=int(channels),
        resolution=int(resolution),
        mean=mean.to(device),
        std=std.to(device),
    )


class IdentityAutoencoder:
    """Pixel space: the "autoencoder" of a UNet trained on images directly.

    Same interface as ``LoadedVAE``: factor 1, 3 channels, no latent statistics (images in
    [-1, 1] are the model's data), encode gives the images with zero posterior std.
    """

    hash = "identity"
    factor = 1
    channels = 3

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, torch.float32)
        return images, torch.zeros_like(images)

    def decode(self, z_raw: torch.Tensor) -> torch.Tensor:
        return z_raw.to(self.device, torch.float32)

    def normalize(self, z_raw: torch.Tensor) -> torch.Tensor:
        return z_raw

    def denormalize(self, z_norm: torch.Tensor) -> torch.Tensor:
        return z_norm
