"""Shared fixtures: hermetic, CPU, every test builds what it reads. The session-scoped ones
are built once and shared read-only: a test that changes one works on a copy
(``exports.copy_exports``, ``unet_runs.copy_runs``)."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Tiny models on a 2-core CPU: one intra-op thread avoids OpenMP oversubscription (and is
# inherited by the subprocess tests, which run two processes at once).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from exports import build_exports, one_torch_thread  # noqa: E402
from synthetic import make_shards  # noqa: E402
from unet_runs import RES, build_clip_export, build_vae_export, write_pixel_clip  # noqa: E402

from pipeline.load import ExportFolders  # noqa: E402
from pipeline.text2image import Text2Image  # noqa: E402


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """96 train and 32 val synthetic 16 px samples in shards of 20 (read-only: do not modify)."""
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def one_thread():
    """A module's tests on one intra-op thread (``exports.one_torch_thread``), for modules of
    tiny models: on a busy shared CPU, OpenMP's spinning threads make every small op wait for
    a time slice (measured: the UNet tests took 9 s with one thread and 137 s with two on a
    loaded 2-core machine). Asked for with ``pytestmark = pytest.mark.usefixtures(...)``."""
    with one_torch_thread():
        yield


# ------------------------------------------------------------ pipeline, server, web page


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory) -> ExportFolders:
    """Tiny real VAE, CLIP and UNet exports (tests/exports.py) under ``<root>/runs/tiny``,
    shared by the pipeline, server, page, interop, quality and sweep tests (read-only)."""
    return build_exports(tmp_path_factory.mktemp("exports"))


@pytest.fixture(scope="session")
def pipe(tiny_exports) -> Text2Image:
    """The pipeline on ``tiny_exports``, CPU and fp32 (it keeps no state between calls)."""
    return Text2Image.from_exports(tiny_exports, device="cpu", precision="fp32")


# ------------------------------------------------------------------------------- UNet stage


@pytest.fixture(scope="session")
def upstream_runs(tiny_shards, tmp_path_factory) -> Path:
    """A runs root holding untrained-but-real tiny VAE and CLIP exports, a latent UNet's
    upstream (read-only: ``unet_runs.copy_runs`` gives a test its own copy)."""
    runs = tmp_path_factory.mktemp("runs")
    vae_hash = build_vae_export(runs / "tiny" / "vae" / "export")
    build_clip_export(runs / "tiny" / "clip" / "export", tiny_shards, vae_hash)
    return runs


@pytest.fixture(scope="session")
def pixel_shards(tmp_path_factory) -> Path:
    """32 train and 16 val synthetic 8 px samples, for pixel-space UNets (read-only)."""
    folder = tmp_path_factory.mktemp("shards8")
    return make_shards(folder, n_train=32, n_val=16, resolution=RES, shard_size=16)


@pytest.fixture(scope="session")
def pixel_clips(pixel_shards, tmp_path_factory) -> dict[int, Path]:
    """Pixel-input CLIP exports by image side: 8 (the data's) and 16 (resized to)."""
    root = tmp_path_factory.mktemp("pixel-clips")
    folders = {size: root / f"clip{size}" / "export" for size in (RES, 2 * RES)}
    for size, folder in folders.items():
        write_pixel_clip(folder, pixel_shards, size)
    return folders


@pytest.fixture
def stalled_drive(monkeypatch) -> threading.Event:
    """Every checkpoint copy into a folder named "drive" blocks (a stalled FUSE mount) until
    the returned event is set (the mount comes back), at most 60 s; other copies go on."""
    import stages.common.checkpoint as checkpoint_module

    real_copy, stall = shutil.copyfile, threading.Event()

    def copy(src, dst, **kwargs):
        if "drive" in str(dst):
            stall.wait(60)
        return real_copy(src, dst, **kwargs)

    monkeypatch.setattr(checkpoint_module.shutil, "copyfile", copy)
    yield stall
    stall.set()
