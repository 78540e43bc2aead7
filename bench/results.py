"""The results table (printed and written to bench/RESULTS.md) and the run's environment.

``RESULTS.md`` keeps its hand-written head (method, findings) above the ``RUNS`` marker; below
it, one section per (device, command): ``--write`` replaces the section of the same device and
command, or appends a new one.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
from pathlib import Path

import torch

from .data import Figure
from .harness import Row, Settings

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
RUNS = "<!-- runs: written by `python -m bench --write`; one section per device and command -->"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_line(settings: Settings) -> str:
    cpu = f"{cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    if settings.cuda:
        return f"{torch.cuda.get_device_name()} (host: {cpu})"
    return cpu


def environment(settings: Settings, command: str, load: tuple[float, float]) -> list[str]:
    import diffusers

    return [
        f"- device: {device_line(settings)}",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"Python {platform.python_version()}",
        f"- command: `{command}`",
        f"- 1-min load average at start / end: {load[0]:.1f} / {load[1]:.1f} "
        "(the machine is shared with other jobs: absolute times vary, the ratios alternate "
        "ours/peer within one process and are the figures to read)",
    ]


def _mib(memory: dict[str, dict[str, float]], impl: str) -> str:
    """``total (state + run)`` in MiB."""
    if impl not in memory:
        return "-"
    m = memory[impl]
    return f"{m['state'] + m['run']:,.0f} ({m['state']:,.0f} + {m['run']:,.0f})"


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| benchmark | ours s | diffusers s | ratio | ours MiB (state + run) "
        "| diffusers MiB (state + run) | reps | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if row.error:
            lines.append(f"| {row.case.name} | - | - | - | - | - | - | failed: {row.error} |")
            continue
        note = row.case.note
        if row.case.flops:
            rates = "/".join(f"{row.case.flops / row.reported[i] / 1e9:.0f}" for i in row.reported)
            note = f"{row.case.flops / 1e9:.3g} GFLOP/step; {rates} GFLOP/s ours/peer"
        lines.append(
            f"| {row.case.name} | {row.reported['ours']:.2f} | {row.reported['peer']:.2f} "
            f"| **{row.ratio:.2f}x** | {_mib(row.memory, 'ours')} | {_mib(row.memory, 'peer')} "
            f"| {len(row.seconds['ours'])} | {note} |"
        )
    return lines


def figure_table(figures: list[Figure]) -> list[str]:
    lines = ["| measurement | value | unit | note |", "|---|---:|---|---|"]
    lines += [f"| {f.name} | {f.value:,.2f} | {f.unit} | {f.note} |" for f in figures]
    return lines


def section(
    settings: Settings,
    command: str,
    load: tuple[float, float],
    rows: list[Row],
    figures: list[Figure],
    seconds: float,
) -> str:
    title = f"### {device_line(settings)} — `{command}`"
    body = [title, "", *environment(settings, command, load), f"- wall time: {seconds:.0f} s", ""]
    if rows:
        body += [
            "ratio = median over repetitions of diffusers time / our time, each pair run back "
            "to back (> 1: we are faster). Times are medians of the repetitions (after the "
            "warm-up), ours and diffusers alternating in one process. "
            "Memory: state = resident after build and warm-up (weights, optimiser moments), "
            "run = high-water mark of one more (untimed) run above that (activations, gradients, "
            "workspace); state + run = the impl's peak on its own.",
            "",
            *table(rows),
            "",
        ]
    if figures:
        body += [*figure_table(figures), ""]
    return "\n".join(body)


def write(text: str, path: Path = RESULTS) -> None:
    """Replace this device+command's section below the marker, or append it."""
    content = path.read_text() if path.exists() else f"# Benchmarks\n\n{RUNS}\n"
    if RUNS not in content:
        content = content.rstrip("\n") + f"\n\n{RUNS}\n"
    head, runs = content.split(RUNS, 1)
    title = text.splitlines()[0]
    sections = [s for s in re.split(r"(?m)^(?=### )", runs) if s.strip()]
    kept = [s.rstrip("\n") for s in sections if s.splitlines()[0] != title]
    path.write_text(head + RUNS + "\n\n" + "\n\n".join([*kept, text.rstrip("\n")]) + "\n")
