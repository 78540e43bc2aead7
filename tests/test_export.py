"""Export folders: atomic, hashed over files and info, refused when edited or mismatched."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stages.common import export as export_module
from stages.common.export import (
    ExportError,
    check_upstream,
    export_hash,
    load_tensors,
    read_config,
    read_export,
    write_export,
)
from stages.common.files import sha256_file, write_json_atomic


@dataclass(frozen=True)
class _Config:
    width: int = 4


def _write(folder, info):
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    return write_export(folder, "vae", weights, _Config(), info=info)


def test_hash_covers_info_and_edited_manifest_is_refused(tmp_path):
    first = _write(tmp_path / "a", {"latent_mean": [0.0]})
    second = _write(tmp_path / "b", {"latent_mean": [0.5]})
    assert first != second  # same weights, other latent statistics: another export
    assert read_export(tmp_path / "a", "vae")["hash"] == first

    path = tmp_path / "a" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["info"]["latent_mean"] = [0.5]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="does not match"):
        read_export(tmp_path / "a", "vae")


class _Crash(Exception):
    pass


@pytest.mark.parametrize("crash", ["weights", "manifest", "swap", "between"])
def test_rewrite_replaces_atomically_and_wrong_stage_is_refused(tmp_path, monkeypatch, crash):
    first = _write(tmp_path / "e", {"x": 1})
    # A crash while the new export is written (half a weights file, the manifest's rename,
    # the old folder's move aside, or between that move and the new folder's rename into
    # place) leaves the old export whole and loadable.
    if crash == "weights":

        def half_written(tensors, path, *args, **kwargs):
            Path(path).write_bytes(b"\0" * 10)
            raise _Crash

        monkeypatch.setattr(export_module, "save_file", half_written)
    else:
        real_replace, calls = os.replace, []

        def replace(src, dst):
            calls.append(src)
            if len(calls) == {"manifest": 1, "swap": 2, "between": 3}[crash]:
                raise _Crash
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(_Crash):
        _write(tmp_path / "e", {"x": 2})
    monkeypatch.undo()
    manifest = read_export(tmp_path / "e", "vae")
    assert manifest["hash"] == first and manifest["info"] == {"x": 1}
    assert torch.equal(load_tensors(tmp_path / "e")["w"], torch.arange(6.0).reshape(2, 3))
    again = _write(tmp_path / "e", {"x": 2})
    assert read_export(tmp_path / "e", "vae")["hash"] == again
    assert not list(tmp_path.glob(".e.*"))  # no temporary folder left behind
    with pytest.raises(ExportError, match="not a clip export"):
        read_export(tmp_path / "e", "clip")


def test_upstream_mismatch_names_both_hashes(tmp_path):
    manifest = {"stage": "unet", "upstream": {"vae": "aaa"}}
    check_upstream(manifest, "vae", "aaa", tmp_path)
    with pytest.raises(ExportError, match="aaa.*bbb"):
        check_upstream(manifest, "vae", "bbb", tmp_path)


# Issue 15, item 12: a manifest is data a stranger may hand us. Names it lists must be plain
# names of regular files inside the folder, every file a loader opens must be listed, and
# the bytes hashed must be the bytes loaded.


@contextlib.contextmanager
def deadline(seconds: float):
    """Turn a hang (hashing /dev/zero for ever) into a failure."""

    def expire(signum, frame):
        raise TimeoutError(f"still reading after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _list(folder, name: str, digest: str) -> None:
    """Forge the manifest as an attacker would: list ``name`` and fix up the export hash."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"][name] = digest
    manifest["hash"] = export_hash(manifest["files"], manifest["info"], manifest["upstream"])
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["../outside.json", "/etc/hostname", "sub/x", ".hidden"])
def test_manifest_names_outside_the_folder_are_refused(tmp_path, name):
    folder = tmp_path / "e"
    _write(folder, {})
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    (folder / "sub").mkdir()
    (folder / "sub" / "x").write_text("{}")
    (folder / ".hidden").write_text("{}")
    target = {"/etc/hostname": Path("/etc/hostname")}.get(name, folder / name)
    _list(folder, name, sha256_file(target) if target.exists() else "0" * 64)
    with pytest.raises(ExportError, match="not a plain file name"):
        read_export(folder, "vae")


@pytest.mark.parametrize("kind", ["symlink", "device", "fifo"])
def test_listed_files_must_be_regular_files_not_links_or_devices(tmp_path, kind):
    folder = tmp_path / "e"
    _write(folder, {})
    weights = folder / "model.safetensors"
    if kind == "symlink":  # the same bytes, elsewhere: the hash alone would pass
        shutil.move(weights, tmp_path / "elsewhere.safetensors")
        weights.symlink_to(tmp_path / "elsewhere.safetensors")
        match = "symbolic link"
    elif kind == "device":
        (folder / "zero").symlink_to("/dev/zero")
        _list(folder, "zero", "0" * 64)
        match = "symbolic link"
    else:
        os.mkfifo(folder / "pipe")
        _list(folder, "pipe", "0" * 64)
        match = "not a regular file"
    with deadline(10), pytest.raises(ExportError, match=match):
        read_export(folder, "vae")
    with deadline(10), pytest.raises(ExportError, match=match):
        read_export(folder, "vae", verify=False)


def test_loaders_open_only_listed_files_and_load_the_bytes_they_hashed(tmp_path):
    folder = tmp_path / "e"
    _write(folder, {})
    manifest = read_export(folder, "vae")
    # The file is swapped after the manifest was verified: the load hashes what it parses.
    other = tmp_path / "o"
    write_export(other, "vae", {"w": torch.ones(2, 3)}, _Config())
    shutil.copyfile(other / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(ExportError, match="does not match its sha256"):
        load_tensors(folder, manifest=manifest)
    # A file the manifest does not list is never opened, whatever its name.
    save_file({"w": torch.zeros(1)}, str(folder / "extra.safetensors"))
    with pytest.raises(ExportError, match="not listed"):
        load_tensors(folder, "extra.safetensors", manifest)
    assert read_config(folder, manifest) == {"width": 4}


def test_atomic_writes_fsync_the_folder_after_the_rename(tmp_path, monkeypatch):
    """Issue 15, item 9: a rename is durable only once its folder is fsynced; without it a
    power cut after "done" can leave the old file, or none, in place."""
    synced: list[tuple[str, int]] = []  # (path fsynced, renames done before)
    renames = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), len(renames)))
        fsync(fd)

    def record_replace(src, dst):
        replace(src, dst)
        renames.append(str(dst))

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert (str(tmp_path), 1) in synced
    synced.clear(), renames.clear()
    _write(tmp_path / "export", {})
    assert (str(tmp_path), len(renames)) in synced and renames[-1] == str(tmp_path / "export")
