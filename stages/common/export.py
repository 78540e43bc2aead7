"""Export folders: what one stage hands to the next and to the pipeline.

``<run>/export/`` holds ``model.safetensors`` (EMA weights where the stage has EMA),
``config.json`` (the resolved config), any extra files of the stage (``tokenizer.json``,
``null_condition.safetensors``) and ``manifest.json``, written last: the stage name, the
sha256 of every file, what the next stage needs, and the hashes of the upstream exports
it was trained against. The folder is built under a temporary name and renamed into
place, so a half-written export never exists. Nothing here unpickles. Readers open only
the files the manifest lists, by plain names of regular files in the folder (no path,
symlink or device), and parse the very bytes they hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from .config import to_dict
from .files import (
    UnsafeFile,
    check_member,
    disk_full,
    fsync_path,
    open_member,
    read_member,
    sha256_file,
    write_json_atomic,
)

EXPORT_FORMAT = "minisd-export/1"
WEIGHTS = "model.safetensors"
# Formats that unpickle on load (torch.save, pickle, joblib): never opened, only refused.
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle", ".joblib"})


class ExportError(ValueError):
    """An export folder is missing, incomplete, corrupt, of the wrong stage or mismatched."""


def export_hash(
    files: Mapping[str, str], info: Mapping[str, Any], upstream: Mapping[str, str]
) -> str:
    """The identity of an export: every file's sha256 plus what it tells the next stage.

    Latent statistics live in ``info``, so a VAE export whose weights stayed but whose
    statistics changed is a different export to the UNet trained on it.
    """
    payload = json.dumps(
        {"files": dict(files), "info": dict(info), "upstream": dict(upstream)}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def write_export(
    folder: Path,
    stage: str,
    weights: Mapping[str, torch.Tensor],
    config: Any,
    info: Mapping[str, Any] | None = None,
    upstream: Mapping[str, str] | None = None,
    extra_files: Mapping[str, Path] | None = None,
    extra_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> str:
    """Write an export atomically; returns its hash (see ``export_hash``).

    ``info`` is what the next stage needs (latent statistics, widths, ...); ``upstream``
    maps upstream stage names to their export hashes; ``extra_files`` are copied in and
    ``extra_tensors`` saved as ``<name>`` safetensors files.
    """
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    try:
        return _write_export(
            folder, tmp, stage, weights, config, info, upstream, extra_files, extra_tensors
        )
    except OSError as err:
        # A full disk or quota: the partial folder goes, the previous export stays in place.
        shutil.rmtree(tmp, ignore_errors=True)
        needed = sum(t.numel() * t.element_size() for t in weights.values())
        needed += sum(Path(p).stat().st_size for p in (extra_files or {}).values())
        needed += sum(
            t.numel() * t.element_size() for g in (extra_tensors or {}).values() for t in g.values()
        )
        full = disk_full(err, f"the {stage} export", folder, needed)
        if full is None:
            raise
        raise full from err


def _write_export(
    folder: Path,
    tmp: Path,
    stage: str,
    weights: Mapping[str, torch.Tensor],
    config: Any,
    info: Mapping[str, Any] | None,
    upstream: Mapping[str, str] | None,
    extra_files: Mapping[str, Path] | None,
    extra_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None,
) -> str:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    save_file(tensors, str(tmp / WEIGHTS))
    (tmp / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, tmp / name)
    for name, group in (extra_tensors or {}).items():
        save_file({k: v.detach().cpu().contiguous() for k, v in group.items()}, str(tmp / name))
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
    for path in tmp.iterdir():
        fsync_path(path)
    info, upstream = dict(info or {}), dict(upstream or {})
    manifest = {
        "format": EXPORT_FORMAT,
        "stage": stage,
        "hash": export_hash(files, info, upstream),
        "files": files,
        "info": info,
        "upstream": upstream,
    }
    write_json_atomic(tmp / "manifest.json", manifest)  # also fsyncs tmp's entries
    restore_interrupted(folder)  # an earlier replacement that stopped half-way
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        fsync_path(folder.parent)  # the new folder is in place before the old one goes
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    fsync_path(folder.parent)
    return manifest["hash"]


def restore_interrupted(folder: Path) -> None:
    """Put back an export whose replacement stopped between ``write_export``'s two renames
    (the old folder moved aside to ``.<name>.old``, the new one not yet in place)."""
    folder = Path(folder)
    old = folder.with_name(f".{folder.name}.old")
    if not folder.exists() and (old / "manifest.json").exists():
        os.replace(old, folder)
        fsync_path(folder.parent)


def read_export(folder: Path, stage: str, verify: bool = True) -> dict[str, Any]:
    """Read and check an export's manifest (stage, and every file's sha256 if ``verify``)."""
    folder = Path(folder)
    restore_interrupted(folder)
    path = folder / "manifest.json"
    if not path.exists():
        raise ExportError(
            f"{folder} is not a {stage} export (no manifest.json): train it with `make {stage}`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{path} is not valid JSON: {err}") from err
    if manifest.get("format") != EXPORT_FORMAT or manifest.get("stage") != stage:
        raise ExportError(
            f"{folder} is not a {stage} export (format {manifest.get('format')!r}, "
            f"stage {manifest.get('stage')!r})"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ExportError(f"{path} lists no files")
    for name, digest in files.items():
        try:
            if verify:
                check_member(folder, name, digest)
            else:
                open_member(folder, name).close()
        except FileNotFoundError:
            raise ExportError(f"{folder}: {name} is missing") from None
        except UnsafeFile as err:
            raise ExportError(f"{err} (corrupt or tampered-with export)") from err
    if verify:
        expected = export_hash(files, manifest["info"], manifest["upstream"])
        if manifest.get("hash") != expected:
            raise ExportError(f"{path}: its hash does not match its contents (edited manifest)")
    return manifest


def read_file(folder: Path, name: str, manifest: Mapping[str, Any] | None = None) -> bytes:
    """The bytes of a file the export's manifest lists, checked against its sha256 as read
    (the bytes hashed are the bytes used). ``manifest`` defaults to the folder's own."""
    folder = Path(folder)
    if manifest is None:
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, ValueError) as err:
            raise ExportError(f"{folder}: no readable manifest.json ({err})") from err
    try:
        return read_member(folder, manifest.get("files"), name)
    except FileNotFoundError:
        raise ExportError(f"{folder}: {name} is missing") from None
    except UnsafeFile as err:
        raise ExportError(f"{err} (corrupt or tampered-with export)") from err


def load_tensors(
    folder: Path, name: str = WEIGHTS, manifest: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """Load a listed, verified safetensors file of an export; anything else is refused,
    never unpickled."""
    data = read_file(folder, name, manifest)
    try:
        return load(data)
    except (SafetensorError, ValueError) as err:
        raise ExportError(
            f"{Path(folder) / name} is not a readable safetensors file: {err}"
        ) from err


def read_config(folder: Path, manifest: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return json.loads(read_file(folder, "config.json", manifest))


def check_upstream(manifest: Mapping[str, Any], name: str, actual_hash: str, folder: Path) -> None:
    """Refuse a downstream export trained against a different upstream export."""
    recorded = manifest.get("upstream", {}).get(name)
    if recorded != actual_hash:
        raise ExportError(
            f"{manifest.get('stage')} export was trained against {name} export {recorded}, "
            f"but {folder} holds {name} export {actual_hash}: retrain with "
            f"`make {manifest.get('stage')}` or point at the matching {name} export"
        )
