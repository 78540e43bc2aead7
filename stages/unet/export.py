"""The UNet export and its loader: EMA weights, the model config, the upstream hashes.

``<run>/unet/export/manifest.json`` records ``upstream = {"vae": <hash>, "clip": <hash>}``,
the exports the UNet was trained against (a pixel-space run has no "vae", an unconditional
one no "clip"), and in ``info`` what sampling needs: the model config, the inputs, the
objective (whose learned schedule, for VDM, is stored as ``schedule.*`` tensors), the latent
shape (C, h, w), the image resolution and the default sampling settings. ``load_unet``
verifies every file's sha256 and refuses a VAE or CLIP export other than the recorded
ones, naming both hashes; nothing is unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from stages.common.config import ConfigError, from_dict
from stages.common.export import ExportError, check_upstream, load_tensors, read_export

from .model import UNet, UNetModelConfig
from .objectives import Objective, ObjectiveConfig, make_objective
from .samplers import SamplerConfig

STAGE = "unet"


@dataclass(frozen=True)
class InputsConfig:
    """What the UNet denoises and what it is conditioned on (recorded in the export)."""

    autoencoder: Literal["vae", "identity"] = "vae"  # identity: pixel space, no VAE export
    text: bool = True  # false: unconditional, no CLIP export

    @property
    def upstream(self) -> tuple[str, ...]:
        """The exports a UNet with these inputs is trained against and loaded with."""
        return ("vae",) * (self.autoencoder == "vae") + ("clip",) * self.text

    @classmethod
    def recorded(cls, info: dict[str, Any]) -> InputsConfig:
        """From an export's ``info`` (exports written before pixel space: latent + text)."""
        return from_dict(cls, info.get("inputs", {}), prefix="inputs.")


@dataclass
class LoadedUNet:
    model: UNet  # eval mode, no gradients
    hash: str
    upstream: dict[str, str]
    latent_shape: tuple[int, int, int]  # (C, h, w) of the normalised latents it denoises
    resolution: int  # image side in pixels after decoding
    sampling: SamplerConfig  # defaults recorded at training time
    info: dict[str, Any]
    objective: Objective  # turns the network into a flow velocity; holds the schedule
    inputs: InputsConfig

    @property
    def autoencoder(self) -> str:
        return self.inputs.autoencoder  # "identity": pixel space

    @property
    def conditional(self) -> bool:
        return self.inputs.text  # False: no text encoder

    def velocity(self, clip_x0: bool | None = None):
        """The network as a flow velocity ``(y, tau, cond) -> v``."""
        clip = self.sampling.clip_x0 if clip_x0 is None else clip_x0
        return self.objective.velocity(self.model, clip_x0=clip)


def load_unet(
    folder: Path,
    vae_hash: str | None,
    clip_hash: str | None,
    device: torch.device | str = "cpu",
) -> LoadedUNet:
    """Load a verified UNet export trained against exactly these VAE and CLIP exports
    (None where the export needs none: pixel space, unconditional)."""
    folder = Path(folder)
    manifest = read_export(folder, STAGE, verify=True)
    info = manifest.get("info", {})
    try:
        inputs = InputsConfig.recorded(info)
        config = from_dict(UNetModelConfig, info["model"], prefix="model.")
        sampling = from_dict(SamplerConfig, info["sampling"], prefix="sampling.")
        objective_cfg = from_dict(ObjectiveConfig, info.get("objective", {}), prefix="objective.")
        latent_shape = tuple(int(v) for v in info["latent_shape"])
        resolution = int(info["resolution"])
    except (KeyError, TypeError, ValueError, ConfigError) as err:
        raise ExportError(f"{folder}/manifest.json: malformed UNet info: {err}") from err
    for name, actual in (("vae", vae_hash), ("clip", clip_hash)):
        if name in inputs.upstream:
            # Names the recorded and the given hash; the given export's folder is unknown here.
            check_upstream(manifest, name, actual, Path(f"the {name} export given to load_unet"))
    model = UNet(replace(config, gradient_checkpointing=False))
    objective = make_objective(objective_cfg)
    tensors = load_tensors(folder, manifest=manifest)
    try:
        model.load_state_dict(
            {k: v for k, v in tensors.items() if not k.startswith("schedule.")}, strict=True
        )
        if objective.learned_schedule is not None:
            prefix = "schedule."
            objective.learned_schedule.load_state_dict(
                {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)},
                strict=True,
            )
            objective.learned_schedule.requires_grad_(False).eval().to(device)
    except RuntimeError as err:
        raise ExportError(f"{folder}: weights do not match the recorded model: {err}") from err
    model.requires_grad_(False).eval().place(device)
    return LoadedUNet(
        model=model,
        hash=manifest["hash"],
        upstream=dict(manifest["upstream"]),
        latent_shape=latent_shape,  # type: ignore[arg-type]
        resolution=resolution,
        sampling=sampling,
        info=info,
        objective=objective,
        inputs=inputs,
    )
