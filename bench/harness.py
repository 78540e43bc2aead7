"""Timing ours against the peer in one process: warm-up, alternating repetitions, medians.

A benchmark module gives ``Case`` objects: a benchmark key (for ``--only``), its parameters,
and ``make(impl)`` building the workload of ``"ours"`` or ``"peer"``. A workload is a
zero-argument callable doing one unit of work; it may return the seconds of the part that
``Case.scale`` extrapolates (the sampling loop, when the CPU runs fewer than the 20 steps: see
inference.py). Memory is measured on the way (``bench.memory``): the state an impl keeps after
build and warm-up, and the high-water mark of each timed run.

Repetitions alternate ours/peer in ABBA order (ours, peer, peer, ours, ...) so that load
drifts on the shared machine hit both alike. After the warm-up the number of repetitions is
chosen to fit ``budget_s`` (at least ``min_reps``, at most ``max_reps``). The ratio is
the median over repetitions of peer time / our time, each pair run back to back
(above 1: we are faster).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import memory

IMPLS = ("ours", "peer")
Workload = Callable[[], float | None]


@dataclass(frozen=True)
class Settings:
    """How a whole bench run is sized (from the command line)."""

    device: str = "cpu"
    quick: bool = False  # tiny presets and single repetitions: a smoke run of every path
    full: bool = False  # the complete 20-step samplers and more repetitions, even on CPU
    memory: bool = True  # measure each impl's memory (state after warm-up, peak of a run)
    budget_s: float = 30.0  # timed repetitions per case (after the warm-up), both impls
    profile: bool = False  # print the torch profiler's top ops of one run per impl

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def lean(self) -> bool:
        """A CPU run sized for ``make bench``'s 15 minutes (not --full, not --quick)."""
        return not (self.cuda or self.full or self.quick)

    def plan(self, heavy: bool = False, warmup: bool = True) -> dict[str, int]:
        """Warm-up and repetition counts: quick = 1 run each; lean CPU = no warm-up where
        nothing is built lazily (``warmup=False``: inference, VAE) and exactly two timed
        runs each (one ABBA round) for ``heavy`` cases (a 512 px VAE decode takes 30 s on
        one busy core)."""
        if self.quick:
            return {"warmup": 0, "min_reps": 1, "max_reps": 1}
        if self.lean:
            return {"warmup": int(warmup), "min_reps": 2, "max_reps": 2 if heavy else 4}
        return {"warmup": 1, "min_reps": 2, "max_reps": 5}


@dataclass(frozen=True)
class Case:
    bench: str  # benchmark key (``--only``)
    name: str  # row label
    params: dict[str, Any]  # what the workload was built from (for the record)
    make: Callable[[str], Workload]  # impl -> workload
    warmup: int = 1
    min_reps: int = 2
    max_reps: int = 5
    scale: float = 1.0  # reported time = total + (scale - 1) * returned part
    flops: float = 0.0  # counted FLOPs of one unit of work (0: not counted)
    note: str = ""


@dataclass
class Row:
    case: Case
    seconds: dict[str, list[float]]  # impl -> total seconds per repetition
    per_rep: dict[str, list[float]]  # impl -> reported seconds per repetition (extrapolated)
    memory: dict[str, dict[str, float]] = field(default_factory=dict)  # impl -> state/run MiB
    error: str = ""

    @property
    def reported(self) -> dict[str, float]:
        return {impl: statistics.median(values) for impl, values in self.per_rep.items()}

    @property
    def ratio(self) -> float:
        """Median over repetitions of peer / ours, each pair run back to back: the load of
        a shared machine swings by several x within minutes, a pair sees the same load."""
        pairs = zip(self.per_rep["peer"], self.per_rep["ours"])
        return statistics.median(peer / ours for peer, ours in pairs)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(work: Workload, device: str) -> tuple[float, float]:
    """(total seconds, seconds of the scalable part; the total when none is returned)."""
    synchronize(device)
    start = time.perf_counter()
    part = work()
    synchronize(device)
    total = time.perf_counter() - start
    return total, total if part is None else float(part)


def compare(
    makers: dict[str, Callable[[], Workload]],
    device: str = "cpu",
    warmup: int = 1,
    min_reps: int = 2,
    max_reps: int = 5,
    budget_s: float = 60.0,
    scale: float = 1.0,
    measure_memory: bool = True,
) -> tuple[dict[str, list[float]], dict[str, float], dict[str, dict[str, float]]]:
    """Build and warm up each impl, alternate timed runs, then measure each one's memory.

    -> (total seconds per repetition, reported seconds per repetition (extrapolated by
    ``scale``), memory MiB ``{"state", "run"}``), each by impl.
    """
    measure_memory = measure_memory and memory.supported(device)
    workloads: dict[str, Workload] = {}
    mib: dict[str, dict[str, float]] = {}
    for impl, make in makers.items():
        before = memory.level(device) if measure_memory else 0
        workloads[impl] = make()
        for _ in range(warmup):
            timed(workloads[impl], device)
        if measure_memory:
            mib[impl] = {"state": (memory.level(device) - before) / memory.MIB, "run": 0.0}
    impls = list(workloads)
    totals: dict[str, list[float]] = {impl: [] for impl in impls}
    parts: dict[str, list[float]] = {impl: [] for impl in impls}
    reps = min_reps
    rep = 0
    while rep < reps:
        order = impls if rep % 2 == 0 else impls[::-1]  # ABBA
        for impl in order:
            total, part = timed(workloads[impl], device)
            totals[impl].append(total)
            parts[impl].append(part)
        rep += 1
        if rep == min_reps:  # size the rest of the run from what the first ones cost
            cost = sum(sum(t) for t in totals.values()) / rep
            reps = max(min_reps, min(max_reps, int(budget_s // max(cost, 1e-9))))
    # Memory from one more, untimed run each: measuring it trims the heap first, and the
    # run after a trim pays for faulting its pages in again (it made our 512 px training
    # step read 0.90x when it was 1.24x timed alone, bench/RESULTS.md).
    for impl in impls if measure_memory else ():
        base = memory.reset_peak(device)
        timed(workloads[impl], device)
        mib[impl]["run"] = (memory.peak(device) - base) / memory.MIB
    per_rep = {  # the reported figure of each repetition (extrapolated when scale != 1)
        impl: [t + (scale - 1.0) * p for t, p in zip(totals[impl], parts[impl])] for impl in impls
    }
    return totals, per_rep, mib


def profile(work: Workload, device: str, rows: int = 15) -> str:
    """The torch profiler's top ops (by self time) of one run of ``work``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with torch_profile(activities=activities) as prof:
        work()
        synchronize(device)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def run_case(case: Case, settings: Settings) -> Row:
    """Time both impls of ``case`` alternately, measuring their memory on the way."""
    makers = {impl: (lambda impl=impl: case.make(impl)) for impl in IMPLS}
    totals, per_rep, mib = compare(
        makers,
        settings.device,
        warmup=case.warmup,
        min_reps=case.min_reps,
        max_reps=case.max_reps,
        budget_s=settings.budget_s,
        scale=case.scale,
        measure_memory=settings.memory,
    )
    row = Row(case, totals, per_rep, mib)
    if settings.profile:
        for impl in IMPLS:
            print(f"\n{case.name}: {impl}\n{profile(case.make(impl), settings.device)}")
    gc.collect()
    return row
