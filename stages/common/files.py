"""Files written and read safely: atomic JSON, fsync, sha256, and the files a manifest names.

A write that finds the disk full (ENOSPC, or EDQUOT: a quota) becomes ``DiskFull``, whose
message says so and how much was needed and free (``disk_full``).

Writers go through a temporary name, fsync and a rename (``write_json_atomic``), so readers
never see half a file and after a crash the folder holds the new file or the old one. Readers
of exports and checkpoints open only plain file names of regular files inside the folder
(never a symlink, FIFO or device) and hash the very bytes they return (``read_member``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import IO, Any


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$")  # no "/", "..", leading "."


class UnsafeFile(ValueError):
    """A manifest names a file that is not a plain regular file inside its folder, or a
    file's bytes do not match their recorded sha256."""


def open_regular(path: Path) -> IO[bytes]:
    """Open for reading a regular file, never through a symlink, and never blocking on a
    FIFO or reading a device (``/dev/zero`` would be hashed for ever)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafeFile(f"{path} is a symbolic link; refusing to follow it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeFile(f"{path} is not a regular file; refusing to read it")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def open_member(folder: Path, name: Any) -> IO[bytes]:
    """``open_regular(folder / name)`` for a ``name`` that is a plain file name."""
    if not isinstance(name, str) or not _PLAIN_NAME.match(name):
        raise UnsafeFile(f"{folder}: {name!r} is not a plain file name inside the folder")
    return open_regular(Path(folder) / name)


def check_member(folder: Path, name: Any, digest: str, chunk: int = 1 << 20) -> None:
    """Stream-hash a listed file (see ``open_member``) against its recorded sha256."""
    sha = hashlib.sha256()
    with open_member(folder, name) as f:
        while block := f.read(chunk):
            sha.update(block)
    if sha.hexdigest() != digest:
        raise UnsafeFile(f"{folder}: {name} does not match its sha256")


def read_member(folder: Path, files: Any, name: str) -> bytes:
    """The bytes of ``folder/name``, which must be listed in ``files`` (name -> sha256) and
    match it: the bytes hashed are the bytes returned, so no swap can slip in between."""
    if not isinstance(files, dict) or name not in files:
        raise UnsafeFile(f"{folder}: {name} is not listed in the manifest; refusing to read it")
    with open_member(folder, name) as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != files[name]:
        raise UnsafeFile(f"{folder}: {name} does not match its sha256")
    return data


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder after a rename in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary name, fsync, rename, fsync the folder: readers never see half a
    file, and after a crash the folder holds the new file or the old one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)  # the rename itself is durable only once its folder is


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFull(OSError):
    """A write found the disk full or the quota used up; the message says how much was
    needed and how much is free."""


def _size(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def disk_full(err: BaseException, what: str, where: Path, needed: int) -> DiskFull | None:
    """``err`` as a ``DiskFull`` naming ``what`` was written to ``where`` and the ``needed``
    bytes against the free ones; None when ``err`` is not a full disk or quota."""
    if not isinstance(err, OSError) or err.errno not in DISK_FULL_ERRNOS:
        return None
    if isinstance(err, DiskFull):
        return err
    try:
        existing = next(p for p in (where, *where.parents) if p.exists())
        free = _size(shutil.disk_usage(existing).free)
    except (OSError, StopIteration):
        free = "an unknown amount"
    return DiskFull(
        err.errno,
        f"disk full while writing {what} to {where} ({err.strerror or os.strerror(err.errno)}): "
        f"it needs about {_size(needed)} and {free} is free there",
    )
