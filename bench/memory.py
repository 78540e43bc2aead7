"""Memory of a workload, measured in the timing process: resident state + peak of one run.

Two figures per impl, in MiB, whose sum is the impl's peak footprint on its own:

- ``state``: what building it and its warm-up leave allocated (weights, buffers, the
  optimiser's moments once the first step has made them), as growth of the process's
  resident set (CPU) or of ``torch.cuda.memory_allocated`` (GPU).
- ``run``: the high-water mark of one run above the level before it (activations,
  gradients, workspace), an extra run after the timed ones: the trim below makes the run
  after it fault its pages in again, which must not be timed. CPU: the kernel's ``VmHWM``
  is reset through /proc/self/clear_refs (Linux >= 4.0) before the run and read after it, and free heap memory is handed back with
  ``malloc_trim`` first so that the run's allocations show up as new resident pages instead
  of reusing what the other impl freed. GPU: ``torch.cuda.reset_peak_memory_stats`` and
  ``max_memory_allocated``.

Why not tracemalloc or ``ru_maxrss`` in a subprocess: tracemalloc does not see torch's
allocations, and ``ru_maxrss`` is carried across exec on Linux, so a child spawned by a big
parent reports the parent's RSS (tried first: every case read the same 933 MiB). A fresh
process per measurement also costs a model build and a run more per case, which the 15-minute
CPU budget of ``make bench`` does not have.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from pathlib import Path

import torch

MIB = 2**20
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{_STATUS} has no {field}")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


def _trim() -> None:
    """Return free heap pages to the OS (glibc), so RSS counts only live allocations.

    No ``gc.collect()`` here: with torch and diffusers loaded it takes seconds on a busy
    machine, and the workloads hold no reference cycles worth collecting.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def supported(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    return _STATUS.exists() and _CLEAR_REFS.exists()


def level(device: str) -> int:
    """Bytes in use now (after trimming free memory)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    _trim()
    return _status_kib("VmRSS") * 1024


def reset_peak(device: str) -> int:
    """Start a new high-water mark at the current level; returns that level in bytes."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    current = level(device)
    _CLEAR_REFS.write_text("5")  # 5: reset the peak RSS to the current RSS
    return current


def peak(device: str) -> int:
    """The high-water mark in bytes since ``reset_peak``."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_kib("VmHWM") * 1024
