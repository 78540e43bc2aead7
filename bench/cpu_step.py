"""CPU seconds per training step of a stage command, on a shared CPU where wall time says nothing.

    python -m bench.cpu_step --metrics runs/base/unet/metrics.jsonl -- \\
        python -m stages.unet --preset base --data DIR train.max_steps=2 train.log_every=1 ...

Runs the command under ``nice -n 19`` with ``OMP_NUM_THREADS=1`` (one thread: its CPU time is
the wall time of one uncontended core), polls ``/proc`` and records the process's user + sys
seconds when the progress bar appears (setup done) and at each train line of the run's
``metrics.jsonl`` (needs ``train.log_every=1``). Prints one JSON line: setup and per-step CPU
seconds. Kills the run when a step passes ``--step-limit`` CPU seconds or the process passes
``--rss-limit`` GiB (the machine is shared: never let it reach the OOM killer).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def rss_gib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 2**20
    return 0.0


def train_lines(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    return sum(x["split"] == "train" for x in lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_step", description=__doc__)
    parser.add_argument("--metrics", type=Path, required=True, help="the run's metrics.jsonl")
    parser.add_argument("--log", type=Path, default=Path("cpu_step.log"), help="its output")
    parser.add_argument("--step-limit", type=float, default=300.0, help="CPU s per step")
    parser.add_argument("--rss-limit", type=float, default=8.0, help="GiB")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    start = time.time()
    with open(args.log, "w") as log:  # nice execs the command in place: the same pid
        proc = subprocess.Popen(["nice", "-n", "19", *command], stdout=log, stderr=log, env=env)
    setup, marks, peak, stopped, cpu = None, [], 0.0, "", 0.0
    while proc.poll() is None:
        try:
            cpu, rss = cpu_seconds(proc.pid), rss_gib(proc.pid)
        except (FileNotFoundError, ProcessLookupError, IndexError):
            break
        peak = max(peak, rss)
        if setup is None and "0%|" in args.log.read_text(errors="replace"):
            setup = cpu
        marks += [cpu] * (train_lines(args.metrics) - len(marks))
        last = marks[-1] if marks else setup
        if rss > args.rss_limit:
            stopped = f"RSS {rss:.1f} GiB > {args.rss_limit}"
        elif last is not None and cpu - last > args.step_limit:
            stopped = f"a step passed {args.step_limit:.0f} CPU s"
        if stopped:
            proc.kill()
            break
        time.sleep(0.25)
    steps = [round(b - a, 1) for a, b in zip([setup, *marks], marks) if a is not None]
    result = {
        "rc": proc.wait(),
        "stopped": stopped,
        "setup_cpu_s": setup,
        "step_cpu_s": steps,
        "cpu_s_at_stop": round(cpu, 1) if stopped else None,
        "wall_s": round(time.time() - start),
        "peak_rss_gib": round(peak, 2),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
