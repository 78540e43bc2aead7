"""The shard manifest: the contract between preprocessing and every reader.

A split folder (``data/<name>/train/``) holds immutable webdataset tars named
``shard-NNNNNN.tar`` in the img2dataset layout (``{key}.png|jpg|webp``, ``{key}.txt``,
``{key}.json``) and a ``manifest.json`` written last, atomically, listing every shard
with its sample count and sha256, plus resolution, source, licence and attribution.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

MANIFEST_FORMAT = "minisd-shards/1"
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


class ManifestError(ValueError):
    """A shard folder has no manifest, a malformed one, or shards that do not match it."""


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name inside the split folder
    samples: int
    sha256: str


@dataclass(frozen=True)
class ShardManifest:
    split: str
    resolution: int  # square side in pixels of every stored image
    shards: tuple[ShardInfo, ...]
    source: str = ""
    licence: str = ""
    attribution: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. skip counts per reason

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["shards"] = [asdict(s) for s in self.shards]
        return {"format": MANIFEST_FORMAT, "num_samples": self.num_samples, **out}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --- files named by a manifest (exports, checkpoints): plain names of regular files --------

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


def write_manifest(folder: Path, manifest: ShardManifest) -> Path:
    path = Path(folder) / "manifest.json"
    write_json_atomic(path, manifest.to_json())
    return path


def read_manifest(folder: Path, verify: bool = False) -> ShardManifest:
    """Read ``folder/manifest.json``; with ``verify`` also check every shard's sha256."""
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.exists():
        raise ManifestError(
            f"{folder} has no manifest.json: build shards with `python -m preprocess` "
            "(or `make data`) first"
        )
    manifest = parse_manifest(path.read_text(), str(path))
    for shard in manifest.shards:
        shard_path = folder / shard.name
        if not shard_path.exists():
            raise ManifestError(f"{path} lists {shard.name}, which is missing")
        if verify and sha256_file(shard_path) != shard.sha256:
            raise ManifestError(f"{shard_path} does not match its sha256 in {path}")
    return manifest


def parse_manifest(text: str, where: str) -> ShardManifest:
    """A manifest from its JSON text (``where`` names it in errors)."""
    try:
        raw = json.loads(text)
        if raw.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"{where}: format {raw.get('format')!r} is not {MANIFEST_FORMAT}")
        shards = tuple(ShardInfo(**s) for s in raw["shards"])
        return ShardManifest(
            split=raw["split"],
            resolution=int(raw["resolution"]),
            shards=shards,
            source=raw.get("source", ""),
            licence=raw.get("licence", ""),
            attribution=raw.get("attribution", ""),
            extra=raw.get("extra", {}),
        )
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{where} is malformed: {err}") from err


def digest_of(manifest: ShardManifest) -> str:
    """A short identity of a split's content (its shards' hashes), for cache keys."""
    digest = hashlib.sha256()
    for shard in manifest.shards:
        digest.update(f"{shard.name}:{shard.samples}:{shard.sha256}\n".encode())
    return digest.hexdigest()


def manifest_digest(folder: Path) -> str:
    """``digest_of`` the manifest of a local split folder."""
    return digest_of(read_manifest(folder))
