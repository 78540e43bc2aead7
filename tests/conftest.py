"""Shared fixtures: hermetic, CPU, every test builds what it reads."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Tiny models on a 2-core CPU: one intra-op thread avoids OpenMP oversubscription (and is
# inherited by the subprocess tests, which run two processes at once).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from synthetic import make_shards  # noqa: E402


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """96 train and 32 val synthetic 16 px samples in shards of 20 (read-only: do not modify)."""
    return make_shards(tmp_path_factory.mktemp("shards"))
