"""The run folder ``<runs>/<preset>/<stage>/``: who may use it, what it was trained on, who it is.

- ``RunLock``: one process (one launch) per run folder. An exclusive POSIX record lock
  (``lockf``) on the sibling file ``.<stage>.lock`` (outside the folder, so it survives the
  folder being moved aside); a second process is refused at once, naming the live holder's
  PID. It dies with the process that took it: forked children never hold it. Where the
  file system refuses locks (ENOLCK, ENOTSUP) it warns and holds a lease file instead
  (``lease.py``: a heartbeat, taken over once stale or once its holder on this machine died).
- ``claim_upstream``: ``upstream.json`` records the upstream export hashes the run trains
  on. A run folder recorded against other exports is stale: it is renamed to
  ``<stage>.stale-<time>/`` (kept, never deleted) and the stage starts a fresh run, so
  ``make vae && make clip && make unet`` after a VAE change retrains what is stale.
- ``run_identity``: ``run.json`` holds an id drawn at the first start; the checkpoint mirror
  is keyed by it (``<mirror>/<preset>/<stage>/<id>/``), so a run never resumes, nor
  rotates away, another run's checkpoints. A fresh local folder (a new Colab runtime)
  adopts the mirrored run of the same runs folder path and upstream exports.
- ``mirror_lease``: two live Colab runtimes on one Drive adopt the same mirrored run, and a
  lock does not reach across machines; the mirrored run's ``lease.json`` (``lease.py``)
  admits one of them, and the other stops with a message that says what to do.

Nothing here imports torch: the lock is taken before anything heavy starts.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import struct
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .files import write_json_atomic
from .lease import Lease, LeaseHeld

log = logging.getLogger(__name__)

UPSTREAM_FILE = "upstream.json"
IDENTITY_FILE = "run.json"
MIRROR_LEASE_FILE = "lease.json"  # in <mirror>/<preset>/<stage>/<run id>/
LEASE_TIMEOUT_S = 120.0  # the lock's stand-in where locks fail: stale after this long unrenewed
_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")  # a plain folder name inside the mirror


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock."""


# Locks this process holds, by the lock file's (device, inode): a POSIX record lock is the
# process's, so a second ``RunLock`` in the same process would be granted the same lock, and
# closing its descriptor would silently drop the first one's.
_HELD: dict[tuple[int, int], Path] = {}
_HELD_GUARD = threading.Lock()


def _lock_holder(fd: int) -> int | None:
    """The PID of the process whose record lock blocks ours (``F_GETLK``), None if unknown."""
    if not sys.platform.startswith("linux"):
        return None
    # struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
    layout = "hhqqixxxx"
    probe = struct.pack(layout, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    try:
        l_type, _, _, _, pid = struct.unpack(layout, fcntl.fcntl(fd, fcntl.F_GETLK, probe))
    except OSError:
        return None
    return pid if l_type != fcntl.F_UNLCK and pid > 0 else None


class RunLock:
    """An exclusive, non-blocking lock on a run folder, held until ``release`` (or exit).

    A POSIX record lock (``lockf``), not a ``flock``: a record lock belongs to the process
    that took it, so forked children (DataLoader workers) never hold it, and the kernel drops
    it the moment that process dies: a relaunch right after a ``kill -9`` of the trainer is
    let in even while its workers still live. A refusal names the holder the kernel reports
    (``F_GETLK``), a live process; the PID written into the file is only a fallback.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir).with_name(f".{Path(run_dir).name}.lock")
        self._fd: int | None = None
        self._key: tuple[int, int] | None = None
        self._lease: Lease | None = None  # where the file system refuses locks

    def _busy(self, holder: str) -> RunFolderBusy:
        return RunFolderBusy(
            f"{self.path.with_name(self.path.name[1:-5])} is in use by another process "
            f"(PID {holder}): wait for it to finish or stop it; two processes on one run "
            "folder would delete each other's checkpoints"
        )

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _HELD_GUARD:
            try:  # checked before opening: closing any descriptor of a file we hold unlocks it
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) in _HELD:
                    raise self._busy(f"{os.getpid()}, this process")
            except FileNotFoundError:
                pass
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    return self._lease_instead(err)
                holder = _lock_holder(fd)
                if holder is None:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise self._busy(str(holder)) from None
            _HELD[key] = self.path
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd, self._key = fd, key
        return self

    def _lease_instead(self, err: OSError) -> RunLock:
        """The file system refuses locks (ENOLCK on NFS without its lock daemon, ENOTSUP on
        some FUSE mounts): hold the lease file ``.<stage>.lease`` instead, with a warning."""
        lease = Lease(
            self.path.with_name(self.path.name[:-5] + ".lease"),
            timeout_s=LEASE_TIMEOUT_S,
            what=str(self.path.with_name(self.path.name[1:-5])),
            hint="wait for it to finish or stop it; a lease left by a process that died on "
            "another machine is taken over once it is stale",
        )
        try:
            lease.acquire()
        except LeaseHeld as held:
            raise RunFolderBusy(str(held)) from None
        log.warning(
            "%s: this file system refuses locks (%s); holding the lease file %s instead "
            "(renewed every %.0f s, taken over %.0f s after its holder stops renewing it)",
            self.path,
            os.strerror(err.errno) if err.errno else err,
            lease.path,
            LEASE_TIMEOUT_S / 4,
            LEASE_TIMEOUT_S,
        )
        lease.start_heartbeat()
        self._lease = lease
        return self

    def release(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        if self._fd is not None:
            with _HELD_GUARD:
                os.close(self._fd)  # closing the descriptor releases the record lock
                _HELD.pop(self._key, None)
            self._fd = self._key = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def recorded_upstream(run_dir: Path) -> dict[str, str] | None:
    """The upstream hashes a run folder trained on; None when it does not say.

    Folders from before ``upstream.json`` existed are judged by their export's manifest.
    """
    recorded = _read_json(Path(run_dir) / UPSTREAM_FILE)
    if isinstance(recorded, dict):
        return recorded
    manifest = _read_json(Path(run_dir) / "export" / "manifest.json")
    if isinstance(manifest, dict) and isinstance(manifest.get("upstream"), dict):
        return manifest["upstream"]
    return None


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_file(path: Path, timeout_s: float = 3600.0) -> None:
    """Block a non-main rank until the main process has committed ``path``."""
    deadline = time.monotonic() + timeout_s
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the main process did not write {path} within {timeout_s:.0f} s")
        time.sleep(1.0)


def claim_upstream(run_dir: Path, hashes: dict[str, str], timeout_s: float = 600.0) -> Path | None:
    """Record ``hashes`` as this run folder's upstream; move a stale folder aside first.

    Returns where the stale folder went (None when nothing was stale). Only the main
    process moves and writes; the other ranks wait until the record matches.
    """
    run_dir = Path(run_dir)
    if not is_main_process():
        deadline = time.monotonic() + timeout_s
        while _read_json(run_dir / UPSTREAM_FILE) != hashes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the main process did not claim {run_dir} in {timeout_s} s")
            time.sleep(0.5)
        return None
    recorded = recorded_upstream(run_dir)
    moved = None
    if recorded is not None and recorded != hashes:
        moved = run_dir.with_name(f"{run_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        while moved.exists():
            moved = moved.with_name(moved.name + "~")
        os.replace(run_dir, moved)
        changed = sorted(k for k in set(recorded) | set(hashes) if recorded.get(k) != hashes.get(k))
        log.warning(
            "%s was trained on other %s export(s) (%s): it is kept as %s and a new run starts",
            run_dir,
            "/".join(changed),
            ", ".join(f"{k} {recorded.get(k)} -> {hashes.get(k)}" for k in changed),
            moved,
        )
    if recorded != hashes or not (run_dir / UPSTREAM_FILE).exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / UPSTREAM_FILE, hashes)
    return moved


def run_identity(run_dir: Path, runs_root: Path, mirror_base: Path | None) -> dict[str, Any]:
    """This run's identity (``run.json``), drawn at the first start (main process only).

    With a mirror, a folder without one adopts the newest mirrored run that was started from
    the same runs folder path on the same upstream exports: a fresh Colab runtime then
    continues its run from Drive, while any other run gets its own mirror folder.
    """
    run_dir = Path(run_dir)
    path = run_dir / IDENTITY_FILE
    identity = _read_json(path)
    if isinstance(identity, dict) and _ID.match(str(identity.get("id", ""))):
        return identity
    runs = str(Path(runs_root).resolve())
    upstream = _read_json(run_dir / UPSTREAM_FILE) or {}
    adopted = []
    if mirror_base is not None and mirror_base.is_dir():
        for folder in mirror_base.iterdir():
            theirs = _read_json(folder / IDENTITY_FILE)
            if (
                isinstance(theirs, dict)
                and theirs.get("id") == folder.name
                and _ID.match(folder.name)
                and theirs.get("runs") == runs
                and (_read_json(folder / UPSTREAM_FILE) or {}) == upstream
            ):
                adopted.append(theirs)
    if adopted:
        identity = max(adopted, key=lambda x: str(x.get("created", "")))
        log.info("continuing the mirrored run %s", mirror_base / identity["id"])
    else:
        identity = {
            "id": f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}",
            "runs": runs,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, identity)
    return identity


def mirror_lease(folder: Path, timeout_s: float) -> Lease:
    """Take the lease of the mirrored run ``folder`` (before anything is copied to it), with a
    heartbeat; raises ``LeaseHeld`` while another live runtime holds it."""
    lease = Lease(
        Path(folder) / MIRROR_LEASE_FILE,
        timeout_s=timeout_s,
        what=f"the mirrored run {folder}",
        hint="another runtime (a second Colab tab, a runtime you reconnected from) is "
        "training it. Stop that one (Runtime > Manage sessions > Terminate) and re-run this; "
        f"a lease left by a runtime that died is taken over {timeout_s:.0f} s after its last "
        "renewal. To train both, give this one another ckpt.mirror or --runs folder",
        settle_s=0.5,  # two runtimes starting together: the later writer wins, the other stops
    )
    lease.acquire()
    lease.start_heartbeat()
    return lease
