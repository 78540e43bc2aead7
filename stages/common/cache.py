"""One encode-once cache for every stage that trains on what frozen networks make of its data.

A stage gives an *encode function* (a batch of the shard reader -> per-sample tensors, first
dimension B) and the *parts* that determine its output (upstream export hashes, settings);
this module does the rest, the same way for every stage:

- **Keyed.** ``<root>/<key>/`` with ``key`` = sha256 of (parts, the data manifest's digest,
  the resolution, the format). Other exports or data give another folder; the stale ones are
  removed once the current one is complete.
- **Sharded by data position.** Cache shard ``s`` holds the readable samples among the
  split's samples ``[s * shard_size, (s + 1) * shard_size)``, in order: the rows, and so the
  sample stream of ``ResumableBatches``, do not depend on the number of processes that built
  them. Each shard is a safetensors file (the fields, plus each sample's key and caption as
  UTF-8 bytes with offsets) committed by a sidecar ``shard-NNNNNN.json`` (sample count,
  sha256) written after it, atomically.
- **Built in parallel.** Rank ``r`` checks and encodes shards ``r, r + W, ...``; a shard
  whose sidecar is missing, of another key or whose bytes fail its sha256 is encoded again.
  A rank killed mid-build leaves only committed shards, so a re-run encodes what is missing.
  Errors are shared (one all-reduce), so no rank waits at a barrier for a dead one; then
  rank 0 writes ``index.json`` (every shard's count and sha256).
- **Read memory-mapped.** ``CachedRows`` maps each shard file once (numpy views of the
  safetensors tensors over one map; at most ``MAX_OPEN`` files per process, least recently
  used unmapped) and copies out only the rows of a batch: a rank's own memory does not grow
  with the number of cached samples, only the index's few numbers per shard do. The pages
  it touches are page cache (shared by the ranks of a machine, dropped under pressure).
- **Why the header is parsed here** (8-byte length, JSON table; never unpickled, every
  tensor's offsets checked against the file) rather than read through safetensors'
  ``safe_open``/``get_slice``: ``get_slice`` takes slices, not index arrays, so a shuffled
  batch costs one call per row and tensor, where a numpy view gathers a tensor's rows in one
  copy. Measured (``python -m bench.scale --only memory --quick --modes mmap,safe_open``,
  2026-12-06, 2-core CPU): the same memory (RssAnon 526 vs 529 MiB at 10k samples), but 1.1
  vs 11.4 ms of CPU per batch of 64 at 10k samples (0.8 vs 10.9 at 2k), the same rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset

from .data import ResumableBatches, iter_rows, load_index
from .files import fsync_path, sha256_file, write_json_atomic
from .shards import digest_of

log = logging.getLogger(__name__)

CACHE_FORMAT = "minisd-cache/1"
INDEX = "index.json"
# Shard files mapped at once per process (and per DataLoader worker): one mapping each, so
# many are cheap; a shuffled batch touches up to batch-size shards, and fewer maps than that
# would map and unmap shards every batch (measured: 16 maps over 25 shards, 100k samples).
MAX_OPEN = 256
# Per-sample strings, stored as UTF-8 bytes (N_bytes,) uint8 + offsets (N + 1,) int64.
TEXT_FIELDS = ("key", "caption")
TEXT_TENSORS = {f"{name}_{part}" for name in TEXT_FIELDS for part in ("bytes", "offsets")}
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BOOL": np.bool_}
_DTYPES |= {"U8": np.uint8, "I8": np.int8, "I32": np.int32, "I64": np.int64}

Encoder = Callable[[dict[str, Any]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = True  # false: encode every batch on the fly (same maths, slower)
    shard_size: int = 4096  # split samples per cache shard (and per build work item)
    batch_size: int = 64  # encoding batch


class CacheError(RuntimeError):
    """A cache folder is incomplete, corrupt or keyed to other inputs."""


def cache_key(parts: dict[str, Any]) -> str:
    payload = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.safetensors"


# ------------------------------------------------------------------ ranks that share errors


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def any_failed(failed_here: bool) -> bool:
    """Whether some rank failed (one all-reduce; also the ranks' meeting point)."""
    if not _distributed():
        return failed_here
    nccl = torch.distributed.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    flag = torch.tensor([float(failed_here)], device=device)
    torch.distributed.all_reduce(flag)
    return bool(flag.item() > 0)


# --------------------------------------------------------------------------- writing


def _strings(values: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Strings -> (UTF-8 bytes (N_bytes,) uint8, offsets (N + 1,) int64)."""
    encoded = [v.encode() for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return torch.from_numpy(data), torch.from_numpy(offsets)


def _commit_shard(folder: Path, number: int, key: str, tensors: dict, info: dict) -> dict:
    """Write shard ``number`` aside, fsync, rename; then its sidecar, which commits it."""
    name = shard_name(number)
    tmp = folder / f".{name}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    fsync_path(tmp)
    os.replace(tmp, folder / name)
    record = {"key": key, "name": name, "sha256": sha256_file(folder / name), **info}
    write_json_atomic(folder / f"shard-{number:06d}.json", record)
    return record


@torch.no_grad()
def encode_shard(
    folder: Path,
    number: int,
    key: str,
    encode: Encoder,
    split_dir: str | os.PathLike,
    rows: range,
    resolution: int,
    cfg: CacheConfig,
    num_workers: int = 0,
) -> dict:
    """Encode the split's samples ``rows`` into cache shard ``number``; its sidecar record."""
    fields: dict[str, list[torch.Tensor]] = {}
    keys: list[str] = []
    captions: list[str] = []
    for batch in iter_rows(split_dir, rows, cfg.batch_size, resolution, num_workers):
        for name, value in encode(batch).items():
            fields.setdefault(name, []).append(value.detach().cpu())
        keys += batch["key"]
        captions += batch["caption"]
    tensors = {name: torch.cat(values) for name, values in fields.items()}
    for name, value in tensors.items():
        if len(value) != len(keys) or name in TEXT_TENSORS:
            raise CacheError(f"encoded field {name!r} has {len(value)} rows for {len(keys)}")
    for name, values in (("key", keys), ("caption", captions)):
        tensors[f"{name}_bytes"], tensors[f"{name}_offsets"] = _strings(values)
    info = {"samples": len(keys), "skipped": len(rows) - len(keys), "rows": [rows.start, rows.stop]}
    return _commit_shard(folder, number, key, tensors, info)


def _committed(folder: Path, number: int, key: str, check_bytes: bool = True) -> dict | None:
    """The sidecar of a committed, intact shard ``number`` of ``key``; None otherwise."""
    sidecar = folder / f"shard-{number:06d}.json"
    try:
        record = json.loads(sidecar.read_text())
        if record.get("key") != key or record.get("name") != shard_name(number):
            return None
        if check_bytes and sha256_file(folder / record["name"]) != record["sha256"]:
            log.warning("cache shard %s fails its sha256: encoding it again", record["name"])
            return None
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_cache(
    folder: Path,
    parts: dict[str, Any],
    encode: Encoder,
    split_dir: str | os.PathLike,
    resolution: int,
    cfg: CacheConfig,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Check this rank's shards of ``folder`` and encode the missing or damaged ones; then
    rank 0 writes the index. Every rank returns the index (each must call this)."""
    key = folder.name
    total = len(load_index(split_dir))
    count = max(1, math.ceil(total / cfg.shard_size))
    error: BaseException | None = None
    encoded, start = 0, time.perf_counter()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for number in range(rank, count, world_size):
            if _committed(folder, number, key) is not None:
                continue
            stop = min(total, (number + 1) * cfg.shard_size)
            rows = range(number * cfg.shard_size, stop)
            encode_shard(folder, number, key, encode, split_dir, rows, resolution, cfg, num_workers)
            encoded += len(rows)
    except Exception as err:  # every rank learns of it below
        error = err
    if any_failed(error is not None):
        raise error or CacheError("another process failed while building the cache")
    if encoded:
        seconds = time.perf_counter() - start
        log.info("rank %d encoded %d samples in %.1f s into %s", rank, encoded, seconds, folder)
    if rank == 0:
        try:
            records = [_committed(folder, n, key, check_bytes=False) for n in range(count)]
            if any(r is None for r in records):
                raise CacheError(f"{folder}: a shard is missing after the build")
            write_json_atomic(folder / INDEX, _index(key, parts, records))
            for other in folder.parent.iterdir():  # stale: other exports, data or settings
                if other.name != key:
                    shutil.rmtree(other) if other.is_dir() else other.unlink()
        except Exception as err:
            error = err
    if any_failed(error is not None):
        raise error or CacheError("the main process failed to index the cache")
    return read_index(folder)


def _index(key: str, parts: dict[str, Any], records: list[dict]) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "key": key,
        "parts": parts,
        "num_samples": sum(r["samples"] for r in records),
        "skipped": sum(r["skipped"] for r in records),
        "shards": [{k: r[k] for k in ("name", "samples", "skipped", "sha256")} for r in records],
    }


def read_index(folder: Path) -> dict[str, Any]:
    path = Path(folder) / INDEX
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CacheError(f"{path} is missing or not valid JSON: {err}") from err
    if index.get("format") != CACHE_FORMAT or index.get("key") != Path(folder).name:
        raise CacheError(f"{path} belongs to another cache key (stale)")
    if index["num_samples"] == 0:
        raise CacheError(f"{folder}: no readable sample to train on")
    return index


def ensure_cache(
    root: Path,
    parts: dict[str, Any],
    encode: Encoder,
    split_dir: str | os.PathLike,
    resolution: int,
    cfg: CacheConfig,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> CachedRows:
    """The verified cache of these inputs, built in parallel by every rank where needed."""
    manifest = load_index(split_dir).manifest
    parts = {**parts, "shards": digest_of(manifest), "resolution": resolution}
    parts["shard_size"] = cfg.shard_size  # which rows a shard holds
    folder = Path(root) / cache_key(parts)
    index = build_cache(
        folder, parts, encode, split_dir, resolution, cfg, rank, world_size, num_workers
    )
    log.info("latent cache: %s (%d samples)", folder, index["num_samples"])
    return CachedRows(folder, index)


# --------------------------------------------------------------------------- reading


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data section offset, tensor table) of a safetensors file (read, never unpickled)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        table = json.loads(f.read(size))
    table.pop("__metadata__", None)
    return 8 + size, table


def map_tensors(path: Path, header: tuple[int, dict[str, Any]] | None = None) -> dict:
    """Read-only views of every tensor of a safetensors file, all over one memory map of it
    (nothing is read yet). ``header`` (``_header``'s) saves parsing it again."""
    start, table = header or _header(path)
    whole = np.memmap(path, np.uint8, "r")
    out = {}
    for name, spec in table.items():
        begin, end = spec["data_offsets"]
        dtype = np.dtype(_DTYPES[spec["dtype"]])
        shape = tuple(spec["shape"])
        if start + end > len(whole) or (end - begin) != dtype.itemsize * math.prod(shape):
            raise CacheError(f"{path}: tensor {name} does not fit the file")
        out[name] = whole[start + begin : start + end].view(dtype).reshape(shape)
    return out


class CachedRows(Dataset):
    """Map-style, memory-mapped view of a cache folder: row i -> its fields, key and caption.

    ``__getitems__`` (the DataLoader's batched fetch) returns the batch already stacked:
    ``{field: (B, ...) tensor, "caption": [str], "key": [str], "skipped": 0}``.
    """

    def __init__(self, folder: Path, index: dict[str, Any]):
        self.folder = Path(folder)
        self.names = [s["name"] for s in index["shards"]]
        counts = np.asarray([s["samples"] for s in index["shards"]], dtype=np.int64)
        self.ends = np.cumsum(counts)  # row i lies in the first shard whose end > i
        self._maps: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._headers: dict[int, tuple[int, dict[str, Any]]] = {}  # a few bytes per shard

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": OrderedDict()}  # a worker maps its own

    def _shard(self, number: int) -> dict[str, np.ndarray]:
        maps = self._maps.get(number)
        if maps is None:
            while len(self._maps) >= MAX_OPEN:
                self._maps.popitem(last=False)  # its memmaps close with their last view
            path = self.folder / self.names[number]
            if number not in self._headers:
                self._headers[number] = _header(path)
            maps = self._maps[number] = map_tensors(path, self._headers[number])
        self._maps.move_to_end(number)
        return maps

    def _locate(self, indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(indices, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row out of range 0..{len(self) - 1}")
        shards = np.searchsorted(self.ends, rows, side="right")
        local = rows - np.concatenate([[0], self.ends])[shards]
        return shards, local

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        shards, local = self._locate(indices)
        out: dict[str, Any] = {}
        strings: dict[str, list[str]] = {name: [""] * len(indices) for name in TEXT_FIELDS}
        for number in np.unique(shards).tolist():
            where = np.nonzero(shards == number)[0]
            maps, rows = self._shard(number), local[where]
            for name, array in maps.items():
                if name in TEXT_TENSORS:
                    continue
                if name not in out:
                    out[name] = torch.empty((len(indices), *array.shape[1:]), dtype=_torch(array))
                out[name][torch.from_numpy(where)] = torch.from_numpy(np.asarray(array[rows]))
            for name in TEXT_FIELDS:
                data, offsets = maps[f"{name}_bytes"], maps[f"{name}_offsets"]
                for at, row in zip(where.tolist(), rows.tolist()):
                    strings[name][at] = bytes(data[offsets[row] : offsets[row + 1]]).decode()
        return {**out, **strings, "skipped": 0}

    def __getitem__(self, i: int) -> dict[str, Any]:
        batch = self.__getitems__([i])
        return {k: (v[0] if isinstance(v, torch.Tensor | list) else v) for k, v in batch.items()}


def _torch(array: np.ndarray) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype=array.dtype)).dtype


def collate_rows(batch: dict[str, Any]) -> dict[str, Any]:
    """``CachedRows.__getitems__`` already returns a stacked batch."""
    return batch


def cached_batches(
    rows: CachedRows,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    weights: torch.Tensor | None = None,
) -> ResumableBatches:
    """The training stream over a cache: the shard reader's resumable cursor (weighted draws
    with ``weights``, see ``stages/common/balance.py``)."""
    return ResumableBatches(
        rows,
        batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        collate_fn=collate_rows,
        pin_memory=pin_memory,
        weights=weights,
    )
