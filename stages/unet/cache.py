"""The latent and text cache: encode the train split once with the frozen VAE and CLIP.

Training the UNet needs, per sample, a VAE latent and the text encoder's states; both
networks are frozen, so encoding every step again is wasted work. ``ensure_cache`` encodes
the split once and stores per sample:

    latent_mean, latent_std  (C, h, w) float32   the raw VAE posterior: training samples
                                                 z = mean + std * eps, so sampling stays possible
    tokens (L, D), pooled (D,)  float16 (or float32)  the text encoder's output
    mask (L,) bool                                    True = real token
    caption (in index.json)                           re-encoded when captions are augmented

in safetensors shards plus ``index.json`` (every shard's sample count and sha256) under
``<run>/cache/<key>/``, where ``key`` = sha256 of (VAE export hash, CLIP export hash, shard
manifest digest, resolution, storage dtype). Any change of those gives another key, so a
stale cache is never read; a folder whose files are missing or fail their sha256 is rebuilt.
The folder is written under a temporary name and renamed into place: it is complete or absent.
Training reads it through ``ResumableBatches``, the shard reader's resumable cursor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from stages.clip.export import LoadedCLIP, TextCondition
from stages.common.data import iter_split
from stages.common.shards import manifest_digest, sha256_file, write_json_atomic
from stages.vae.export import LoadedVAE

log = logging.getLogger(__name__)

CACHE_FORMAT = "minisd-unet-cache/2"  # 2: the index holds the captions
INDEX = "index.json"
FIELDS = ("latent_mean", "latent_std", "tokens", "mask", "pooled")


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = True  # false: encode every batch on the fly (same maths, slower)
    text_dtype: Literal["float16", "float32"] = "float16"  # storage of tokens and pooled
    shard_size: int = 4096  # samples per safetensors file
    batch_size: int = 64  # encoding batch


class CacheError(RuntimeError):
    """A cache folder is incomplete, corrupt or keyed to other inputs."""


@torch.no_grad()
def encode_batch(
    vae: LoadedVAE, clip: LoadedCLIP, images: torch.Tensor, captions: list[str]
) -> dict[str, torch.Tensor]:
    """Images (B,3,H,W) in [-1,1] and captions -> the cached fields (on the encoders' device)."""
    mean, std = vae.encode(images)
    cond = clip.encode_text(list(captions))
    return {
        "latent_mean": mean,
        "latent_std": std,
        "tokens": cond.tokens,
        "mask": cond.mask,
        "pooled": cond.pooled,
    }


def cache_key(parts: dict[str, Any]) -> str:
    """sha256 of the inputs that determine the cache content (exports, shards, settings)."""
    payload = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def verify_cache(folder: Path, key: str) -> dict[str, Any]:
    """The index of a complete cache folder for ``key``; ``CacheError`` says what is wrong."""
    path = folder / INDEX
    if not path.exists():
        raise CacheError(f"{folder} has no {INDEX} (incomplete cache)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CacheError(f"{path} is not valid JSON: {err}") from err
    if index.get("format") != CACHE_FORMAT or index.get("key") != key:
        raise CacheError(f"{path} belongs to another cache key (stale)")
    for shard in index["shards"]:
        file = folder / shard["name"]
        if not file.exists():
            raise CacheError(f"{file} is missing (incomplete cache)")
        if sha256_file(file) != shard["sha256"]:
            raise CacheError(f"{file} does not match its sha256 in {path} (corrupt cache)")
    return index


def _write_shard(folder: Path, number: int, tensors: dict[str, torch.Tensor]) -> dict:
    name = f"shard-{number:06d}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name))
    with open(folder / name, "rb") as f:
        os.fsync(f.fileno())
    return {
        "name": name,
        "samples": int(tensors["mask"].shape[0]),
        "sha256": sha256_file(folder / name),
    }


def build_cache(
    folder: Path,
    key: str,
    parts: dict[str, Any],
    vae: LoadedVAE,
    clip: LoadedCLIP,
    split_dir: Path,
    resolution: int,
    cfg: CacheConfig,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Encode ``split_dir`` into ``folder`` (written as ``.<key>.tmp`` then renamed)."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    text_dtype = getattr(torch, cfg.text_dtype)
    shards: list[dict[str, Any]] = []
    pending: dict[str, list[torch.Tensor]] = {name: [] for name in FIELDS}
    keys: list[str] = []
    captions: list[str] = []
    skipped = 0
    start = time.perf_counter()
    batches = iter_split(split_dir, cfg.batch_size, resolution, num_workers=num_workers)
    for batch in batches:
        encoded = encode_batch(vae, clip, batch["image"], batch["caption"])
        for name in FIELDS:
            value = encoded[name].cpu()
            pending[name].append(value.to(text_dtype) if name in ("tokens", "pooled") else value)
        keys += batch["key"]
        captions += batch["caption"]
        skipped += batch.get("skipped", 0)
        while sum(len(v) for v in pending["mask"]) >= cfg.shard_size:
            merged = {name: torch.cat(values) for name, values in pending.items()}
            head = {name: value[: cfg.shard_size] for name, value in merged.items()}
            shards.append(_write_shard(tmp, len(shards), head))
            pending = {name: [value[cfg.shard_size :]] for name, value in merged.items()}
    if sum(len(v) for v in pending["mask"]):
        merged = {name: torch.cat(values) for name, values in pending.items()}
        shards.append(_write_shard(tmp, len(shards), merged))
    if not shards:
        raise CacheError(f"{split_dir} gave no usable sample to cache")
    index = {
        "format": CACHE_FORMAT,
        "key": key,
        "parts": parts,
        "num_samples": len(keys),
        "skipped": skipped,
        "latent_shape": list(encoded["latent_mean"].shape[1:]),
        "text_shape": list(encoded["tokens"].shape[1:]),
        "shards": shards,
        "keys": keys,
        "captions": captions,
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_json_atomic(tmp / INDEX, index)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return index


def ensure_cache(
    root: Path,
    vae: LoadedVAE,
    clip: LoadedCLIP,
    split_dir: Path,
    resolution: int,
    cfg: CacheConfig,
    build: bool = True,
    num_workers: int = 0,
) -> tuple[Path, dict[str, Any]]:
    """The verified cache folder for these inputs, built if missing, stale or corrupt.

    Other keys' folders under ``root`` are stale (other exports or shards) and are removed
    once the current one exists. With ``build=False`` (non-zero ranks) a missing or bad
    cache is an error instead.
    """
    parts = {
        "vae": vae.hash,
        "clip": clip.hash,
        "shards": manifest_digest(split_dir),
        "resolution": resolution,
        "text_dtype": cfg.text_dtype,
    }
    key = cache_key(parts)
    folder = Path(root) / key
    try:
        index = verify_cache(folder, key)
        log.info("latent cache hit: %s (%d samples)", folder, index["num_samples"])
    except CacheError as err:
        if not build:
            raise
        if folder.exists():
            log.warning("rebuilding the latent cache: %s", err)
        log.info("encoding %s into the latent cache %s", split_dir, folder)
        index = build_cache(folder, key, parts, vae, clip, split_dir, resolution, cfg, num_workers)
    for other in Path(root).iterdir():
        if other.name != key and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)  # stale: other exports, shards or settings
    return folder, index


class CachedLatents(Dataset):
    """Map-style view of a verified cache folder: item i -> dict of the cached fields."""

    def __init__(self, folder: Path, index: dict[str, Any]):
        loaded = [load_file(str(Path(folder) / s["name"])) for s in index["shards"]]
        self.tensors = {name: torch.cat([part[name] for part in loaded]) for name in FIELDS}
        self.keys = list(index["keys"])
        self.captions = list(index["captions"])
        if self.tensors["mask"].shape[0] != len(self.keys):
            raise CacheError(f"{folder}: {INDEX} lists {len(self.keys)} keys but shards differ")

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**{name: t[i] for name, t in self.tensors.items()}, "caption": self.captions[i]}

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        # One gather per field for the whole batch (DataLoader's batched fetch).
        rows = torch.as_tensor(indices, dtype=torch.long)
        batch: dict[str, Any] = {name: t[rows] for name, t in self.tensors.items()}
        batch["caption"] = [self.captions[i] for i in indices]  # for caption augmentation
        return batch


def collate_cached(batch: dict[str, Any]) -> dict[str, Any]:
    """``__getitems__`` already returns a stacked batch."""
    return batch


def latents_and_condition(
    batch: dict[str, torch.Tensor], vae: LoadedVAE, device: torch.device
) -> tuple[torch.Tensor, TextCondition]:
    """Cached (or freshly encoded) fields -> normalised latents x0 and the text condition.

    z = mean + std * eps draws from the posterior (global RNG, saved by the trainer), and the
    UNet sees (z - latent_mean) / latent_std with the VAE export's statistics.
    """
    mean = batch["latent_mean"].to(device, torch.float32)
    std = batch["latent_std"].to(device, torch.float32)
    z = mean + std * torch.randn(mean.shape, device=device)
    cond = TextCondition(
        batch["tokens"].to(device, torch.float32),
        batch["mask"].to(device, torch.bool),
        batch["pooled"].to(device, torch.float32),
    )
    return vae.normalize(z), cond
