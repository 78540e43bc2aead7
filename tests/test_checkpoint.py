"""Checkpoint folders: lossless trees, atomic commits, verification, rotation, the mirror."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from stages.common import checkpoint as ckpt_mod
from stages.common.checkpoint import (
    CheckpointError,
    CheckpointManager,
    join_tree,
    keep_set,
    split_tree,
    verify,
)
from stages.common.files import DiskFull


def tree_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(tree_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(tree_equal, a, b))
    return a == b and type(a) is type(b)


def state(step: int) -> dict:
    """Shared trees shaped like the trainer's (optimizer-style int keys, tuples, scalars)."""
    g = torch.Generator().manual_seed(step)
    return {
        "model.net": {"w": torch.randn(4, 3, generator=g), "b": torch.zeros(3)},
        "optimizer": {
            "state": {
                0: {"step": torch.tensor(float(step)), "exp_avg": torch.randn(4, 3, generator=g)}
            },
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "name": "decay"}],
        },
        "trainer": {"step": step, "best": None},
    }


def save(manager: CheckpointManager, step: int, final: bool = False, best_step: int | None = None):
    best = {"metric": "mse", "mode": "min", "value": 0.5, "step": best_step} if best_step else None
    info = {"batches_seen": step, "world_size": 1, "final": final, "best": best}
    path = manager.save(step, state(step), {"rank0": {"data": {"index": step}}}, info)
    manager.wait()  # the mirror copy runs on a thread
    return path


def test_tree_round_trip_keeps_types_tuples_int_keys_and_shared_tensors():
    shared = torch.arange(6.0).reshape(2, 3)
    tree = {
        "a": shared,
        "b": shared,  # tied weights: stored twice, no shared-storage error
        "nested": {1: (torch.tensor(3.5), "x", None, True, 2.5e-300, float("inf"))},
        "list": [torch.zeros(0, dtype=torch.int64), {"__tensor__": "not a marker"}],
        "bits": torch.tensor([1, 255], dtype=torch.uint8),
    }
    skeleton, tensors = split_tree(tree)
    json_round_trip = json.loads(json.dumps(skeleton))
    assert tree_equal(join_tree(json_round_trip, tensors), tree)
    with pytest.raises(TypeError, match="'x.y'"):
        split_tree({"x": {"y": object()}})


def test_save_writes_a_verified_manifest_last_and_reads_back(tmp_path):
    manager = CheckpointManager(tmp_path / "ck")
    path = save(manager, 3)
    assert path.name == "step_0000003"
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in path.iterdir()} - {"manifest.json"}
    loaded = verify(path)
    for stem, tree in state(3).items():
        assert tree_equal(loaded.read(stem), tree)
    assert loaded.read("rank0") == {"data": {"index": 3}}
    assert not list((tmp_path / "ck").glob(".*"))  # no temporary folder left


@pytest.mark.parametrize("damage", ["truncate", "no_manifest", "bad_manifest", "flip_byte"])
def test_unusable_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog, damage):
    manager = CheckpointManager(tmp_path / "ck", keep_last=3)
    save(manager, 2)
    newest = save(manager, 4)
    weights = newest / "model.net.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-7])
    elif damage == "no_manifest":
        (newest / "manifest.json").unlink()
    elif damage == "bad_manifest":
        (newest / "manifest.json").write_text('{"format": "minisd-checkpoint/1", "step"')
    else:
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        found = manager.latest()
    assert found is not None and found.manifest["step"] == 2
    assert "skipping unusable checkpoint" in caplog.text and "step_0000004" in caplog.text


def test_a_corrupt_newest_checkpoint_is_set_aside_and_never_counted_by_rotation(tmp_path, caplog):
    """Issue 15, item 2: with keep_last=1, a corrupt newest checkpoint used to stay "the
    newest" for rotation, which deleted every fresh save right after its commit."""
    save(CheckpointManager(tmp_path / "ck", keep_last=3), 2)
    newest = save(CheckpointManager(tmp_path / "ck", keep_last=3), 4, best_step=4)
    weights = newest / "model.net.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    manager = CheckpointManager(tmp_path / "ck", keep_last=1)
    with caplog.at_level(logging.WARNING):
        assert manager.latest().manifest["step"] == 2  # the run resumes from step 2 ...
    save(manager, 3)  # ... and saves step 3, which must survive its own rotation
    assert manager.latest().manifest["step"] == 3
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["step_0000003", "step_0000004.corrupt"]
    assert "set the unusable checkpoint aside" in caplog.text


def test_a_corrupt_checkpoint_that_cannot_be_set_aside_never_costs_the_fresh_save(
    tmp_path, monkeypatch, caplog
):
    """Issue 27, item 7: when the corrupt newest checkpoint could not be renamed aside (a
    read-only folder, permissions), rotation still counted it as the newest and, with
    keep_last=1, deleted the fresh save right after its commit."""
    save(CheckpointManager(tmp_path / "ck", keep_last=3), 2)
    newest = save(CheckpointManager(tmp_path / "ck", keep_last=3), 4, best_step=4)
    weights = newest / "model.net.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    real_replace = ckpt_mod.os.replace

    def no_set_aside(src, dst):  # the folder refuses that rename (root ignores chmod)
        if ".corrupt" in str(dst):
            raise PermissionError(13, "Permission denied", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", no_set_aside)
    manager = CheckpointManager(tmp_path / "ck", keep_last=1)
    with caplog.at_level(logging.WARNING):
        assert manager.latest().manifest["step"] == 2
    assert "could not set" in caplog.text
    save(manager, 3)  # the fresh save survives its own rotation ...
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_0000003", "step_0000004"]
    save(manager, 5)  # ... and the next one rotates it, leaving the corrupt one for a look
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_0000004", "step_0000005"]
    assert verify(tmp_path / "ck" / "step_0000005").manifest["step"] == 5


def test_no_checkpoint_is_set_aside_when_none_is_usable(tmp_path):
    manager = CheckpointManager(tmp_path / "ck")
    path = save(manager, 2)
    (path / "optimizer.safetensors").write_bytes(b"garbage")
    for _ in range(2):  # a re-run still refuses: it never starts over on its own
        with pytest.raises(CheckpointError, match="no usable checkpoint"):
            manager.latest()
    assert path.exists()


@pytest.mark.parametrize("name", ["../step_0000002/trainer.json", "/etc/hostname", "link"])
def test_checkpoint_manifest_names_must_be_plain_regular_files(tmp_path, caplog, name):
    """Issue 15, item 12: a listed name outside the folder, or a symlink, is unusable."""
    manager = CheckpointManager(tmp_path / "ck", keep_last=3)
    save(manager, 2)
    newest = save(manager, 4)
    if name == "link":  # the same bytes through a symlink: the hash alone would pass
        shutil.move(newest / "trainer.json", tmp_path / "trainer.json")
        (newest / "trainer.json").symlink_to(tmp_path / "trainer.json")
        digest = ckpt_mod.sha256_file(tmp_path / "trainer.json")
        name = "trainer.json"
    else:
        digest = ckpt_mod.sha256_file(newest / name if name[0] == "." else Path(name))
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"][name] = digest
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        assert manager.latest().manifest["step"] == 2
    assert "step_0000004" in caplog.text


def test_checkpoint_reads_only_listed_files_and_the_bytes_it_hashed(tmp_path):
    path = save(CheckpointManager(tmp_path / "ck"), 2)
    found = verify(path)
    # A tensors file the manifest does not list is never read into the state.
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"]["model.net.safetensors"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="model.net"):
        verify(path).read("model.net")
    # A file swapped after verification is refused when read, not loaded.
    other = save(CheckpointManager(tmp_path / "other"), 3)
    shutil.copyfile(other / "optimizer.safetensors", path / "optimizer.safetensors")
    with pytest.raises(CheckpointError, match="sha256"):
        found.read("optimizer")


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    manager = CheckpointManager(tmp_path / "ck")
    assert manager.latest() is None  # nothing yet: a fresh run
    path = save(manager, 2)
    (path / "optimizer.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        manager.latest()


def test_failed_save_midway_leaves_previous_checkpoints_valid(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path / "ck", keep_last=1)
    save(manager, 2)
    real_write = ckpt_mod.write_tree
    calls = []

    def failing_write(folder, stem, tree):
        calls.append(stem)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_write(folder, stem, tree)

    monkeypatch.setattr(ckpt_mod, "write_tree", failing_write)
    with pytest.raises(OSError, match="No space"):
        save(manager, 4)
    monkeypatch.setattr(ckpt_mod, "write_tree", real_write)
    assert (
        manager.latest().manifest["step"] == 2
    )  # keep_last=1, yet the old one was not rotated away
    assert verify(tmp_path / "ck" / "step_0000002").manifest["step"] == 2
    save(manager, 6)  # the next save cleans the half-written folder and rotates
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_0000006"]


REAL_FSYNC = os.fsync


class FullAfter:
    """``os.fsync`` that counts its calls and fails with ENOSPC (or EDQUOT) from call ``n``
    on: every file a save writes is fsynced, so this fails each write in turn."""

    def __init__(self, n: int, code: int = errno.ENOSPC):
        self.n, self.code, self.calls = n, code, 0

    def __call__(self, fd):
        self.calls += 1
        if self.calls >= self.n:
            raise OSError(self.code, os.strerror(self.code))
        return REAL_FSYNC(fd)


def test_a_full_disk_at_any_write_of_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Issue 27, item 4: ENOSPC/EDQUOT while writing a checkpoint left the partial folder
    behind and surfaced as a bare OSError. Now the partial folder is removed, the previous
    checkpoint stays valid and the error says "disk full" and how much was needed."""
    counting = FullAfter(10**9)
    monkeypatch.setattr(os, "fsync", counting)
    save(CheckpointManager(tmp_path / "count"), 2)
    writes = counting.calls
    assert writes >= 5  # trees, manifest, folders
    for n in range(1, writes + 1):
        root = tmp_path / f"ck{n}"
        monkeypatch.setattr(os, "fsync", FullAfter(10**9))
        manager = CheckpointManager(root, keep_last=1)
        save(manager, 2)
        monkeypatch.setattr(os, "fsync", FullAfter(n, errno.EDQUOT if n % 2 else errno.ENOSPC))
        with pytest.raises(DiskFull, match=r"disk full .* step 4 .* needs about [\d.]+ KiB"):
            save(manager, 4)
        monkeypatch.setattr(os, "fsync", FullAfter(10**9))
        left = sorted(p.name for p in root.iterdir())
        assert not [name for name in left if name.endswith(".tmp")], (n, left)
        assert "step_0000002" in left, (n, left)  # never rotated away by a failed save
        for name in left:  # whatever is there is whole (a failure after the rename: step 4)
            assert verify(root / name).manifest["step"] in (2, 4)
        assert manager.latest().manifest["step"] in (2, 4)


def test_a_full_mirror_is_retried_then_reported_and_training_goes_on(tmp_path, monkeypatch, caplog):
    """Issue 27, item 4: the mirror copy failing for a full Drive is tried again, then
    reported as disk full; the local checkpoint is committed and the save returns."""
    real_copy, tries = shutil.copyfile, []

    def full_drive(src, dst, **kwargs):
        if "drive" in str(dst):
            tries.append(dst)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_copy(src, dst, **kwargs)

    monkeypatch.setattr(ckpt_mod.shutil, "copyfile", full_drive)
    manager = CheckpointManager(tmp_path / "ck", mirror=tmp_path / "drive", mirror_retry_s=0)
    with caplog.at_level(logging.WARNING, logger="stages.common.checkpoint"):
        path = save(manager, 2)
    assert verify(path).manifest["step"] == 2
    assert len(tries) == ckpt_mod.MIRROR_TRIES
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "disk full" in errors[0] and "needs about" in errors[0]
    assert not list((tmp_path / "drive").iterdir())  # no partial copy left


def test_a_stalled_mirror_never_holds_training_and_the_local_save_commits(
    tmp_path, stalled_drive, caplog
):
    """Issue 27, item 5: a Drive copy blocked in a stalled FUSE mount made the next save
    (and the end of the run) wait for ever. Now the wait is bounded, reported, and the
    mirror is skipped until the blocked copy returns."""
    stall = stalled_drive
    mirror = tmp_path / "drive"
    manager = CheckpointManager(tmp_path / "ck", keep_last=3, mirror=mirror, mirror_timeout_s=0.3)
    try:
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="stages.common.checkpoint"):
            save(manager, 2)  # its copy blocks; the wait gives up
            assert manager.wait() is True  # nothing in flight any more
            save(manager, 3)  # committed locally; the mirror is skipped while it is stalled
        assert time.monotonic() - start < 10
        assert "has not finished after 0 s" in caplog.text
        assert "step_0000003 not mirrored" in caplog.text
        for step in (2, 3):
            assert verify(tmp_path / "ck" / f"step_{step:07d}").manifest["step"] == step
    finally:
        stall.set()  # the mount comes back: the blocked copy finishes ...
    deadline = time.monotonic() + 10
    while not (mirror / "step_0000002").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert verify(mirror / "step_0000002").manifest["step"] == 2
    save(manager, 4)  # ... and mirroring goes on
    assert verify(mirror / "step_0000004").manifest["step"] == 4


def test_a_runtime_that_lost_the_mirrors_lease_stops_copying_to_it(tmp_path, caplog):
    """Issue 27, item 1: the lease is renewed before each copy; once another runtime has
    taken it over (this one was judged gone), this one's copies stop, its training not."""
    from stages.common.lease import Lease

    mirror = tmp_path / "drive" / "run" / "checkpoints"
    lease = Lease(tmp_path / "drive" / "run" / "lease.json", 60, "the mirrored run", "stop one")
    manager = CheckpointManager(tmp_path / "ck", mirror=mirror, lease=lease.acquire())
    save(manager, 2)
    assert verify(mirror / "step_0000002").manifest["step"] == 2
    other = {"token": "b", "host": "colab-b", "machine": "colab-b/1", "pid": 7, "timeout_s": 60}
    lease.path.write_text(json.dumps(other | {"renewed": time.time()}))  # took it over
    with caplog.at_level(logging.ERROR):
        path = save(manager, 3)
    assert verify(path).manifest["step"] == 3 and not (mirror / "step_0000003").exists()
    assert "another runtime took over" in caplog.text


def test_saving_the_same_step_again_replaces_it(tmp_path):
    manager = CheckpointManager(tmp_path / "ck", keep_last=2)
    save(manager, 2)
    first = save(manager, 4)
    manifest = json.loads((first / "manifest.json").read_text())
    manager.save(4, state(4), {"rank0": {"data": {"index": 9}}}, {"batches_seen": 9})
    found = manager.latest()
    assert (
        found.manifest["step"] == 4
        and found.manifest["batches_seen"] == 9 != manifest["batches_seen"]
    )
    assert found.read("rank0")["data"]["index"] == 9
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_0000002", "step_0000004"]


def test_keep_last_best_and_final(tmp_path):
    manager = CheckpointManager(tmp_path / "ck", keep_last=2)
    for step in range(1, 7):
        save(manager, step, best_step=2 if step >= 2 else None)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "step_0000002",  # best
        "step_0000005",
        "step_0000006",
    ]
    save(manager, 7, final=True, best_step=2)
    for step in (8, 9):  # a later, longer run of the same folder
        save(manager, step, best_step=8)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "step_0000007",  # the newest final
        "step_0000008",  # best (and among the last two)
        "step_0000009",
    ]
    manifests = {f"s{i}": {"step": i, "batches_seen": i} for i in range(5)}
    assert keep_set(manifests, 0) == {"s4"}  # never zero: the newest one always stays


def test_mirror_gets_verified_copies_with_rotation_and_serves_resume(tmp_path):
    mirror = tmp_path / "drive" / "ck"
    manager = CheckpointManager(tmp_path / "ck", keep_last=2, mirror=mirror)
    for step in (1, 2, 3):
        save(manager, step)
    assert sorted(p.name for p in mirror.iterdir()) == ["step_0000002", "step_0000003"]
    for name in ("step_0000002", "step_0000003"):
        local, copy = tmp_path / "ck" / name, mirror / name
        assert verify(copy).manifest == verify(local).manifest
    shutil.rmtree(tmp_path / "ck")  # the runtime's disk is gone; the Drive remains
    found = CheckpointManager(tmp_path / "ck", mirror=mirror).latest()
    assert found.path == mirror / "step_0000003"
    assert tree_equal(found.read("model.net"), state(3)["model.net"])


def test_the_mirror_copy_runs_off_the_saving_thread_and_wait_finishes_it(tmp_path, monkeypatch):
    mirror = tmp_path / "drive"
    manager = CheckpointManager(tmp_path / "ck", mirror=mirror)
    release, copying = threading.Event(), []
    real_copy = shutil.copyfile

    def slow_copy(src, dst):  # a Drive that takes its time
        copying.append(threading.current_thread().name)
        assert release.wait(30)
        return real_copy(src, dst)

    monkeypatch.setattr(shutil, "copyfile", slow_copy)
    info = {"batches_seen": 1, "world_size": 1, "final": False, "best": None}
    path = manager.save(1, state(1), {"rank0": {"data": {"index": 1}}}, info)
    assert verify(path).manifest["step"] == 1  # committed locally while the copy still waits
    for _ in range(300):  # the copy thread reaches its first file
        if copying:
            break
        time.sleep(0.01)
    assert copying == ["mirror-copy"] and not (mirror / "step_0000001").exists()
    release.set()
    manager.wait()
    assert verify(mirror / "step_0000001").manifest == verify(path).manifest


def test_newest_of_local_and_mirror_wins_and_a_broken_mirror_only_warns(tmp_path, caplog):
    mirror = tmp_path / "drive"
    save(CheckpointManager(tmp_path / "ck", mirror=mirror), 2)
    save(CheckpointManager(mirror), 5)  # the mirror is ahead (e.g. another runtime)
    assert (
        CheckpointManager(tmp_path / "ck", mirror=mirror).latest().path == mirror / "step_0000005"
    )
    blocked = tmp_path / "not_a_dir"
    blocked.write_text("a file where the mirror folder should be")
    with caplog.at_level(logging.WARNING):
        path = save(CheckpointManager(tmp_path / "ck", mirror=blocked / "ck", mirror_retry_s=0), 7)
    assert verify(path).manifest["step"] == 7
    assert "could not mirror step_0000007" in caplog.text
