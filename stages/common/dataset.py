"""``ShardDataset``: map-style access to one split; ``ds[i]`` reads and decodes sample ``i``.

A corrupt sample (undecodable image, missing or empty caption, a member over its size cap)
becomes a marker that ``collate_samples`` drops and counts in ``batch["skipped"]``: it never
stops the loader. A shard that cannot be opened is no such sample: it stops the run
(``ShardUnavailable``). At most ``MAX_OPEN_SHARDS`` shards are open per process (least
recently used closed), so a data set of more shards than the open-file limit still reads
every sample; a forked DataLoader worker opens its own descriptors.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .decode import decode_image
from .remote import RemoteIndex, ShardUnavailable
from .shard_index import ShardIndex

log = logging.getLogger(__name__)

# Open shard files kept per process (and per DataLoader worker); far below the usual
# 1024-descriptor limit, and one shard serves many consecutive reads of a batch.
MAX_OPEN_SHARDS = 64
# Largest member a sample may have (bytes); a larger one is a skipped sample, never read.
MAX_MEMBER_BYTES = {"image": 64 << 20, "txt": 64 << 10, "json": 1 << 20}


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
