"""Atomic, verified training checkpoints with rotation, a mirror, and fallback on corruption.

A checkpoint is a folder ``checkpoints/step_XXXXXXX/`` of *trees*: nested dicts/lists of
JSON values and tensors (a module's state_dict, the optimizer's, RNG states, a loader
cursor). Each tree ``<stem>`` is stored as ``<stem>.json`` (the structure, tensors replaced
by ``{"__tensor__": name}``) and ``<stem>.safetensors`` (the tensors): nothing is pickled,
nothing is unpickled. Writing goes to ``.step_XXXXXXX.tmp/``, every file is fsynced, then
``manifest.json`` (every file's sha256) is written last, the folder is renamed into place
and the parent directory fsynced. A folder without a valid manifest is never trusted.

Only after a commit are old checkpoints deleted: the last ``keep_last``, the best by the
stage's validation metric and the final one are kept. An optional mirror folder (a mounted
Drive) receives a verified copy of each commit (copy to a temporary folder, re-read and
check every sha256, rename) with the same rotation, on a background thread: training goes
on while it copies; the next save and the end of the run (``wait``) wait for it, at most
``mirror_timeout_minutes`` (a stalled mount is reported and skipped, never waited on for
ever). A failing copy is tried ``MIRROR_TRIES`` times, then reported. A full disk or quota
during a save removes the partial folder and raises ``files.DiskFull`` (how much was needed
and is free); the previous checkpoints are untouched.

``latest()`` returns the newest valid checkpoint of the local folder and the mirror; an
unusable newer one (manifest missing, sha256 mismatch, unreadable safetensors) is skipped
with a warning and renamed ``step_XXXXXXX.corrupt``, so that rotation never counts it among
the newest; one that cannot be renamed (a read-only folder) is left in place and rotation
skips it, and the save just committed is never rotated away.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save_file

from .files import UnsafeFile, check_member, disk_full, fsync_path, read_member, sha256_file
from .lease import Lease

log = logging.getLogger(__name__)

FORMAT = "minisd-checkpoint/1"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^(?:\.)?step_(\d{7,})(?:\.replaced)?$")
_STEM = re.compile(r"^[A-Za-z0-9_.-]+$")
MIRROR_TRIES = 3  # a failing mirror copy is tried this often, then reported (never fatal)


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 500  # 0 disables step-based saves
    every_minutes: float = 10.0  # wall-clock saves (a Colab runtime dies without a signal); 0 off
    keep_last: int = 2  # plus the best by validation metric and the final one (at least 1)
    mirror: str = ""  # e.g. a mounted Drive: <mirror>/<preset>/<stage>/<run id>/ gets copies
    # How long the next save (and the end of the run) waits for a mirror copy in flight: a
    # stalled Drive (FUSE) must not hold training for ever. Past it the run goes on, the
    # copy is reported and the mirror skipped until it returns.
    mirror_timeout_minutes: float = 10.0
    # The mirrored run's lease (two live runtimes on one Drive): renewed every quarter of
    # this and on each save; one not renewed for this long is taken over.
    mirror_lease_minutes: float = 5.0


class CheckpointError(RuntimeError):
    """A checkpoint folder is incomplete or corrupt, or none of the existing ones is usable."""


# --- trees: nested JSON values and tensors, split into JSON + safetensors -------------------

_MARKERS = ("__tensor__", "__tuple__", "__dict__")


def split_tree(tree: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``tree`` -> (JSON-able skeleton, {name: CPU tensor}). Tuples, non-string dict keys and
    shared tensors survive; anything that is neither JSON nor a tensor is refused."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            name = path or "tensor"
            while name in tensors:  # "a.b" and ("a", "b") would collide
                name += "~"
            tensors[name] = value.detach().to("cpu", copy=True).contiguous()
            return {"__tensor__": name}
        if isinstance(value, Mapping):
            items = list(value.items())
            if all(isinstance(k, str) and k not in _MARKERS for k, _ in items):
                return {k: walk(v, f"{path}.{k}" if path else k) for k, v in items}
            return {"__dict__": [[walk(k, path), walk(v, f"{path}.{k}")] for k, v in items]}
        if isinstance(value, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise TypeError(f"cannot store {type(value).__name__} at '{path}' in a checkpoint")

    return walk(tree, ""), tensors


def join_tree(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of ``split_tree``."""
    if isinstance(skeleton, list):
        return [join_tree(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            return tensors[skeleton["__tensor__"]]
        if set(skeleton) == {"__tuple__"}:
            return tuple(join_tree(v, tensors) for v in skeleton["__tuple__"])
        if set(skeleton) == {"__dict__"}:
            return {join_tree(k, tensors): join_tree(v, tensors) for k, v in skeleton["__dict__"]}
        return {k: join_tree(v, tensors) for k, v in skeleton.items()}
    return skeleton


def tree_bytes(tree: Any) -> int:
    """About how many bytes ``tree`` takes on disk: its tensors (the JSON is small)."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, Mapping):
        return sum(tree_bytes(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return sum(tree_bytes(v) for v in tree)
    return 64


def write_tree(folder: Path, stem: str, tree: Any) -> None:
    """``<stem>.json`` (+ ``<stem>.safetensors`` when there are tensors), both fsynced."""
    if not _STEM.match(stem):
        raise ValueError(f"checkpoint tree name {stem!r} is not a safe file name")
    skeleton, tensors = split_tree(tree)
    if tensors:
        save_file(tensors, str(folder / f"{stem}.safetensors"))
        fsync_path(folder / f"{stem}.safetensors")
    with open(folder / f"{stem}.json", "w") as f:
        json.dump(skeleton, f)
        f.flush()
        os.fsync(f.fileno())


def read_tree(folder: Path, stem: str, files: Mapping[str, str] | None = None) -> Any:
    """Read a tree from the files ``files`` (default: the folder's manifest) lists: each one
    is hashed and parsed from the same bytes; an unlisted file is never opened."""
    files = read_manifest(folder)["files"] if files is None else files
    weights = f"{stem}.safetensors"
    try:
        skeleton = json.loads(read_member(folder, dict(files), f"{stem}.json"))
        if weights in files or (folder / weights).exists():  # an unlisted one is refused
            tensors = load(read_member(folder, dict(files), weights))
        else:
            tensors = {}
        return join_tree(skeleton, tensors)
    except (UnsafeFile, SafetensorError, ValueError, KeyError) as err:
        raise CheckpointError(f"{folder}: cannot read '{stem}': {err}") from err


# --- one committed folder -----------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint folder and its manifest."""

    path: Path
    manifest: dict[str, Any]

    def has(self, stem: str) -> bool:
        return f"{stem}.json" in self.manifest["files"]

    def read(self, stem: str) -> Any:
        if not self.has(stem):
            raise CheckpointError(f"{self.path} holds no '{stem}'")
        return read_tree(self.path, stem, self.manifest["files"])


def _order(manifest: Mapping[str, Any]) -> tuple[int, int]:
    """Newest first by step, then by batches consumed (skipped steps consume batches)."""
    return int(manifest.get("step", -1)), int(manifest.get("batches_seen", -1))


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.exists():
        raise CheckpointError(f"{folder}: no {MANIFEST} (half-written)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    if not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: lists no files")
    return manifest


def verify(folder: Path) -> Checkpoint:
    """Check the manifest, every file's sha256 and every safetensors header. Listed names
    must be plain names of regular files in the folder (no path, symlink or device)."""
    manifest = read_manifest(folder)
    for name, digest in manifest["files"].items():
        file = folder / name
        try:
            check_member(folder, name, digest)
        except FileNotFoundError:
            raise CheckpointError(f"{folder}: {name} is missing") from None
        except UnsafeFile as err:
            raise CheckpointError(f"{err} (truncated or tampered with?)") from err
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(file), framework="pt") as f:
                    f.keys()
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{folder}: {name} is unreadable ({err})") from err
    return Checkpoint(folder, manifest)


def _commit(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (the same step saved again) is moved
    aside first and deleted last, so a crash in between leaves it as ``.step_X.replaced``."""
    if final.exists():
        aside = final.with_name(f".{final.name}.replaced")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(tmp, final)
        fsync_path(final.parent)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_path(final.parent)


def keep_set(manifests: Mapping[str, Mapping[str, Any]], keep_last: int) -> set[str]:
    """Names to keep among committed checkpoints: the newest ``keep_last`` (at least one),
    the newest final one, and the one at the best step recorded by the newest manifest."""
    names = sorted(manifests, key=lambda n: _order(manifests[n]))
    keep = set(names[-max(1, keep_last) :])
    finals = [n for n in names if manifests[n].get("final")]
    keep.update(finals[-1:])
    if names:
        best = manifests[names[-1]].get("best") or {}
        keep.update(n for n in names if manifests[n].get("step") == best.get("step"))
    return keep


def _rotate(root: Path, keep_last: int, fresh: str, unusable: Iterable[Path] = ()) -> None:
    """Delete committed checkpoints outside ``keep_set`` and stale temporary folders.

    ``fresh`` (the save just committed) is always kept, and the ``unusable`` ones (failed
    verification, could not be set aside) are neither counted nor deleted: a corrupt newer
    one left in place by a read-only folder must not push the fresh save out."""
    skip = {Path(p).name for p in unusable if Path(p).parent == root}
    manifests: dict[str, dict[str, Any]] = {}
    for path in root.iterdir():
        if path.name.endswith(".tmp") or (
            path.name.endswith(".replaced") and (root / path.name[1:-9]).exists()
        ):
            shutil.rmtree(path, ignore_errors=True)  # leftovers of an interrupted save
        elif path.name in skip:
            continue
        elif path.is_dir() and re.fullmatch(r"step_\d{7,}", path.name):  # not *.corrupt
            try:
                manifests[path.name] = read_manifest(path)
            except CheckpointError:
                continue  # not ours to judge here; never deleted, never loaded
    keep = keep_set(manifests, keep_last) | {fresh}
    for name in sorted(set(manifests) - keep):
        shutil.rmtree(root / name, ignore_errors=True)


def set_aside(path: Path) -> Path | None:
    """Rename a checkpoint that failed verification to ``<name>.corrupt[-N]``: rotation and
    resume never count it again (as one of the newest, or for its "best"), and it is kept
    for a look. Returns the new path (None when it could not be renamed)."""
    target = path.with_name(f"{path.name}.corrupt")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{n}")
        n += 1
    try:
        os.replace(path, target)
        fsync_path(path.parent)
    except OSError as err:
        log.warning("could not set %s aside: %s", path, err)
        return None
    log.warning("set the unusable checkpoint aside as %s", target)
    return target


def _folder_bytes(folder: Path) -> int:
    try:
        return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    except OSError:
        return 0


def _candidates(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]


class CheckpointManager:
    """Saves, rotates, mirrors and finds the checkpoints of one run.

    ``save`` is called by every rank (``barrier`` synchronises them): each rank writes its
    own trees (RNG states, data cursor), the main rank writes the shared ones and commits.
    The checkpoint folder must be on a filesystem every rank sees.
    """

    def __init__(
        self,
        root: Path,
        keep_last: int = 2,
        mirror: Path | None = None,
        mirror_retry_s: float = 5.0,
        mirror_timeout_s: float = 600.0,
        lease: Lease | None = None,
    ):
        self.root = Path(root)
        self.keep_last = keep_last
        self.mirror = Path(mirror) if mirror else None
        self.retry_s = mirror_retry_s  # the pause before a failed copy's next try (x attempt)
        # The mirror copy of the newest checkpoint runs on this thread, off the training
        # loop (a Drive copy of a large checkpoint takes minutes); ``wait`` joins it.
        self._copy: threading.Thread | None = None
        self.mirror_timeout_s = mirror_timeout_s
        self.lease = lease  # the mirror's: renewed before each copy, which stops once it is lost
        self._stalled: threading.Thread | None = None  # a copy given up on, maybe still blocked
        # Checkpoints ``latest`` found unusable and could not set aside (a read-only folder):
        # rotation neither counts nor deletes them.
        self._unusable: set[Path] = set()

    def wait(self) -> bool:
        """Wait for the mirror copy in flight (if any), at most ``mirror_timeout_s``; False
        when it did not finish (a stalled mirror: it is reported and left behind, on a
        daemon thread that cannot hold the process's exit)."""
        if self._copy is None:
            return True
        copy, self._copy = self._copy, None
        copy.join(self.mirror_timeout_s)
        if not copy.is_alive():
            return True
        self._stalled = copy
        log.error(
            "the mirror copy to %s has not finished after %.0f s (a stalled mount?): going on "
            "without it; the local checkpoint is committed, and the mirror is skipped until "
            "that copy returns",
            self.mirror,
            self.mirror_timeout_s,
        )
        return False

    def save(
        self,
        step: int,
        shared: Mapping[str, Any],
        per_rank: Mapping[str, Any],
        info: Mapping[str, Any],
        rank: int = 0,
        barrier: Callable[[], None] = lambda: None,
        any_failed: Callable[[bool], bool] | None = None,
    ) -> Path:
        """Write and commit ``step_XXXXXXX``; ``info`` goes into the manifest (``batches_seen``,
        ``final``, ``best``, ...). Returns the committed folder.

        ``any_failed(failed_here)`` (a collective: whether some rank failed) replaces
        ``barrier`` at each of the three meeting points when given: an exception on one
        rank is then raised on every rank at once, instead of leaving the others waiting at
        a barrier until the process group times out."""

        def meet(error: BaseException | None) -> None:
            if any_failed is None:
                barrier()
                if error is not None:
                    raise error
            elif any_failed(error is not None):
                if error is not None:
                    raise error
                raise CheckpointError(f"another process failed while saving step {step}")

        final = self.root / f"step_{step:07d}"
        tmp = self.root / f".{final.name}.tmp"
        error: BaseException | None = None
        try:
            try:
                if rank == 0:
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir(parents=True)
            except Exception as err:  # every rank learns of it at the meeting point
                error = err
            meet(error)
            try:
                for stem, tree in per_rank.items():
                    write_tree(tmp, stem, tree)
            except Exception as err:
                error = err
            meet(error)
            try:
                if rank == 0:
                    self._commit_shared(step, tmp, final, shared, info)
            except Exception as err:
                error = err
            meet(error)
        except OSError as err:
            # A full disk or quota: the partial folder goes (freeing what it took), the
            # previous checkpoints were not touched (rotation runs only after a commit).
            shutil.rmtree(tmp, ignore_errors=True)
            needed = tree_bytes(shared) + tree_bytes(per_rank)
            full = disk_full(err, f"the checkpoint of step {step}", self.root, needed)
            if full is None:
                raise
            raise full from err
        return final

    def _commit_shared(
        self, step: int, tmp: Path, final: Path, shared: Mapping[str, Any], info: Mapping[str, Any]
    ) -> None:
        """The main rank's part: shared trees, the manifest last, commit, rotate, mirror.

        The previous mirror copy finishes first: the rotation below may delete its source."""
        self.wait()
        for stem, tree in shared.items():
            write_tree(tmp, stem, tree)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        manifest = {
            "format": FORMAT,
            "step": step,
            **info,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": files,
        }
        with open(tmp / MANIFEST, "w") as f:  # written last: it commits the content
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp)
        _commit(tmp, final)
        _rotate(self.root, self.keep_last, final.name, self._unusable)
        if self.mirror is not None and self._stalled is not None and self._stalled.is_alive():
            log.warning("%s not mirrored: the mirror %s is still stalled", final.name, self.mirror)
        elif self.mirror is not None:
            self._stalled = None
            self._copy = threading.Thread(
                target=self._copy_to_mirror,
                args=(final, manifest),
                name="mirror-copy",
                daemon=True,  # a copy blocked in a stalled mount must not hold the exit
            )
            self._copy.start()

    def _copy_to_mirror(self, src: Path, manifest: Mapping[str, Any]) -> None:
        """``_copy_once``, tried ``MIRROR_TRIES`` times; a failing mirror is reported (an
        error in the log) and never stops training: the local checkpoint is committed."""
        assert self.mirror is not None
        if self.lease is not None:
            try:
                if not self.lease.renew():
                    log.error(
                        "%s not mirrored: another runtime took over %s (this one was judged "
                        "gone); stop one of the two",
                        src.name,
                        self.mirror,
                    )
                    return
            except OSError as err:
                log.warning("could not renew the mirror's lease: %s", err)
        for attempt in range(1, MIRROR_TRIES + 1):
            try:
                self._copy_once(src, manifest)
                return
            except (OSError, CheckpointError) as err:
                if attempt < MIRROR_TRIES:
                    log.warning(
                        "could not mirror %s to %s (%s): trying again in %.0f s",
                        src.name,
                        self.mirror,
                        err,
                        self.retry_s * attempt,
                    )
                    time.sleep(self.retry_s * attempt)
                    continue
                needed = _folder_bytes(src)
                err = disk_full(err, f"the mirror copy of {src.name}", self.mirror, needed) or err
                log.error(
                    "could not mirror %s to %s after %d tries: %s; training goes on, the "
                    "local checkpoint is kept",
                    src.name,
                    self.mirror,
                    MIRROR_TRIES,
                    err,
                )

    def _copy_once(self, src: Path, manifest: Mapping[str, Any]) -> None:
        """Copy, re-read and verify, rename; a partial copy is removed."""
        assert self.mirror is not None
        dst = self.mirror / src.name
        tmp = self.mirror / f".{src.name}.tmp"
        try:
            self.mirror.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for name, digest in manifest["files"].items():
                shutil.copyfile(src / name, tmp / name)
                fsync_path(tmp / name)
                if sha256_file(tmp / name) != digest:
                    raise CheckpointError(f"mirror copy of {name} does not match its sha256")
            shutil.copyfile(src / MANIFEST, tmp / MANIFEST)
            fsync_path(tmp / MANIFEST)
            fsync_path(tmp)
            _commit(tmp, dst)
            _rotate(self.mirror, self.keep_last, dst.name, self._unusable)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def roots(self) -> Iterable[Path]:
        yield self.root
        if self.mirror is not None:
            yield self.mirror

    def latest(self) -> Checkpoint | None:
        """The newest valid checkpoint of the local folder and the mirror (local wins a tie).

        Invalid newer ones are skipped with a warning and set aside (``set_aside``); if
        checkpoints exist but none is valid, raises ``CheckpointError`` rather than silently
        starting over.
        """
        found: list[tuple[tuple[int, int], int, Path]] = []
        for preference, root in enumerate(self.roots()):
            for path in _candidates(root):
                try:
                    order = _order(read_manifest(path))
                except CheckpointError:
                    order = (int(_NAME.match(path.name).group(1)), -1)  # type: ignore[union-attr]
                found.append((order, -preference, path))
        problems, unusable = [], []
        for _, _, path in sorted(found, reverse=True):
            try:
                checkpoint = verify(path)
            except CheckpointError as err:
                problems.append(str(err))
                unusable.append(path)
                log.warning("skipping unusable checkpoint: %s", err)
                continue
            if problems:
                log.warning("resuming from the previous valid checkpoint %s", path)
            for bad in unusable:  # only beside a valid one: else a re-run would start over
                if set_aside(bad) is None:
                    self._unusable.add(bad)
            return checkpoint
        if problems:
            raise CheckpointError(
                "no usable checkpoint (" + "; ".join(problems) + "): delete "
                f"{self.root} to start over"
            )
        return None
