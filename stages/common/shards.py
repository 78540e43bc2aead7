"""The shard manifest: the contract between preprocessing and every reader.

A split folder (``data/<name>/train/``) holds immutable webdataset tars named
``shard-NNNNNN.tar`` in the img2dataset layout (``{key}.png|jpg|webp``, ``{key}.txt``,
``{key}.json``) and a ``manifest.json`` written last, atomically, listing every shard
with its sample count and sha256, plus resolution, source, licence and attribution.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .files import sha256_file, write_json_atomic

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
