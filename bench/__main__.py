"""``python -m bench``: run the benchmarks, print the tables, ``--write`` to RESULTS.md.

    .venv/bin/python -m bench                        # all, sized for < 15 min on a 2-core CPU
    .venv/bin/python -m bench --only unet_train,vae  # a subset
    .venv/bin/python -m bench --quick                # tiny presets: a smoke run of every path
    .venv/bin/python -m bench --full                 # full 20-step samplers on CPU as well
    .venv/bin/python -m bench --write                # also update bench/RESULTS.md

Benchmarks: unet_train (training step 256 and 512 px), unet_infer (20-step CFG sampling,
UNet only, batch 1 and 4), e2e (text encoder + sampling + VAE decode), quality (end to end at
equal quality: ours at the swept defaults of configs/tiny/sample.toml vs diffusers' 20-step
loop), vae (512 px encode and decode), data (reader images/s per worker; UNet stage from the
cache vs on the fly), gpu (MFU and torch.compile; skipped without CUDA), scale (cache build
with 1 and 2 processes, RSS per rank from the memory-mapped cache at 10k and 100k samples,
HTTP vs local shards).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import torch

from . import data, gpu, inference, quality, scale, unet_train, vae
from .harness import Row, Settings, run_case
from .results import RESULTS, section, table, write

COMPARED = ("unet_train", "unet_infer", "e2e", "quality", "vae")
ALL = (*COMPARED, "data", "gpu", "scale")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(ALL), help=f"comma-separated of {ALL}")
    parser.add_argument("--quick", action="store_true", help="tiny presets, one repetition")
    parser.add_argument("--full", action="store_true", help="20 full steps on CPU too")
    parser.add_argument("--write", action="store_true", help=f"update {RESULTS}")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--profile", action="store_true", help="print top ops per case")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timed reps/case")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's, or 1 when the CPU is oversubscribed)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(ALL)
    if unknown:
        parser.error(f"--only: unknown {sorted(unknown)} (known: {', '.join(ALL)})")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    only = args.only.split(",")
    load_start = os.getloadavg()[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.quick:
        torch.set_num_threads(1)  # tiny models only lose from OpenMP on a shared CPU
    elif args.device == "cpu" and load_start >= (os.cpu_count() or 1):
        # Oversubscribed: OpenMP threads wait for each other whenever one is descheduled.
        # Measured here at load 5-6 on 2 cores: a 256 px training step took 5-8 s on one
        # thread and 10-20 s on two.
        torch.set_num_threads(1)
        print(f"[bench] load average {load_start:.1f} >= {os.cpu_count()} cores: 1 torch thread")
    settings = Settings(
        device=args.device,
        quick=args.quick,
        full=args.full,
        memory=not args.no_memory,
        budget_s=args.budget if args.budget is not None else (5.0 if args.quick else 30.0),
        profile=args.profile,
    )
    command = shlex.join([".venv/bin/python", "-m", "bench", *argv])
    started = time.perf_counter()

    cases = [
        *unet_train.cases(settings),
        *inference.cases(settings),
        *quality.cases(settings),
        *vae.cases(settings),
    ]
    rows: list[Row] = []
    for case in (c for c in cases if c.bench in only):
        print(f"[bench] {case.name} ...", flush=True)
        case_started = time.perf_counter()
        try:
            row = run_case(case, settings)
        except Exception as err:  # one failing case must not lose the others' figures
            row = Row(case, {}, {}, error=f"{type(err).__name__}: {err}".splitlines()[0])
        rows.append(row)
        reps = {impl: [round(t, 2) for t in ts] for impl, ts in row.seconds.items()}
        elapsed = time.perf_counter() - case_started
        print(f"{table([row])[-1]}\n  {elapsed:.0f} s; seconds per rep {reps}", flush=True)

    figures: list[data.Figure] = []
    if "data" in only:
        print("[bench] data ...", flush=True)
        figures += data.reader_figures(batches=2 if args.quick else 6)
        figures += data.stage_figures(rounds=2 if args.quick else 8)
    if "gpu" in only:
        figures += gpu.figures(settings)
    if "scale" in only:
        print("[bench] scale ...", flush=True)
        figures += scale.figures(quick=args.quick)

    seconds = time.perf_counter() - started
    text = section(settings, command, (load_start, os.getloadavg()[0]), rows, figures, seconds)
    print()
    print(text)
    if args.write:
        write(text)
        print(f"updated {RESULTS}")
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
