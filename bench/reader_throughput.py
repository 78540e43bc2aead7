"""Shard reader throughput (images/s) on synthetic shards, 64 px and 512 px, 0 and 2 workers.

    .venv/bin/python bench/reader_throughput.py [--root /tmp/minisd-reader-bench]

The shards (tests/synthetic.py shapes, PNG) are written once under --root and reused. Each
measurement takes one warm-up batch (worker start-up, first file opens) then times the next
ones, a few times over (best and median are printed: the machine may be shared). The index
build is timed separately, from an empty process-level cache.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from synthetic import make_shards  # noqa: E402

from stages.common import data, shard_index  # noqa: E402

# resolution -> train samples written (enough for several timed batches without repeats)
SIZES = {64: 4000, 512: 600}
BATCH = 32


def shards_at(root: Path, resolution: int) -> Path:
    folder = root / f"shapes-{resolution}"
    if not (folder / "train" / "manifest.json").exists():
        started = time.perf_counter()
        make_shards(
            folder, n_train=SIZES[resolution], n_val=8, resolution=resolution, shard_size=500
        )
        print(
            f"wrote {SIZES[resolution]} samples at {resolution} px in {time.perf_counter() - started:.1f} s"
        )
    return folder / "train"


def images_per_second(split: Path, resolution: int, workers: int, batches: int) -> float:
    loader = data.ShardLoader(split, BATCH, resolution, seed=0, num_workers=workers)
    stream = iter(loader)
    next(stream)  # warm-up
    started = time.perf_counter()
    images = sum(len(next(stream)["key"]) for _ in range(batches))
    rate = images / (time.perf_counter() - started)
    del stream  # shuts the workers down before the next measurement
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/minisd-reader-bench"))
    parser.add_argument("--batches", type=int, default=10, help="timed batches of 32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for resolution in SIZES:
        split = shards_at(args.root, resolution)
        shard_index._INDEX_CACHE.clear()
        started = time.perf_counter()
        index = data.load_index(split)
        print(
            f"{resolution:>4} px: index of {len(index)} samples in "
            f"{(time.perf_counter() - started) * 1e3:.0f} ms"
        )
        for workers in (0, 2):
            # Best and median of a few repeats: the machine may be shared with other work.
            rates = sorted(
                images_per_second(split, resolution, workers, args.batches)
                for _ in range(args.repeats)
            )
            print(
                f"{resolution:>4} px, num_workers={workers}: best {rates[-1]:,.0f} images/s, "
                f"median {rates[len(rates) // 2]:,.0f} ({args.repeats} x {args.batches} batches "
                f"of {BATCH})"
            )


if __name__ == "__main__":
    main()
