"""An optional latent cache: the train split encoded once by the frozen VAE.

The VAE is frozen and the images are not augmented, so the tower's input of every sample
never changes; on a CPU, encoding each batch again costs more than the CLIP step itself.
``ensure_latent_cache`` encodes the split in order (posterior mean, normalised with the
export's statistics) into one safetensors file whose metadata holds the captions and keys,
named by a hash of (VAE export hash, shard manifest digest, resolution): another VAE or
other data gives another file, so a stale cache is never read. It is written atomically by
the main process; other ranks wait for it. Training reads it through the shard reader's
resumable cursor (``ResumableBatches``), so resume stays exact. The whole split is held in
memory: meant for small data sets (the tiny preset), off by default.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from stages.common.data import ResumableBatches, iter_split
from stages.common.shards import manifest_digest
from stages.vae.export import LoadedVAE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatentCacheConfig:
    enabled: bool = False  # true: encode the train split once instead of every batch
    batch_size: int = 256  # encoding batch


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_file(path: Path, timeout_s: float = 3600.0) -> None:
    """Block a non-main rank until the main process has committed ``path``."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the main process did not write {path} within {timeout_s:.0f} s")
        time.sleep(1.0)


class CachedLatents(Dataset):
    """Map-style (latent (C, h, w), caption, key) samples held in memory."""

    def __init__(self, latents: torch.Tensor, captions: list[str], keys: list[str]):
        if not len(latents) == len(captions) == len(keys):
            raise ValueError("latents, captions and keys differ in length")
        self.latents, self.captions, self.keys = latents, captions, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"latent": self.latents[i], "caption": self.captions[i], "key": self.keys[i]}


def collate_latents(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "latent": torch.stack([s["latent"] for s in samples]),  # (B, C, h, w) normalised
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "skipped": 0,
    }


def cache_path(run_dir: Path, vae: LoadedVAE, split_dir: Path, resolution: int) -> Path:
    identity = f"{vae.hash}\n{manifest_digest(split_dir)}\n{resolution}\n"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return Path(run_dir) / "cache" / f"latents-{key}.safetensors"


@torch.no_grad()
def encode_split(
    vae: LoadedVAE, split_dir: Path, resolution: int, batch_size: int
) -> CachedLatents:
    """One ordered pass: normalised posterior means of every readable sample."""
    latents, captions, keys = [], [], []
    for batch in iter_split(split_dir, batch_size, resolution):
        mean, _ = vae.encode(batch["image"])
        latents.append(vae.normalize(mean).cpu())
        captions += batch["caption"]
        keys += batch["key"]
    if not keys:
        raise ValueError(f"{split_dir}: no readable sample to encode")
    return CachedLatents(torch.cat(latents), captions, keys)


def ensure_latent_cache(
    run_dir: Path, vae: LoadedVAE, split_dir: Path, resolution: int, batch_size: int
) -> CachedLatents:
    """Load the cache of this (VAE, data, resolution), encoding it first if absent."""
    path = cache_path(run_dir, vae, split_dir, resolution)
    if not path.exists():
        if is_main_process():
            started = time.monotonic()
            data = encode_split(vae, split_dir, resolution, batch_size)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            meta = {"captions": json.dumps(data.captions), "keys": json.dumps(data.keys)}
            save_file({"latents": data.latents.contiguous()}, str(tmp), metadata=meta)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            log.info(
                "encoded %d train samples in %.1f s -> %s",
                len(data),
                time.monotonic() - started,
                path,
            )
            return data
        wait_for_file(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        latents = f.get_tensor("latents")
    return CachedLatents(latents, json.loads(meta["captions"]), json.loads(meta["keys"]))


def cached_loader(
    data: CachedLatents, batch_size: int, seed: int, rank: int, world_size: int
) -> ResumableBatches:
    return ResumableBatches(
        data, batch_size, seed=seed, rank=rank, world_size=world_size, collate_fn=collate_latents
    )
