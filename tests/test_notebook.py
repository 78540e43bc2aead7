"""notebooks/colab.ipynb, executed: its code cells run in order on CPU, as plain Python.

``MINISD_DRIVE`` (the notebook's one switch) points "Drive" at a local folder: nothing is
mounted, cloned or set up, and the cells run in this checkout. Make takes the rest from
``MAKEFLAGS``: the runs folder, the test's synthetic shards as data and a stand-in venv (a
wrapper around this Python: nothing is installed). A few steps per stage come in after the
cell tagged ``parameters``, as papermill injects parameters.

The training cell (tagged ``train``) runs in its own process group and is SIGKILLed, like a
Colab runtime dying, once the UNet's first checkpoint is on "Drive"; the local runs folder is
then deleted (a fresh runtime) and the notebook is run again from the top: VAE and CLIP are
not trained again, the UNet resumes from the newest checkpoint on "Drive" and finishes with
an export, and the grid is sampled and displayed. About 35 s of CPU time (a quarter of it
importing torch in seven processes): 35 s to 3 minutes of wall clock on 2 shared cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "colab.ipynb"
MAKE = shutil.which("make")
UNET_STEPS = 20
COMMON = "data.batch_size=8 ckpt.every_steps=2 train.val_every=0 train.preview_every=0"
PARAMS = {
    "STAGE_ARGS": {
        "vae": f"{COMMON} train.max_steps=2",
        "clip": f"{COMMON} train.max_steps=2",
        "unet": f"{COMMON} train.max_steps={UNET_STEPS}",
    }
}
# Make variables of the Makefile the notebook leaves to their defaults, and make's own:
# none may leak in from the environment.
MAKE_VARIABLES = ("PRESET", "ARGS", "CFG", "STEPS", "SEED", "N", "OUT", "PROMPT", "EVAL_CLIP")
MAKE_VARIABLES += ("RUNS", "DATA", "DATA_ROOT", "VENV", "MAKEFLAGS", "MAKELEVEL")

# Runs the code cells up to index argv[3] in one namespace; a stand-in IPython.display
# prints what the notebook shows.
RUNNER = r"""
import json, sys, types
notebook, params, last = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])

class Image:
    def __init__(self, filename):
        self.filename = filename

def display(obj):
    print("DISPLAYED", obj.filename, flush=True)

ipython, ipython_display = types.ModuleType("IPython"), types.ModuleType("IPython.display")
ipython_display.Image, ipython_display.display = Image, display
sys.modules.update({"IPython": ipython, "IPython.display": ipython_display})

cells = [c for c in json.load(open(notebook))["cells"] if c["cell_type"] == "code"]
namespace = {"__name__": "__main__"}
for index, cell in enumerate(cells[: last + 1]):
    exec(compile("".join(cell["source"]), f"<cell {index}>", "exec"), namespace)
    if "parameters" in cell["metadata"].get("tags", []):
        namespace.update(params)
"""


def code_cells() -> list[dict]:
    notebook = json.loads(NOTEBOOK.read_text())
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def tagged(cells: list[dict], tag: str) -> int:
    (index,) = [i for i, c in enumerate(cells) if tag in c["metadata"].get("tags", [])]
    return index


def mirrored_runs(drive: Path, stage: str) -> list[Path]:
    """The run folders on "Drive": ``<drive>/tiny/<stage>/<run id>/``."""
    folder = drive / "tiny" / stage
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.exists() else []


def mirrored_steps(drive: Path, stage: str) -> list[int]:
    names = sorted(drive.glob(f"tiny/{stage}/*/checkpoints/step_*"))
    return [int(p.name.split("_")[1]) for p in names if (p / "manifest.json").exists()]


def test_notebook_is_stored_without_outputs():
    cells = code_cells()
    assert cells and all(c["outputs"] == [] and c["execution_count"] is None for c in cells)
    tagged(cells, "parameters"), tagged(cells, "train")  # exactly one of each


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_notebook_trains_resumes_after_a_kill_and_shows_the_grid(tmp_path, tiny_shards):
    cells = code_cells()
    train = tagged(cells, "train")
    drive, runs, venv = tmp_path / "drive", tmp_path / "runs", tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    (venv / ".installed").touch()  # newer than pyproject.toml and the Makefile: no pip
    env = {k: v for k, v in os.environ.items() if k not in MAKE_VARIABLES}
    env.update(
        MINISD_DRIVE=str(drive),
        # Command-line variables of every make the notebook runs (VENV is not a ?= one).
        MAKEFLAGS=f"-- VENV={venv} RUNS={runs} DATA={tiny_shards}",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
    )

    def command(last: int) -> list[str]:
        return [sys.executable, "-c", RUNNER, str(NOTEBOOK), json.dumps(PARAMS), str(last)]

    # Run up to the training cell (from notebooks/, as Jupyter would); kill everything once
    # the UNet's first checkpoint is on "Drive".
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as log:
        first = subprocess.Popen(
            command(train),
            cwd=REPO / "notebooks",
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 900
    while not mirrored_steps(drive, "unet") and first.poll() is None:
        assert time.monotonic() < deadline, "no UNet checkpoint on Drive in time"
        time.sleep(0.02)
    running = first.poll() is None
    with contextlib.suppress(ProcessLookupError):  # the whole group: make and the stage too
        os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert running, f"the training cell ended before the kill:\n{first_log.read_text()[-3000:]}"
    assert mirrored_steps(drive, "vae") == [2] and mirrored_steps(drive, "clip") == [2]
    killed_at = max(mirrored_steps(drive, "unet"))
    runs_before = {stage: mirrored_runs(drive, stage) for stage in ("vae", "clip", "unet")}
    assert all(len(folders) == 1 for folders in runs_before.values())
    assert 2 <= killed_at < UNET_STEPS
    assert not (runs / "tiny" / "unet" / "export").exists()

    shutil.rmtree(runs)  # a fresh runtime: only Drive is left
    second = subprocess.run(
        command(len(cells) - 1),
        cwd=REPO / "notebooks",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=1200,
    )
    out = second.stdout.replace("\r", "\n")
    assert second.returncode == 0, out[-3000:]
    assert f"{venv}/bin/python -m stages.unet" in out  # the stand-in venv: nothing installed

    # The same runs continue (no new run folder on Drive). VAE and CLIP: their final
    # checkpoints on Drive are exported again, not trained again.
    assert {stage: mirrored_runs(drive, stage) for stage in runs_before} == runs_before
    for stage in ("vae", "clip"):
        (run,) = runs_before[stage]
        assert f"resumed from {run}/checkpoints/step_0000002 (step 2)" in out
        assert f"saved {runs}/tiny/{stage}/checkpoints" not in out
    # The UNet continues from the newest checkpoint on Drive, not from step 0.
    (unet_run,) = runs_before["unet"]
    resumed = re.findall(rf"resumed from {unet_run}/checkpoints/step_\d+ \(step (\d+)\)", out)
    assert [int(step) for step in resumed] == [killed_at]
    saved = [int(s) for s in re.findall(rf"saved {runs}/tiny/unet/checkpoints/step_(\d+)", out)]
    assert saved and min(saved) > killed_at and max(saved) == UNET_STEPS
    final = unet_run / "checkpoints" / f"step_{UNET_STEPS:07d}" / "manifest.json"
    assert json.loads(final.read_text())["final"] is True
    assert (runs / "tiny" / "unet" / "export" / "manifest.json").exists()

    # The grid of four seeds, on "Drive", shown inline.
    grid = drive / "tiny-grid.png"
    assert f"DISPLAYED {grid}" in out
    with Image.open(grid) as image:
        assert image.format == "PNG" and image.width > 32 and image.height >= 32
        assert image.text.get("prompt") == "a red apple; flat colour emoji"
        assert image.text.get("n") == "4"
