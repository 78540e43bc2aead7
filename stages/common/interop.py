"""What every exchange with diffusers / transformers shares: the lazy import and the reader.

diffusers and transformers are the optional ``interop`` extra: nothing imports them at module
level, so the project imports and trains without them, and ``require`` names the extra to
install when a command needs one. ``read_safetensors_model`` reads a diffusers or
transformers model folder (``config.json`` + safetensors, single or sharded) without
either library and without unpickling: a folder that holds only pickle-format weights
(``.bin``, ``.ckpt``, ...) is refused, naming the file.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from .export import PICKLE_SUFFIXES, ExportError
from .files import UnsafeFile, open_regular

EXTRA = "interop"
INSTALL = f"pip install -e '.[{EXTRA}]'"


class MissingExtra(ImportError):
    """An interop command ran without the optional ``interop`` extra installed."""


def require(module: str, what: str) -> ModuleType:
    """Import ``module`` (diffusers, transformers) or say which extra ``what`` needs."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtra(
            f"{what} needs {module.split('.')[0]}, from the optional '{EXTRA}' extra: "
            f"{INSTALL} (or `make setup`, which installs it)"
        ) from err


def _read_regular(path: Path) -> bytes:
    try:
        with open_regular(path) as f:
            return f.read()
    except UnsafeFile as err:
        raise ExportError(f"{err} (model folders hold regular files only)") from err


def _weight_files(folder: Path, stem: str) -> list[Path]:
    """The safetensors files of ``folder``'s model ``stem`` (one, or the shards an index
    lists); pickles are refused by name."""
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(_read_regular(index))["weight_map"].values()))
        except (KeyError, TypeError, ValueError) as err:
            raise ExportError(f"{index} is not a safetensors index: {err}") from err
        if any(Path(name).name != name for name in shards):
            raise ExportError(f"{index} names files outside its folder")
        return [folder / name for name in shards]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ExportError(
            f"{folder} holds its weights as {pickles[0]}, a pickle-format file; refusing to load "
            "it (nothing is unpickled here): save the model with safetensors "
            "(`save_pretrained(..., safe_serialization=True)`, diffusers' default) and retry"
        )
    raise ExportError(f"{folder} has no {stem}.safetensors (nor a sharded index of it)")


def read_safetensors_model(
    folder: Path, stem: str = "diffusion_pytorch_model"
) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(config.json, float32 tensors by name, sha256 of the weight files) of a model folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder (a diffusers model folder is expected)")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{folder} has no config.json: not a diffusers model folder")
    try:
        config = json.loads(_read_regular(config_path))
    except ValueError as err:
        raise ExportError(f"{config_path} is not valid JSON: {err}") from err
    tensors: dict[str, torch.Tensor] = {}
    digest = hashlib.sha256()
    for path in _weight_files(folder, stem):
        data = _read_regular(path)
        digest.update(data)
        try:
            part = load(data)  # parses the very bytes hashed; safetensors never unpickles
        except SafetensorError as err:
            raise ExportError(f"{path} is not a safetensors file: {err}") from err
        tensors.update({k: v.float() for k, v in part.items()})
    return config, tensors, digest.hexdigest()
