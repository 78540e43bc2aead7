"""The shared encode-once cache (stages/common/cache.py): rows equal a fresh encode, read
memory-mapped; a hit encodes nothing; a damaged or missing shard alone is encoded again;
other inputs give another folder. With two gloo processes: each rank builds its own shards,
a killed build resumes with what is missing, and training from the cache equals training
from an in-RAM copy of it bitwise."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from toy_stage import colour_summary, two_rank_env

from stages.common.cache import CacheConfig, CachedRows, cached_batches, ensure_cache
from stages.common.data import iter_split
from stages.common.files import sha256_file

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
CFG = CacheConfig(shard_size=40, batch_size=16)


class Counting:
    """An encode function that counts the samples it saw."""

    def __init__(self):
        self.keys: list[str] = []

    def __call__(self, batch):
        self.keys += batch["key"]
        return {"x": colour_summary(batch["image"]), "mask": batch["image"][:, 0, 0, :4] > 0}


def build(root: Path, shards: Path, encode, parts=None) -> CachedRows:
    return ensure_cache(root, parts or {"encoder": "test"}, encode, shards / "train", 16, CFG)


def test_rows_equal_a_fresh_encode_and_are_memory_mapped(tiny_shards, tmp_path):
    encode = Counting()
    rows = build(tmp_path, tiny_shards, encode)
    assert len(rows) == 96 and len(encode.keys) == 96
    (folder,) = tmp_path.iterdir()
    index = json.loads((folder / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [40, 40, 16]
    for shard in index["shards"]:
        assert sha256_file(folder / shard["name"]) == shard["sha256"]
    batches = list(iter_split(tiny_shards / "train", 96, 16))
    fresh = colour_summary(batches[0]["image"])
    order = [5, 95, 0, 41, 40, 39]  # rows across the three shards, out of order
    got = rows.__getitems__(order)
    assert torch.equal(got["x"], fresh[order])
    assert got["key"] == [batches[0]["key"][i] for i in order]
    assert got["caption"] == [batches[0]["caption"][i] for i in order]
    assert got["mask"].dtype == torch.bool and got["mask"].shape == (6, 4)
    # The same bytes a plain safetensors load gives; the maps are numpy memmaps of the file.
    whole = load_file(str(folder / index["shards"][1]["name"]))
    assert torch.equal(whole["x"][1], rows[41]["x"])
    assert rows[41]["key"] == batches[0]["key"][41]
    view = rows._maps[1]["x"]  # a view of the file's one memory map
    while view is not None and not isinstance(view, np.memmap | mmap.mmap):
        view = getattr(view, "base", None)
    assert view is not None
    # A DataLoader worker maps the files itself and yields the same stream.
    one = cached_batches(rows, 8, seed=3, rank=0, world_size=1)
    two = cached_batches(rows, 8, seed=3, rank=0, world_size=1, num_workers=1)
    for a, b, _ in zip(one, two, range(3)):
        assert a["key"] == b["key"] and torch.equal(a["x"], b["x"])


def test_a_hit_encodes_nothing_and_damage_is_encoded_again_alone(tiny_shards, tmp_path):
    build(tmp_path, tiny_shards, Counting())
    (folder,) = tmp_path.iterdir()
    again = Counting()
    build(tmp_path, tiny_shards, again)
    assert again.keys == []
    shard = folder / "shard-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the data of shard 1
    shard.write_bytes(bytes(data))
    (folder / "shard-000002.json").unlink()  # shard 2 was never committed
    again = Counting()
    rows = build(tmp_path, tiny_shards, again)
    assert again.keys == [f"train{i:06d}" for i in range(40, 96)]  # shards 1 and 2 only
    assert (
        len(rows) == 96
        and sha256_file(shard) == json.loads((folder / "shard-000001.json").read_text())["sha256"]
    )
    # Other inputs (another export hash): another folder; the stale one is removed.
    other = Counting()
    build(tmp_path, tiny_shards, other, parts={"encoder": "test", "vae": "another"})
    assert len(other.keys) == 96
    assert [p.name for p in tmp_path.iterdir()] != [folder.name] and len(os.listdir(tmp_path)) == 1


# ------------------------------------------------------------------- two gloo processes


def launch(runs: Path, shards: Path, *overrides: str) -> list[subprocess.CompletedProcess]:
    """The toy stage as two plain rank processes (as a scheduler starts them)."""
    (runs / "configs" / "tiny").mkdir(parents=True, exist_ok=True)
    env = two_rank_env()
    command = [sys.executable, str(TESTS / "toy_stage.py"), "--configs", str(runs / "configs")]
    command += ["--runs", str(runs), "--data", str(shards), "toy.source=cache"]
    command += ["train.max_steps=6", "ckpt.every_steps=0", *overrides]
    ranks = [
        subprocess.Popen(
            command,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        outs = [rank.communicate(timeout=240) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    return [subprocess.CompletedProcess(command, r.returncode, *o) for r, o in zip(ranks, outs)]


def encoded(runs: Path, rank: int) -> list[str]:
    path = runs / "tiny" / "toy" / f"encoded.rank{rank}.jsonl"
    return [k for line in path.read_text().splitlines() for k in json.loads(line)]


def shard_keys(*numbers: int) -> list[str]:
    return [f"train{i:06d}" for n in numbers for i in range(16 * n, 16 * n + 16)]


def test_two_ranks_build_in_parallel_resume_a_killed_build_and_train_as_from_ram(
    tiny_shards, tmp_path
):
    cache, ram = tmp_path / "cache", tmp_path / "ram"
    # A parallel build whose rank 1 dies after its first shard: rank 0 learns of it.
    done = launch(cache, tiny_shards, "toy.kill_encoding_rank=1")
    assert done[1].returncode == 9 and done[0].returncode != 0
    assert "Connection" in done[0].stderr or "failed" in done[0].stderr
    folder = next((cache / "tiny" / "toy" / "cache").iterdir())
    assert not (folder / "index.json").exists()
    # Shards of 16: rank 0 encoded shards 0, 2, 4, rank 1 shard 1 and died in shard 3.
    assert encoded(cache, 0) == shard_keys(0, 2, 4) and encoded(cache, 1) == shard_keys(1)
    committed = sorted(p.name for p in folder.glob("shard-*.json"))
    assert committed == [f"shard-00000{n}.json" for n in (0, 1, 2, 4)]

    # The re-run encodes only what was not committed, then trains.
    done = launch(cache, tiny_shards)
    assert [d.returncode for d in done] == [0, 0], done[0].stderr[-3000:] + done[1].stderr[-3000:]
    assert encoded(cache, 0) == shard_keys(0, 2, 4)
    assert encoded(cache, 1) == shard_keys(1, 3, 5)
    index = json.loads((folder / "index.json").read_text())
    assert index["num_samples"] == 96 and len(index["shards"]) == 6
    assert all(sha256_file(folder / s["name"]) == s["sha256"] for s in index["shards"])

    # The same training from an in-RAM copy of the rows (the old caches' path).
    done = launch(ram, tiny_shards, "toy.source=cache_ram")
    assert [d.returncode for d in done] == [0, 0], done[0].stderr[-3000:] + done[1].stderr[-3000:]
    for rank in (0, 1):
        seen = [(r / "tiny/toy" / f"seen.rank{rank}.jsonl").read_text() for r in (cache, ram)]
        assert seen[0] == seen[1]
    weights = [load_file(str(r / "tiny/toy/export/model.safetensors")) for r in (cache, ram)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    ids = [
        k
        for r in (0, 1)
        for line in (cache / f"tiny/toy/seen.rank{r}.jsonl").open()
        for k in json.loads(line)["ids"]
    ]
    assert len(ids) == len(set(ids)) == 2 * 6 * 4  # 48 of 96: no sample twice
