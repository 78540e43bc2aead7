"""Pass one of a build: decide which sample goes to which shard before any pixel is decoded.

The source is read once cheaply (keys, captions, a sha256 of the image bytes). Samples with
no usable caption, a key or image bytes seen before, or a skip flag from the source are
counted and dropped; the rest go to ``train`` or ``val`` by a hash of their split key, and
each split is cut into shards of ``shard_size`` samples in source order. Membership is
therefore fixed by the source alone: an image that later fails to decode leaves its shard
one sample short instead of shifting every later shard, so a re-run regenerates identical
shards and can skip the finished ones (``PlannedShard.fingerprint`` identifies content).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from tqdm import tqdm

from .sample import (
    DUPLICATE_IMAGE,
    DUPLICATE_KEY,
    EMPTY_CAPTION,
    MISSING_CAPTION,
    MISSING_IMAGE,
    RawSample,
)

SPLITS = ("train", "val")


def split_of(split_key: str, val_fraction: float) -> str:
    """``val`` for a stable ``val_fraction`` of keys: the first 64 bits of sha256 as a uniform."""
    value = int.from_bytes(hashlib.sha256(split_key.encode()).digest()[:8], "big")
    return "val" if value < val_fraction * 2**64 else "train"


def image_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record_digest(sample: RawSample) -> str:
    """Everything about a sample that ends up in a shard (the pixels via their source bytes)."""
    record = {
        "key": sample.key,
        "caption": sample.caption,
        "kind": sample.kind,
        "meta": sample.meta,
        "image": image_digest(sample.data or b""),
    }
    text = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


@dataclass(frozen=True)
class PlannedShard:
    split: str
    index: int
    keys: tuple[str, ...]
    fingerprint: str  # sha256 over its samples' record digests, in order

    @property
    def name(self) -> str:
        return shard_name(self.index)


@dataclass
class Plan:
    shards: dict[str, list[PlannedShard]]  # split -> shards in order
    assignment: dict[str, PlannedShard]  # key -> the shard it goes to
    records: dict[str, str]  # key -> record digest, checked again when the pixels are read
    skipped: dict[str, Counter] = field(default_factory=dict)  # split -> reason -> count


def _skip_reason(sample: RawSample, seen_keys: set[str], seen_images: set[str]) -> str | None:
    if sample.key in seen_keys:
        return DUPLICATE_KEY
    seen_keys.add(sample.key)
    if sample.skip:
        return sample.skip
    if sample.caption is None:
        return MISSING_CAPTION
    if not sample.caption.strip():
        return EMPTY_CAPTION
    if not sample.data:
        return MISSING_IMAGE
    digest = image_digest(sample.data)
    if digest in seen_images:
        return DUPLICATE_IMAGE
    seen_images.add(digest)
    return None


def make_plan(samples: Iterable[RawSample], val_fraction: float, shard_size: int) -> Plan:
    seen_keys: set[str] = set()
    seen_images: set[str] = set()
    skipped = {split: Counter() for split in SPLITS}
    accepted: dict[str, list[tuple[str, str]]] = {split: [] for split in SPLITS}
    for sample in tqdm(samples, desc="scan", unit=" samples", mininterval=1.0, leave=False):
        split = split_of(sample.split_key or sample.key, val_fraction)
        reason = _skip_reason(sample, seen_keys, seen_images)
        if reason is not None:
            skipped[split][reason] += 1
        else:
            accepted[split].append((sample.key, record_digest(sample)))

    shards: dict[str, list[PlannedShard]] = {}
    assignment: dict[str, PlannedShard] = {}
    records: dict[str, str] = {}
    for split, items in accepted.items():
        shards[split] = []
        for index, start in enumerate(range(0, len(items), shard_size)):
            chunk = items[start : start + shard_size]
            fingerprint = hashlib.sha256("".join(d for _, d in chunk).encode()).hexdigest()
            shard = PlannedShard(split, index, tuple(k for k, _ in chunk), fingerprint)
            shards[split].append(shard)
            for key, digest in chunk:
                assignment[key] = shard
                records[key] = digest
    return Plan(shards, assignment, records, skipped)
