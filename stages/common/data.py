"""The shard reader with a resumable cursor: ``ShardLoader`` (training), ``iter_split`` and
``iter_rows`` (ordered passes), and ``DataConfig``, the ``[data]`` section of every stage.

The reader is put together from one module per concept, each re-exported here, so
``from stages.common.data import ...`` names all of it:

- ``shard_index``: where every sample's bytes lie in the tars (a one-off index of the tar
  headers, rebuilt only when a file changed), local or remote.
- ``decode``: image bytes to the tensor training sees.
- ``dataset``: ``ShardDataset``, sample ``i`` read with one ``os.pread`` per member, a corrupt
  sample turned into a counted skip.
- ``sampler``: the sample stream (epoch permutations) and the cursor that resumes it exactly.

Here they meet: ``ShardLoader`` = index + dataset + cursor, and drops batches left empty by
corrupt samples, carrying their count to the next batch.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from . import remote
from .dataset import MAX_MEMBER_BYTES, MAX_OPEN_SHARDS, CorruptSample, ShardDataset, collate_samples
from .decode import decode_image, image_tensor
from .remote import RemoteIndex, is_remote
from .sampler import (
    ResumableBatches,
    StreamBatchSampler,
    epoch_draws,
    epoch_permutation,
    weights_digest,
)
from .shard_index import BUILD_HINT, ShardIndex, load_index, split_member_name

# The reader's parts, importable from here as before the split.
__all__ = [
    "BUILD_HINT",
    "CorruptSample",
    "DataConfig",
    "MAX_MEMBER_BYTES",
    "MAX_OPEN_SHARDS",
    "ResumableBatches",
    "ShardDataset",
    "ShardIndex",
    "ShardLoader",
    "StreamBatchSampler",
    "collate_samples",
    "decode_image",
    "epoch_draws",
    "epoch_permutation",
    "image_tensor",
    "iter_rows",
    "iter_split",
    "load_index",
    "split_member_name",
    "weights_digest",
]

log = logging.getLogger(__name__)


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
