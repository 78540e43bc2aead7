"""Scale-out: the encode-once cache built by 1 and 2 processes, resident memory per rank while
training from it at 10k and 100k samples, and shards over HTTP vs local files.

    .venv/bin/python -m bench --only scale --write     # into bench/RESULTS.md
    .venv/bin/python -m bench.scale [--quick]          # print the figures

- **Cache build**: the UNet stage's encode function (tiny-preset VAE and CLIP exports from
  untrained models: the speed does not depend on the weights) over 32 px synthetic shards,
  ``stages.common.cache.ensure_cache`` in 1 process, then in 2 gloo processes (each encodes
  its cache shards); the time is from the process group's start to the last rank's return.
- **Memory**: synthetic caches of the tiny UNet's fields (latent mean and std 4x8x8 fp32,
  text states 32x128 fp16, mask, pooled: 9.3 KB a sample) with 10k and 100k samples, read by
  a fresh process through ``CachedRows`` (memory-mapped) and, for comparison, through an
  in-RAM copy (what the old caches did) or, with ``--modes mmap,safe_open``, through
  safetensors' own ``safe_open``/``get_slice`` (the alternative the cache measured and did not
  take: stages/common/cache.py), for ``STEPS`` batches of 64 with a small model's
  training step on each. Reported from /proc/self/status at the end: RssAnon (the process's
  own memory) and RssFile (mapped file pages: page cache, shared and reclaimable).
- **Remote**: ``bench/reader_throughput.py``'s 64 px shards served by ``python -m
  http.server`` on 127.0.0.1, read by ``ShardLoader`` from the folder, from the URL with an
  empty shard cache (every shard fetched on the way) and again with it filled; each step
  waits for its batch then computes for ~20 ms (a matmul), so prefetching can overlap.
  *Data wait* is the median time a step spends in ``next(loader)`` (memory: and its mean CPU
  time, which a shared machine's load leaves out).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .data import Figure

REPO = Path(__file__).resolve().parents[1]
ROOT = Path(tempfile.gettempdir()) / "minisd-scale-bench"
STEPS = 600
BATCH = 64


def _status() -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[name] = int(value.split()[0]) / 1024
    return out


def _child(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "bench.scale", *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench.scale {args[0]} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------ cache build


def _build_child(runs: str, shards: str, rank: str, world: str, init: str) -> dict:
    from stages.clip.export import load_clip
    from stages.common.cache import CacheConfig, ensure_cache
    from stages.unet.encode import encode_batch
    from stages.vae.export import load_vae

    torch.set_num_threads(1)
    rank_i, world_i = int(rank), int(world)
    if world_i > 1:
        torch.distributed.init_process_group(
            "gloo", init_method=init, rank=rank_i, world_size=world_i
        )
    vae = load_vae(Path(runs) / "tiny" / "vae" / "export")
    clip = load_clip(Path(runs) / "tiny" / "clip" / "export")
    if world_i > 1:
        torch.distributed.barrier()
    start = time.perf_counter()

    def encode(batch):
        return encode_batch(vae, clip, batch["image"], batch["caption"], torch.float16)

    cfg = CacheConfig(shard_size=128, batch_size=64)
    rows = ensure_cache(
        Path(runs) / "cache", {"bench": 1}, encode, Path(shards) / "train", 32, cfg, rank_i, world_i
    )
    seconds = time.perf_counter() - start
    if world_i > 1:
        torch.distributed.destroy_process_group()
    return {"seconds": seconds, "samples": len(rows)}


def build_figures(samples: int) -> list[Figure]:
    sys.path.insert(0, str(REPO / "tests"))
    from synthetic import make_shards

    from .data import _tiny_exports

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = make_shards(root / "shapes-32", n_train=samples, resolution=32, shard_size=128)
        _tiny_exports(root / "exports", shards)
        for world in (1, 2):
            runs = root / f"runs-{world}"
            (runs / "tiny").mkdir(parents=True)
            for stage in ("vae", "clip"):
                os.symlink(root / "exports" / "tiny" / stage, runs / "tiny" / stage)
            init = f"file://{root / f'rendezvous-{world}'}"
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
            procs = [
                subprocess.Popen(
                    [sys.executable, "-m", "bench.scale", "--build-child", str(runs), str(shards)]
                    + [str(r), str(world), init],
                    env=env,
                    cwd=REPO,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for r in range(world)
            ]
            results = []
            for p in procs:
                stdout, stderr = p.communicate()
                if p.returncode != 0:
                    raise RuntimeError(f"cache build child failed: {stderr[-2000:]}")
                results.append(json.loads(stdout.strip().splitlines()[-1]))
            seconds = max(r["seconds"] for r in results)
            out.append(
                Figure(
                    f"cache build, {world} process{'es' if world > 1 else ''}",
                    samples / seconds,
                    "samples/s",
                    f"{samples} samples (32 px, tiny VAE + CLIP) in {seconds:.1f} s",
                )
            )
    return out


# --------------------------------------------------------------------------- memory


def synthetic_cache(samples: int) -> Path:
    """A cache folder of ``samples`` random rows with the tiny UNet's fields (written once)."""
    from stages.common.cache import INDEX, _commit_shard, _index, _strings

    folder = ROOT / f"cache-{samples}" / f"synthetic-{samples}"
    if (folder / INDEX).exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(samples)
    records = []
    for number, start in enumerate(range(0, samples, 4096)):
        n = min(4096, samples - start)
        keys = [f"s{i:08d}" for i in range(start, start + n)]
        tensors = {
            "latent_mean": torch.randn(n, 4, 8, 8, generator=generator),
            "latent_std": torch.rand(n, 4, 8, 8, generator=generator),
            "tokens": torch.randn(n, 32, 128, generator=generator).half(),
            "mask": torch.ones(n, 32, dtype=torch.bool),
            "pooled": torch.randn(n, 128, generator=generator).half(),
        }
        tensors["key_bytes"], tensors["key_offsets"] = _strings(keys)
        tensors["caption_bytes"], tensors["caption_offsets"] = _strings(
            [f"caption {k}" for k in keys]
        )
        info = {"samples": n, "skipped": 0, "rows": [start, start + n]}
        records.append(_commit_shard(folder, number, folder.name, tensors, info))
    from stages.common.files import write_json_atomic

    write_json_atomic(folder / INDEX, _index(folder.name, {"synthetic": samples}, records))
    return folder


class _InMemory(torch.utils.data.Dataset):
    """Every row in RAM, gathered per batch: the old caches' path."""

    def __init__(self, folder: Path, index: dict):
        from safetensors.torch import load_file

        parts = [load_file(str(folder / s["name"])) for s in index["shards"]]
        names = ("latent_mean", "latent_std", "tokens", "mask", "pooled")
        self.tensors = {n: torch.cat([p[n] for p in parts]) for n in names}

    def __len__(self) -> int:
        return len(self.tensors["mask"])

    def __getitems__(self, indices: list[int]) -> dict:
        rows = torch.as_tensor(indices)
        return {n: t[rows] for n, t in self.tensors.items()}


def _safe_open_rows(folder: Path, index: dict):
    """``CachedRows`` reading through safetensors' own memory-mapped access instead of numpy
    views of the file: one ``safe_open`` handle per shard file, each row a ``get_slice`` (it
    takes slices, not index arrays, so a shuffled batch is one call per row and tensor)."""
    from safetensors import safe_open

    from stages.common.cache import MAX_OPEN, TEXT_FIELDS, TEXT_TENSORS, CachedRows

    class SafeOpenRows(CachedRows):
        def _shard(self, number: int):
            handle = self._maps.get(number)
            if handle is None:
                while len(self._maps) >= MAX_OPEN:
                    self._maps.popitem(last=False)
                path = str(self.folder / self.names[number])
                handle = self._maps[number] = safe_open(path, framework="pt")
            self._maps.move_to_end(number)
            return handle

        def __getitems__(self, indices: list[int]) -> dict:
            shards, local = self._locate(indices)
            out: dict = {}
            strings = {name: [""] * len(indices) for name in TEXT_FIELDS}
            for number in torch.unique(torch.as_tensor(shards)).tolist():
                where = torch.nonzero(torch.as_tensor(shards) == number)[:, 0]
                handle, rows = self._shard(number), local[where.numpy()].tolist()
                for name in handle.keys():
                    if name in TEXT_TENSORS:
                        continue
                    view = handle.get_slice(name)
                    block = torch.cat([view[r : r + 1] for r in rows])
                    if name not in out:
                        out[name] = torch.empty((len(indices), *block.shape[1:]), dtype=block.dtype)
                    out[name][where] = block
                for name in TEXT_FIELDS:
                    data, offsets = (
                        handle.get_slice(f"{name}_bytes"),
                        handle.get_slice(f"{name}_offsets"),
                    )
                    for at, row in zip(where.tolist(), rows):
                        begin, end = offsets[row : row + 2].tolist()
                        strings[name][at] = bytes(data[begin:end].numpy()).decode()
            return {**out, **strings, "skipped": 0}

    return SafeOpenRows(folder, index)


def _rss_child(folder: str, mode: str, steps: str) -> dict:
    from stages.common.cache import CachedRows, cached_batches, read_index
    from stages.common.data import ResumableBatches

    torch.set_num_threads(1)
    torch.manual_seed(0)
    index = read_index(Path(folder))
    if mode == "mmap":
        loader = cached_batches(CachedRows(Path(folder), index), BATCH, 0, 0, 1)
    elif mode == "safe_open":
        loader = cached_batches(_safe_open_rows(Path(folder), index), BATCH, 0, 0, 1)
    else:
        data = _InMemory(Path(folder), index)
        loader = ResumableBatches(data, BATCH, collate_fn=lambda b: b)
    model = torch.nn.Sequential(
        torch.nn.Linear(256 + 128, 256), torch.nn.SiLU(), torch.nn.Linear(256, 256)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = iter(loader)
    waits, cpu, first = [], [], None
    for step in range(int(steps)):
        start, start_cpu = time.perf_counter(), time.process_time()
        batch = next(batches)
        waits.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)  # what a shared machine's load leaves out
        x = (
            batch["latent_mean"] + batch["latent_std"] * torch.randn_like(batch["latent_std"])
        ).flatten(1)
        inputs = torch.cat([x, batch["pooled"].float()], dim=1)
        loss = (model(inputs) - x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 10:
            first = _status()
    return {
        "first": first,
        "last": _status(),
        "wait_ms": statistics.median(waits) * 1e3,
        "cpu_ms": statistics.mean(cpu[10:] or cpu) * 1e3,
    }


def memory_figures(
    sizes: tuple[int, ...], steps: int, modes: tuple[str, ...] = ("mmap", "ram")
) -> list[Figure]:
    out = []
    for samples in sizes:
        folder = synthetic_cache(samples)
        for mode in modes:
            got = _child("--rss-child", str(folder), mode, str(steps))
            last, first = got["last"], got["first"]
            what = {
                "mmap": "memory-mapped cache",
                "safe_open": "safetensors safe_open + get_slice",
                "ram": "in-RAM copy (old path)",
            }[mode]
            out.append(
                Figure(
                    f"RSS per rank, {samples // 1000}k cached samples, {what}",
                    last["RssAnon"],
                    "MiB RssAnon",
                    f"RssFile {last['RssFile']:.0f} MiB, VmHWM {last['VmHWM']:.0f} MiB after "
                    f"{steps} steps of {BATCH} (RssAnon {first['RssAnon']:.0f} at step 10); "
                    f"data wait {got['wait_ms']:.2f} ms/step ({got['cpu_ms']:.2f} ms CPU)",
                )
            )
    return out


# --------------------------------------------------------------------------- remote


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _reader_pass(split: str, steps: int) -> tuple[float, float]:
    """(images/s over the time spent waiting for batches, median data wait per step in s)."""
    from stages.common.data import ShardLoader

    loader = ShardLoader(split, 32, 64, seed=0)
    work = torch.randn(384, 384)
    waits, images = [], 0
    batches = iter(loader)
    for _ in range(steps):
        start = time.perf_counter()
        batch = next(batches)
        waits.append(time.perf_counter() - start)
        images += len(batch["key"])
        for _ in range(12):  # ~20 ms of "training step" on one thread
            work = torch.tanh(work @ work.T / 384)
    return images / sum(waits), statistics.median(waits)


def remote_figures(steps: int) -> list[Figure]:
    from stages.common import remote

    from . import reader_throughput as reader

    torch.set_num_threads(1)
    root = Path(tempfile.gettempdir()) / "minisd-reader-bench"
    split = reader.shards_at(root, 64)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    out = []
    try:
        url = f"http://127.0.0.1:{port}/{split.parent.name}/train"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                remote.read_text(f"{url}/manifest.json")
                break
            except Exception:
                time.sleep(0.2)
        with tempfile.TemporaryDirectory() as cache:
            remote.configure(cache, max_gb=10, prefetch=4)
            cases = [("local files", str(split)), ("HTTP, empty shard cache", url)]
            cases.append(("HTTP, shard cache filled", url))
            for name, where in cases:
                rate, wait = _reader_pass(where, steps)
                out.append(
                    Figure(
                        f"reader 64 px, {name}",
                        rate,
                        "images/s",
                        f"data wait {wait * 1e3:.1f} ms/step (median of {steps} steps of 32, "
                        "~20 ms compute each); 8 shards of 500 on 127.0.0.1",
                    )
                )
            remote.configure()
    finally:
        server.terminate()
        server.wait()
    return out


def figures(quick: bool = False) -> list[Figure]:
    out = build_figures(256 if quick else 1536)
    out += memory_figures((2_000, 10_000) if quick else (10_000, 100_000), 50 if quick else STEPS)
    out += remote_figures(10 if quick else 60)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--build-child":
        print(json.dumps(_build_child(*argv[1:])))
        return
    if argv and argv[0] == "--rss-child":
        print(json.dumps(_rss_child(*argv[1:])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="build,memory,remote")
    parser.add_argument("--modes", default="mmap,ram", help="memory: mmap, safe_open, ram")
    parser.add_argument("--samples", type=int, default=1536, help="build: samples encoded")
    args = parser.parse_args(argv)
    parts = args.only.split(",")
    found = []
    if "build" in parts:
        found += build_figures(256 if args.quick else args.samples)
    if "memory" in parts:
        sizes = (2_000, 10_000) if args.quick else (10_000, 100_000)
        modes = tuple(args.modes.split(","))
        found += memory_figures(sizes, 50 if args.quick else STEPS, modes)
    if "remote" in parts:
        found += remote_figures(10 if args.quick else 60)
    for f in found:
        print(f"| {f.name} | {f.value:,.2f} | {f.unit} | {f.note} |", flush=True)


if __name__ == "__main__":
    main()
