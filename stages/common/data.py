"""Shard reader with a resumable cursor: random access into webdataset tars, exact resume.

Notable choices:
- The tars are read map-style. A one-off index (tar headers only, no decoding) records the
  byte offset and size of every member, so ``dataset[i]`` reads one sample with a single
  ``os.pread`` per member. Seeking to a resume position therefore costs nothing: the
  sampler simply starts there and no skipped sample is ever read or decoded.
- The sample stream is the concatenation of epoch permutations (epoch ``e`` shuffled by a
  generator seeded from ``(seed, e)``). Global batch ``g`` is stream positions
  ``[g*B*W, (g+1)*B*W)`` and rank ``r`` takes its ``B``-slice: nothing is dropped, batches
  cross epoch boundaries, every sample is seen exactly once per epoch over all ranks.
- The cursor is one integer, ``position`` = samples consumed by all ranks. It is advanced
  only when a batch is handed to the caller, so DataLoader prefetching never leaks into a
  checkpoint; the ordered ``batch_sampler`` keeps batches in order with workers.
- A corrupt sample (undecodable image, missing or empty caption) becomes a marker that the
  collate function drops and counts in ``batch["skipped"]``: it never stops the loader. A
  shard that cannot be opened is no such sample: it stops the run (``ShardUnavailable``),
  and at most ``MAX_OPEN_SHARDS`` shards are open per process (least recently used closed),
  so a data set of more shards than the open-file limit still reads every sample.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from . import remote
from .images import SHARD_FORMATS, open_image, pixel_cap
from .remote import RemoteIndex, ShardUnavailable, is_remote
from .shards import IMAGE_EXTENSIONS, ManifestError, ShardManifest, read_manifest

log = logging.getLogger(__name__)

BUILD_HINT = "build shards with `python -m preprocess` (or `make data`) first"
# Open shard files kept per process (and per DataLoader worker); far below the usual
# 1024-descriptor limit, and one shard serves many consecutive reads of a batch.
MAX_OPEN_SHARDS = 64
# Largest member a sample may have (bytes); a larger one is a skipped sample, never read.
MAX_MEMBER_BYTES = {"image": 64 << 20, "txt": 64 << 10, "json": 1 << 20}


@dataclass(frozen=True)
class DataConfig:
    path: str = "data/emoji-32"  # holds train/ and val/ shard folders with manifest.json
    resolution: int = 32  # images are resized/cropped to this if stored otherwise
    batch_size: int = 16  # per rank, per micro-step
    num_workers: int = 0
    pin_memory: bool = False  # page-locked batches for faster host-to-GPU copies
    # Remote data (``path`` an fsspec URL or a list file of shard URLs, see remote.py):
    shard_cache: str = ""  # local folder for fetched shards ("" = ~/.cache/minisd/shards)
    shard_cache_gb: float = 20.0  # its size limit (least recently used shards deleted)
    prefetch_shards: int = 8  # batches ahead of the reader whose shards are fetched

    def split_dir(self, split: str) -> Path | str:
        """Where a split lies: a folder, or for remote data what ``load_index`` takes."""
        if is_remote(self.path):
            return remote.split_location(self.path, split)
        return Path(self.path) / split

    def configure_remote(self) -> None:
        """This process's shard cache (one per process: every reader of it shares it)."""
        remote.configure(self.shard_cache, self.shard_cache_gb, self.prefetch_shards)


# ---------------------------------------------------------------------------- the index


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


# ----------------------------------------------------------------------- the dataset


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparency is composited on white, as preprocessing does."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, resolution: int) -> torch.Tensor:
    """Image bytes -> float32 (3, R, R) in [-1, 1]; shorter side resized, then center-cropped.

    PNG, JPEG and WebP only (what shards hold), at most ``pixel_cap(R)`` pixels."""
    image = open_image(data, SHARD_FORMATS, pixel_cap(resolution))
    image.draft("RGB", (resolution, resolution))  # JPEG: decode at a reduced scale if larger
    return image_tensor(image, resolution)


def image_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """A PIL image -> float32 (3, R, R) in [-1, 1], as training sees it (alpha on white,
    shorter side resized, center-cropped); the pipeline's image-to-image input too."""
    image = _to_rgb(image)
    if image.size != (resolution, resolution):
        width, height = image.size
        scale = resolution / min(width, height)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return pixels.float().div_(127.5).sub_(1.0)


class CorruptSample(ValueError):
    """A sample that cannot be used; the reason becomes part of the skip marker."""


class ShardDataset(Dataset):
    """Map-style view of a split: ``ds[i]`` reads and decodes sample ``i`` only.

    Returns ``{"key", "caption", "image"}`` or, for a corrupt sample, the marker
    ``{"key", "error"}`` that ``collate_samples`` drops and counts.
    """

    def __init__(self, index: ShardIndex | RemoteIndex, resolution: int):
        if resolution <= 0:
            raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
        self.index = index
        self.resolution = resolution
        # shard id -> fd, least recently used first; per process (see __getstate__)
        self._files: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": OrderedDict()}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._files.values():
                os.close(fd)

    def _fd(self, shard: int) -> int:
        """The shard's descriptor, opened on demand; beyond ``MAX_OPEN_SHARDS`` the least
        recently used one is closed."""
        if self._pid != os.getpid():  # forked worker: its own descriptors
            self._files, self._pid = OrderedDict(), os.getpid()
        fd = self._files.get(shard)
        if fd is not None:
            self._files.move_to_end(shard)
            return fd
        while len(self._files) >= max(1, MAX_OPEN_SHARDS):
            os.close(self._files.popitem(last=False)[1])
        for attempt in range(2):  # a fetched shard may be evicted before it is opened
            path = self.index.local_path(shard)
            try:
                fd = os.open(path, os.O_RDONLY)
                break
            except FileNotFoundError as err:
                if attempt or not isinstance(self.index, RemoteIndex):
                    raise ShardUnavailable(f"cannot open shard {path}: {err}") from err
            except OSError as err:
                raise ShardUnavailable(f"cannot open shard {path}: {err}") from err
        self._files[shard] = fd
        return fd

    def _read(self, shard: int, span: np.ndarray, kind: str = "image") -> bytes | None:
        offset, size = int(span[0]), int(span[1])
        if size < 0:
            return None
        if size > MAX_MEMBER_BYTES[kind]:
            raise CorruptSample(f"{kind} member of {size} bytes is over the size cap")
        data = os.pread(self._fd(shard), size, offset)  # no file position: safe anywhere
        if len(data) != size:
            raise CorruptSample(f"truncated shard (read {len(data)} of {size} bytes)")
        return data

    def caption(self, i: int) -> str:
        shard = int(self.index.shard[i])
        text = self._read(shard, self.index.txt[i], "txt")
        if text is not None:
            caption = text.decode("utf-8")
        else:
            meta = self._read(shard, self.index.json[i], "json")
            if meta is None:
                raise CorruptSample("no caption (.txt or .json)")
            record = json.loads(meta)
            value = record.get("caption") if isinstance(record, dict) else None
            caption = value if isinstance(value, str) else ""
        caption = caption.strip()
        if not caption:
            raise CorruptSample("empty caption")
        return caption

    def __getitem__(self, i: int) -> dict[str, Any]:
        key = self.index.keys[i]
        try:
            caption = self.caption(i)
            data = self._read(int(self.index.shard[i]), self.index.image[i], "image")
            if data is None:
                raise CorruptSample("no image member")
            image = decode_image(data, self.resolution)
        except ShardUnavailable:
            raise  # the data set is broken, not this sample
        except Exception as e:  # any decoder's failure on bad bytes is a skipped sample
            log.warning("skipping sample %s in %s: %s", key, self.index.folder, e)
            return {"key": key, "error": f"{type(e).__name__}: {e}"}
        return {"key": key, "caption": caption, "image": image}


def collate_samples(samples: Sequence[dict[str, Any]], resolution: int) -> dict[str, Any]:
    """Stack the good samples; corrupt markers are dropped and counted in ``"skipped"``."""
    good = [s for s in samples if "error" not in s]
    bad = [s for s in samples if "error" in s]
    images = (
        torch.stack([s["image"] for s in good])
        if good
        else torch.empty(0, 3, resolution, resolution)
    )
    return {
        "image": images,  # (B', 3, R, R), B' = B - skipped
        "caption": [s["caption"] for s in good],
        "key": [s["key"] for s in good],
        "skipped": len(bad),
        "skipped_keys": [f"{s['key']} ({s['error']})" for s in bad],
    }


# ------------------------------------------------------------------ the resumable cursor


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of one epoch, from a generator seeded by a hash of (seed, epoch)."""
    return torch.randperm(num_samples, generator=_epoch_generator(seed, epoch))


def epoch_draws(weights: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """A weighted "epoch": ``len(weights)`` indices drawn with replacement, sample ``i`` with
    probability ``weights[i] / weights.sum()`` (concept-balanced sampling, ``balance.py``).
    Seeded like ``epoch_permutation``, so the stream is still a pure function of the position."""
    # Inverse-CDF draws (torch.multinomial caps the categories at 2**24 samples).
    cdf = torch.cumsum(weights.double(), 0)
    u = torch.rand(len(weights), generator=_epoch_generator(seed, epoch), dtype=torch.float64)
    return torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_max(len(weights) - 1)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    digest = hashlib.sha256(f"minisd-data/{seed}/{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def weights_digest(weights: torch.Tensor | None) -> str:
    """What a checkpointed cursor records of its sampling weights ("uniform" for none)."""
    if weights is None:
        return "uniform"
    data = weights.double().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


class StreamBatchSampler:
    """Infinite batch sampler: rank ``rank``'s slice of each global batch, from ``start``.

    ``lookahead(indices)``, when given, is told the samples of the batch ``ahead`` batches
    past the one being yielded (remote shards are prefetched from it); it never changes
    what is yielded. With ``weights`` (N,) each epoch is ``epoch_draws`` instead of a
    permutation: weighted, with replacement, as resumable."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        start: int,
        lookahead: Callable[[list[int]], None] | None = None,
        ahead: int = 0,
        weights: torch.Tensor | None = None,
    ):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        self.lookahead, self.ahead = lookahead, ahead
        self.weights = weights
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)
        self._previous: tuple[int, torch.Tensor] | None = None  # lookahead crosses epochs

    def positions(self, begin: int, end: int) -> list[int]:
        """Dataset indices at stream positions [begin, end), crossing epochs as needed."""
        out: list[int] = []
        while begin < end:
            epoch, offset = divmod(begin, self.num_samples)
            if epoch != self._epoch:
                kept = self._previous
                self._previous = (self._epoch, self._perm)
                if kept is not None and kept[0] == epoch:
                    self._epoch, self._perm = kept
                elif self.weights is not None:
                    self._epoch, self._perm = epoch, epoch_draws(self.weights, self.seed, epoch)
                else:
                    perm = epoch_permutation(self.num_samples, self.seed, epoch)
                    self._epoch, self._perm = epoch, perm
            take = min(end - begin, self.num_samples - offset)
            out += self._perm[offset : offset + take].tolist()
            begin += take
        return out

    def __iter__(self) -> Iterator[list[int]]:
        global_batch = self.batch_size * self.world_size
        begin = self.start + self.rank * self.batch_size
        if self.lookahead is not None:
            for k in range(self.ahead):  # the first batches: from the start
                at = begin + k * global_batch
                self.lookahead(self.positions(at, at + self.batch_size))
        while True:
            batch = self.positions(begin, begin + self.batch_size)
            if self.lookahead is not None and self.ahead:
                at = begin + self.ahead * global_batch
                self.lookahead(self.positions(at, at + self.batch_size))
            yield batch
            begin += global_batch


class ResumableBatches:
    """Infinite, shuffled, rank-split batches over a map-style dataset, resumable exactly.

    ``state_dict()`` counts only the batches already yielded to the caller;
    ``load_state_dict`` makes the next batch the one an uninterrupted pass would yield.
    Call ``load_state_dict`` before iterating: it ends iterators started earlier.
    ``weights`` (N,), non-negative: concept-balanced draws instead of permutations (see
    ``StreamBatchSampler``); the cursor records their digest and refuses other weights.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
        lookahead: Callable[[list[int]], None] | None = None,
        ahead: int = 0,
        weights: torch.Tensor | None = None,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        if self.num_samples == 0:
            raise ValueError("cannot batch an empty dataset")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.collate_fn, self.pin_memory = collate_fn, pin_memory
        self.lookahead, self.ahead = lookahead, ahead
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float64)
            if weights.shape != (self.num_samples,):
                raise ValueError(f"weights {tuple(weights.shape)} for {self.num_samples} samples")
            if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
                raise ValueError("sampling weights must be finite, >= 0 and not all zero")
        self.weights = weights
        self.position = 0  # samples of the stream consumed by all ranks
        self._generation = 0  # bumped by __iter__/load_state_dict: stale iterators stop

    @property
    def epoch(self) -> int:
        return self.position // self.num_samples

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "seed": self.seed,
            "epoch": self.epoch,
            "num_samples": self.num_samples,
            "weights": weights_digest(self.weights),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("num_samples", self.num_samples)) != self.num_samples:
            raise ValueError(
                f"data cursor was saved over {state['num_samples']} samples but the data set "
                f"now has {self.num_samples}: the saved position means nothing here"
            )
        saved = state.get("weights", "uniform")  # cursors saved before weights were uniform
        if saved != weights_digest(self.weights):
            raise ValueError(
                f"data cursor was saved with sampling weights {saved} but this run draws with "
                f"{weights_digest(self.weights)}: the saved position means another stream"
            )
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"data cursor position must be >= 0, got {position}")
        self.position, self.seed = position, int(state["seed"])
        self._generation += 1

    def __iter__(self) -> Iterator[Any]:
        # Claimed now, not at the first next(): the newest iterator is the live one.
        self._generation += 1
        sampler = StreamBatchSampler(
            self.num_samples,
            self.batch_size,
            self.seed,
            self.rank,
            self.world_size,
            self.position,
            self.lookahead,
            self.ahead,
            self.weights,
        )
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.pin_memory,
            # Worker seeds from the cursor, not the global generator, so a resumed run's
            # workers draw the same random numbers as an uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.position),
        )
        return self._advance(loader, self._generation)

    def _advance(self, loader: DataLoader, generation: int) -> Iterator[Any]:
        batches = iter(loader)
        # Checked before each fetch: a stale iterator (the cursor was reset or a newer
        # iterator took over) stops without reading anything more.
        while generation == self._generation:
            batch = next(batches)  # the sampler is infinite
            self.position += self.batch_size * self.world_size
            yield batch


# ----------------------------------------------------------------------- the loaders


class ShardLoader:
    """The training reader of one split: index + dataset + resumable cursor.

    Yields ``{"image": (B', 3, R, R) float32 in [-1, 1], "caption": [str], "key": [str],
    "skipped": int, "skipped_keys": [str]}`` forever; ``B' < B`` only when corrupt samples
    were dropped, and a batch with nothing left is not yielded (its count carries over).
    """

    def __init__(
        self,
        split_dir: str | os.PathLike,
        batch_size: int,
        resolution: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        if resolution <= 0:
            raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
        self.index = load_index(split_dir)
        self.dataset = ShardDataset(self.index, resolution)
        ahead = remote.prefetch_depth() if isinstance(self.index, RemoteIndex) else 0
        self.batches = ResumableBatches(
            self.dataset,
            batch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            collate_fn=functools.partial(collate_samples, resolution=resolution),
            pin_memory=pin_memory,
            lookahead=self.index.prefetch if ahead else None,
            ahead=ahead,
        )
        self.skipped_total = 0  # corrupt samples this rank has dropped since the start

    @classmethod
    def from_config(
        cls,
        cfg: DataConfig,
        split: str = "train",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> ShardLoader:
        cfg.configure_remote()
        return cls(
            cfg.split_dir(split),
            cfg.batch_size,
            cfg.resolution,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_workers=cfg.num_workers,
            pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        )

    def state_dict(self) -> dict[str, Any]:
        return {**self.batches.state_dict(), "skipped": self.skipped_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)
        self.skipped_total = int(state.get("skipped", 0))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._drop_empty(iter(self.batches))  # claims the cursor now (see above)

    def _drop_empty(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        carried, empty_run = 0, 0
        # More empty batches in a row than a rank's share of an epoch: nothing is usable.
        limit = -(-len(self.dataset) // self.batches.batch_size) + 1
        for batch in batches:
            self.skipped_total += batch["skipped"]
            if len(batch["key"]) == 0:
                carried, empty_run = carried + batch["skipped"], empty_run + 1
                if empty_run > limit:
                    raise RuntimeError(f"every sample read from {self.index.folder} is corrupt")
                continue
            batch["skipped"] += carried
            carried, empty_run = 0, 0
            yield batch


def iter_split(
    split_dir: str | os.PathLike,
    batch_size: int,
    resolution: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> Iterator[dict[str, Any]]:
    """One ordered pass over a split (validation): rank ``r`` gets the ``r``-th contiguous
    chunk of ``ceil(N / W)`` samples (the last rank may get fewer), in batches of the same
    form as ``ShardLoader``'s. Finite; no sample on two ranks."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    total = len(load_index(split_dir))
    chunk = -(-total // world_size)
    mine = range(rank * chunk, min(total, (rank + 1) * chunk))
    yield from iter_rows(split_dir, mine, batch_size, resolution, num_workers)


def iter_rows(
    split_dir: str | os.PathLike,
    rows: range,
    batch_size: int,
    resolution: int,
    num_workers: int = 0,
) -> Iterator[dict[str, Any]]:
    """The samples ``rows`` of a split in order, in batches of the form of ``ShardLoader``'s
    (an all-corrupt batch is not yielded: its count goes with the next one)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not rows:
        return
    index = load_index(split_dir)
    if isinstance(index, RemoteIndex):  # an ordered pass: fetch its shards ahead, in order
        for shard in range(int(index.shard[rows[0]]), int(index.shard[rows[-1]]) + 1):
            index.prefetch_shard(shard)
    dataset = ShardDataset(index, resolution)
    batches = [list(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=functools.partial(collate_samples, resolution=resolution),
    )
    carried = 0
    for batch in loader:
        if not batch["key"]:
            carried += batch["skipped"]
            continue
        batch["skipped"] += carried
        carried = 0
        yield batch
    if carried:
        log.warning("%d corrupt samples at the end of %s were skipped", carried, split_dir)
