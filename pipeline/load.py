"""Load the three exports (VAE, CLIP, UNet) the pipeline needs, refusing anything unsafe.

An export is safetensors + JSON only. Before any loader touches a folder, every file in it
is screened: a pickle-format file (``.pt``, ``.ckpt``, ``.bin``, ...) or a ``.safetensors``
file whose first bytes are not a safetensors header (a pickle renamed, a torch zip archive)
is refused with an ``ExportError`` naming the file, and nothing is ever unpickled. Then the
UNet's recorded upstream hashes are compared with the VAE and CLIP exports actually given (a
mismatch names both hashes and the folder), and the stage loaders verify every file's sha256
before reading it. A pixel-space UNet (``inputs.autoencoder = "identity"``) needs no VAE
export and an unconditional one no CLIP export: the UNet's manifest says which it needs.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.clip.export import LoadedCLIP, load_clip
from stages.common.export import PICKLE_SUFFIXES, ExportError, check_upstream, read_export
from stages.common.files import UnsafeFile, open_regular
from stages.unet.export import InputsConfig, LoadedUNet, load_unet
from stages.vae.export import IdentityAutoencoder, LoadedVAE, load_vae

STAGES = ("vae", "clip", "unet")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors caps its JSON header at 100 MB


@dataclass(frozen=True)
class ExportFolders:
    """Where the three exports live."""

    vae: Path
    clip: Path
    unet: Path

    @classmethod
    def from_runs(cls, runs: Path, preset: str) -> ExportFolders:
        """``runs/<preset>/{vae,clip,unet}/export`` as written by ``make vae|clip|unet``."""
        root = Path(runs) / preset
        return cls(*(root / stage / "export" for stage in STAGES))

    def items(self) -> list[tuple[str, Path]]:
        return [(stage, Path(getattr(self, stage))) for stage in STAGES]


@dataclass(frozen=True)
class Models:
    vae: LoadedVAE | IdentityAutoencoder  # identity: a pixel-space UNet
    clip: LoadedCLIP | None  # None: an unconditional UNet
    unet: LoadedUNet

    @property
    def hashes(self) -> dict[str, str]:
        clip = self.clip.hash if self.clip is not None else "none"
        return {"vae": self.vae.hash, "clip": clip, "unet": self.unet.hash}


def _describe_magic(head: bytes) -> str:
    if head[:1] == b"\x80":
        return "it starts like a Python pickle"
    if head[:4] == b"PK\x03\x04":
        return "it is a zip archive, as torch.save writes"
    return f"its first bytes are {head[:8]!r}"


def check_safetensors_header(path: Path) -> None:
    """Refuse a file that does not start with a safetensors header (u64 length + JSON)."""
    try:
        with open_regular(path) as f:  # never through a symlink, nor blocking on a FIFO
            size = os.fstat(f.fileno()).st_size
            head = f.read(9)
    except UnsafeFile as err:
        raise ExportError(f"{err} (exports hold regular files only)") from err
    if len(head) == 9:
        (length,) = struct.unpack("<Q", head[:8])
        if 2 <= length <= min(_MAX_HEADER, size - 8) and head[8:9] == b"{":
            return
    raise ExportError(
        f"{path} is not a safetensors file ({_describe_magic(head)}); refusing to load it: "
        "exports are safetensors + JSON only and nothing is unpickled"
    )


def screen_export_folder(folder: Path, stage: str) -> None:
    """Refuse a missing folder, pickle-format files and fake safetensors before loading."""
    folder = Path(folder)
    if folder.is_file():
        kind = "a pickle-format file" if folder.suffix.lower() in PICKLE_SUFFIXES else "a file"
        raise ExportError(
            f"{folder} is {kind}, not a {stage} export folder; refusing to load it "
            "(exports are folders of safetensors + JSON; nothing is unpickled)"
        )
    if not folder.is_dir():
        raise ExportError(
            f"no {stage} export at {folder}: train it with `make {stage}` "
            f"(or point --{stage} at an export folder)"
        )
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ExportError(
                f"{path} is a pickle-format file in the {stage} export; refusing to load it "
                "(exports are safetensors + JSON only; nothing is unpickled): remove it"
            )
        if path.suffix.lower() == ".safetensors":
            check_safetensors_header(path)


def read_manifests(folders: ExportFolders, verify: bool = False) -> dict[str, dict[str, Any]]:
    """Screen and read the UNet's manifest and those of the exports it needs; check its
    upstream hashes.

    Hashing the weights is left to the stage loaders (each verifies every file's sha256
    before reading it), so big exports are hashed once.
    """
    screen_export_folder(folders.unet, "unet")
    manifests = {"unet": read_export(folders.unet, "unet", verify=verify)}
    for stage in InputsConfig.recorded(manifests["unet"].get("info", {})).upstream:
        folder = getattr(folders, stage)
        screen_export_folder(folder, stage)
        manifests[stage] = read_export(folder, stage, verify=verify)
        check_upstream(manifests["unet"], stage, manifests[stage]["hash"], folder)
    return manifests


def load_models(folders: ExportFolders, device: torch.device | str = "cpu") -> Models:
    """Screen, verify and load the exports the UNet needs onto ``device``."""
    manifests = read_manifests(folders)
    device = torch.device(device)
    vae = load_vae(folders.vae, device=device) if "vae" in manifests else None
    clip = load_clip(folders.clip, device=device) if "clip" in manifests else None
    unet = load_unet(
        folders.unet,
        vae_hash=vae.hash if vae is not None else None,
        clip_hash=clip.hash if clip is not None else None,
        device=device,
    )
    autoencoder = vae if vae is not None else IdentityAutoencoder(device)
    channels, side, _ = unet.latent_shape
    if channels != autoencoder.channels or side * autoencoder.factor != unet.resolution:
        raise ExportError(
            f"{folders.unet} denoises latents {unet.latent_shape} for {unet.resolution} px "
            f"images, which the VAE export at {folders.vae} (factor {autoencoder.factor}, "
            f"{autoencoder.channels} channels) does not decode"
        )
    return Models(vae=autoencoder, clip=clip, unet=unet)
