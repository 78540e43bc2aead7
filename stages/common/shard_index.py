"""Where every sample of a split lies: the index the reader seeks by.

The tars are read map-style. A one-off index (tar headers only, no decoding) records the
byte offset and size of every member, so ``dataset[i]`` reads one sample with a single
``os.pread`` per member, and seeking to a resume position costs nothing: the sampler starts
there and no skipped sample is ever read or decoded. The index is built once per process and
rebuilt only when the manifest or a shard changed on disk (a stat of each, no read). A
remote split gets a ``RemoteIndex`` (``remote.py``): its manifest numbers the samples and no
shard is fetched until it is read.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import remote
from .remote import RemoteIndex, is_remote
from .shards import IMAGE_EXTENSIONS, ManifestError, ShardManifest, read_manifest

BUILD_HINT = "build shards with `python -m preprocess` (or `make data`) first"


@dataclass(frozen=True)
class ShardIndex:
    """Where every sample's members lie. Arrays are (N,); a size of -1 means "absent"."""

    folder: Path
    manifest: ShardManifest
    shard_paths: tuple[str, ...]
    keys: tuple[str, ...]
    shard: np.ndarray  # int32: index into shard_paths
    image: np.ndarray  # int64 (N, 2): offset, size of the image bytes
    txt: np.ndarray  # int64 (N, 2): offset, size of the caption text
    json: np.ndarray  # int64 (N, 2): offset, size of the metadata (caption fallback)

    def __len__(self) -> int:
        return len(self.keys)

    def local_path(self, shard: int) -> str:
        return self.shard_paths[shard]


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's convention: key = path up to the first dot of the basename, then ext."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _index_shard(path: Path) -> list[tuple[str, int, int, int, int, int, int]]:
    """(key, image off/size, txt off/size, json off/size) per sample, in tar order."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        # "r:" = uncompressed only: members must be seekable. Iterating reads headers and
        # seeks over the data, so this costs one 512-byte read per member.
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                samples.setdefault(key, {}).setdefault(ext, (member.offset_data, member.size))
    except tarfile.TarError as err:
        raise ManifestError(f"{path} is not a readable uncompressed tar: {err}") from err
    rows = []
    for key, members in samples.items():
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), (0, -1))
        txt = members.get("txt", (0, -1))
        meta = members.get("json", (0, -1))
        rows.append((key, *image, *txt, *meta))
    return rows


def _build_index(folder: Path) -> ShardIndex:
    manifest = read_manifest(folder)
    if manifest.num_samples == 0:
        raise ManifestError(f"{folder / 'manifest.json'} lists no samples: {BUILD_HINT}")
    keys: list[str] = []
    shard_ids: list[int] = []
    offsets: list[tuple[int, int, int, int, int, int]] = []
    for shard_id, info in enumerate(manifest.shards):
        rows = _index_shard(folder / info.name)
        if len(rows) != info.samples:
            raise ManifestError(
                f"{folder / info.name} holds {len(rows)} samples but manifest.json says "
                f"{info.samples}: the shard was changed after the manifest was written"
            )
        for key, *spans in rows:
            keys.append(key)
            shard_ids.append(shard_id)
            offsets.append(tuple(spans))
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 6)
    return ShardIndex(
        folder=folder,
        manifest=manifest,
        shard_paths=tuple(str(folder / s.name) for s in manifest.shards),
        keys=tuple(keys),
        shard=np.asarray(shard_ids, dtype=np.int32),
        image=spans[:, 0:2],
        txt=spans[:, 2:4],
        json=spans[:, 4:6],
    )


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


_INDEX_CACHE: dict[str, tuple[tuple[tuple[int, int], ...], ShardIndex]] = {}


_REMOTE_INDEX: dict[str, RemoteIndex] = {}  # remote shards are immutable (sha256-checked)


def load_index(split_dir: str | os.PathLike) -> ShardIndex | RemoteIndex:
    """The index of a split folder, built once per process and rebuilt only if the manifest
    or a shard changed on disk (checked by a stat of each, no read). A remote split (a URL,
    or a list file + split) gets a ``RemoteIndex``: its manifest is read, no shard fetched."""
    if is_remote(split_dir):
        key = str(split_dir)
        if key not in _REMOTE_INDEX:
            _REMOTE_INDEX[key] = RemoteIndex(remote.open_split(key), _index_shard)
        return _REMOTE_INDEX[key]
    folder = Path(split_dir).resolve()
    if not folder.is_dir():
        raise ManifestError(f"split folder {folder} does not exist: {BUILD_HINT}")
    if not (folder / "manifest.json").exists():
        read_manifest(folder)  # raises the ManifestError that says how to build data
    cached = _INDEX_CACHE.get(str(folder))
    if cached is not None:
        stamps, index = cached
        try:
            paths = [folder / "manifest.json", *map(Path, index.shard_paths)]
            if tuple(_stamp(p) for p in paths) == stamps:
                return index
        except FileNotFoundError:
            pass  # rebuilding says which file is missing
    index = _build_index(folder)
    paths = [folder / "manifest.json", *map(Path, index.shard_paths)]
    _INDEX_CACHE[str(folder)] = (tuple(_stamp(p) for p in paths), index)
    return index
