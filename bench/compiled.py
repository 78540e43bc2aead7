"""``--compile`` on a trained export: compile time, then eager vs compiled seconds per image.

    .venv/bin/python -m bench.compiled --runs runs --preset tiny [--n 1 --n 16] [--rounds 3]

Two pipelines from the same export in one process: one eager, one with
``pipeline.compiled.compile_models``. The compiled one's first call of each batch size is
its compile time (reported apart); then the two alternate (ABBA) for ``rounds`` rounds and
the medians are printed, with the largest pixel difference between their images. The
sampling settings are the preset's defaults (``configs/<preset>/sample.toml``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.__main__ import export_folders, sample_config
from pipeline.compiled import compile_models, warm_up
from pipeline.text2image import Text2Image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compiled", description=__doc__)
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--n", type=int, action="append", help="batch sizes (default 1, 16)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args(argv)
    for name in ("vae", "clip", "unet", "device", "threads", "compile"):
        setattr(args, name, None)
    for name in ("steps", "cfg_scale", "sampler", "shift", "eta", "cfg_interval", "seed"):
        setattr(args, name, None)
    config = sample_config(args)
    folders = export_folders(args)
    eager = Text2Image.from_exports(folders, "cpu", args.precision)
    compiled = Text2Image.from_exports(folders, "cpu", args.precision)
    compile_models(compiled.models)
    s = config.sampling(eager.defaults)
    print(f"{args.preset} defaults: {s}; torch threads {torch.get_num_threads()}")

    def run(pipe: Text2Image, n: int):
        return pipe.generate(
            ["red heart"] * n,
            seed=0,
            steps=s.steps,
            cfg_scale=s.cfg_scale,
            sampler=s.sampler,
            shift=s.shift,
            cfg_interval=s.cfg_interval,
        )

    for n in args.n or [1, 16]:
        seconds = warm_up(lambda n=n: run(compiled, n))
        run(eager, n)
        print(f"batch {n}: compile + first call {seconds:.1f} s")
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for r in range(args.rounds):
            order = [("eager", eager), ("compiled", compiled)][:: 1 if r % 2 == 0 else -1]
            for name, pipe in order:
                start = time.perf_counter()
                images = run(pipe, n)
                times[name].append((time.perf_counter() - start) / n)
                if name == "eager":
                    a = np.asarray(images[0].image, dtype=np.int16)
                else:
                    b = np.asarray(images[0].image, dtype=np.int16)
        e, c = (statistics.median(times[k]) for k in ("eager", "compiled"))
        print(
            f"batch {n}: eager {e * 1e3:.1f} ms/image, compiled {c * 1e3:.1f} ms/image "
            f"({e / c:.2f}x); max pixel difference {int(np.abs(a - b).max())} of 255"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
