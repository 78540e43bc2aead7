"""Atomic shard files and the ledger of finished shards that lets a re-run skip them.

A shard is written to ``.shard-NNNNNN.tar.tmp``, flushed, fsynced and renamed to
``shard-NNNNNN.tar``: a half-written shard never carries its final name. Tar headers use a
fixed mtime and JSON is written with sorted keys, so the same samples give the same bytes.

The ledger (``.progress.json`` in the split folder, rewritten atomically after each
commit) records per shard the fingerprint of what it should contain, its sha256, sample
count and per-reason skips. A shard is finished when its file exists, its fingerprint
matches the plan and its bytes match the recorded sha256; anything else is rewritten.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds

from stages.common.files import fsync_path, sha256_file, write_json_atomic
from stages.common.shards import ShardInfo

LEDGER_NAME = ".progress.json"
TAR_MTIME = 1_700_000_000  # any fixed time: reproducible tar bytes


class ShardWriter:
    """One shard being written under a temporary name until ``commit``."""

    def __init__(self, folder: Path, name: str, image_ext: str):
        self.folder = Path(folder)
        self.name = name
        self.image_ext = image_ext
        self.tmp_path = self.folder / f".{name}.tmp"
        self.samples = 0
        self._file = open(self.tmp_path, "wb")  # closed in commit / abort
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=TAR_MTIME)

    def write(self, key: str, image: bytes, caption: str, meta: dict[str, Any]) -> None:
        self._tar.write(
            {
                "__key__": key,
                self.image_ext: image,
                "txt": caption.encode("utf-8"),
                "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
            }
        )
        self.samples += 1

    def commit(self) -> ShardInfo:
        self._tar.close()  # writes the end-of-archive blocks; the file stays ours
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self.folder / self.name
        os.replace(self.tmp_path, final)
        fsync_path(self.folder)
        return ShardInfo(self.name, self.samples, sha256_file(final))

    def abort(self) -> None:
        """Drop the temporary file (closing the tar stream first so it does not write later)."""
        if not self._file.closed:
            self._tar.close()
            self._file.close()
        self.tmp_path.unlink(missing_ok=True)


@dataclass
class LedgerEntry:
    fingerprint: str
    samples: int
    sha256: str
    skipped: dict[str, int] = field(default_factory=dict)  # decode-time skips in this shard
    groups: dict[str, int] = field(default_factory=dict)  # samples per source group


class ShardLedger:
    """The finished shards of one split folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LEDGER_NAME
        self.entries: dict[str, LedgerEntry] = {}
        if self.path.exists():
            try:
                raw = json.loads(self.path.read_text())
                self.entries = {n: LedgerEntry(**e) for n, e in raw["shards"].items()}
            except (ValueError, KeyError, TypeError):
                self.entries = {}  # unreadable ledger: every shard is rebuilt, nothing lost

    def is_finished(self, name: str, fingerprint: str) -> bool:
        entry = self.entries.get(name)
        path = self.folder / name
        if entry is None or entry.fingerprint != fingerprint or not path.exists():
            return False
        return sha256_file(path) == entry.sha256

    def record(self, info: ShardInfo, fingerprint: str, skipped: Counter, groups: Counter) -> None:
        self.entries[info.name] = LedgerEntry(
            fingerprint, info.samples, info.sha256, dict(skipped), dict(groups)
        )
        data = {"shards": {n: vars(e) for n, e in sorted(self.entries.items())}}
        write_json_atomic(self.path, data)

    def info(self, name: str) -> ShardInfo:
        entry = self.entries[name]
        return ShardInfo(name, entry.samples, entry.sha256)
