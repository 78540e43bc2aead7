"""The sampling sweep: its choice rule, and ``python -m pipeline sweep`` end to end on tiny
exports (files written, fewer UNet rows counted for a narrower guidance interval); the
command-line checks of ``--cfg-interval``."""

from __future__ import annotations

import json
import shutil

import pytest
from exports import one_torch_thread
from PIL import Image
from synthetic import make_shards

from pipeline.__main__ import main as pipeline_main
from pipeline.sweep import SweepConfig, pick
from stages.unet.samplers import SamplerConfig


def row(rp: float, fd: float, clip: float, rows: int, seconds: float = 1.0) -> dict:
    return {
        "r_precision": rp,
        "fd": fd,
        "clip_score": clip,
        "rows": rows,
        "seconds_per_image": seconds,
    }


def test_pick_takes_the_cheapest_setting_within_the_noise_of_the_best():
    noise = {"r_precision": 0.05, "fd": 0.01, "clip_score": 1.0}
    results = [
        row(0.70, 0.050, 80.0, 40),  # the reference: best everywhere
        row(0.66, 0.055, 79.5, 16),  # within every noise, fewer rows
        row(0.60, 0.050, 80.0, 8),  # R-precision short by more than its noise
        row(0.70, 0.070, 80.0, 8),  # FD worse by more than its noise
        row(0.69, 0.052, 79.9, 16, seconds=0.5),  # as cheap as row 1, faster measured
    ]
    chosen, best, inside = pick(results, noise, tolerance=1.0, reference=0)
    assert chosen == 4 and inside == [0, 1, 4]
    assert best == {"r_precision": 0.70, "fd": 0.050, "clip_score": 80.0}
    # No tolerance: only a setting best on every measure qualifies (the reference here).
    assert pick(results, noise, tolerance=0.0, reference=0)[0] == 0
    # Nothing within tolerance (each best on one measure only): the reference is kept.
    split = [row(0.7, 0.09, 70.0, 40), row(0.5, 0.05, 70.0, 20), row(0.5, 0.09, 80.0, 10)]
    chosen, best, inside = pick(split, noise, tolerance=1.0, reference=0)
    assert (chosen, inside) == (0, [])


def test_the_grid_is_the_product_and_bad_configs_are_refused():
    reference = SamplerConfig(steps=20)
    config = SweepConfig(steps=(2, 4), shifts=(1.0, 3.0), samplers=("euler", "heun"))
    grid = config.settings(reference)
    assert len(grid) == 2 * 2 * 2 * len(config.intervals)
    assert {(s.steps, s.shift, s.sampler) for s in grid} >= {(4, 3.0, "heun"), (2, 1.0, "euler")}
    with pytest.raises(ValueError, match="cfg_interval"):
        SweepConfig(intervals=((0.6, 0.4),)).settings(reference)
    with pytest.raises(ValueError, match="overlap"):
        SweepConfig(noise_seed=1300).settings(reference)


def test_pipeline_sweep_writes_table_plot_and_choice(tmp_path, tiny_exports, capsys):
    data = make_shards(tmp_path / "data", n_train=20, n_val=12)
    copy = tmp_path / "runs"  # the sweep writes under the run folder: a copy
    shutil.copytree(tiny_exports.unet.parents[2], copy)
    argv = [
        "sweep",
        "--runs",
        str(copy),
        "--data",
        str(data),
        "--precision",
        "fp32",
        "--steps",
        "3",  # the reference: 3 Euler steps, shift 1, guided everywhere
        "--shift",
        "1",
        "--cfg-interval",
        "0",
        "1",
        "steps=[2]",
        "shifts=[1.0]",
        'samplers=["euler"]',
        "intervals=[[0.0, 1.0], [0.0, 0.6]]",
        "num_images=6",
        "noise_seed=100",
        "batch_size=3",
        "timing_rounds=1",
    ]
    with one_torch_thread():
        assert pipeline_main(argv) == 0
    out = copy / "tiny" / "unet" / "sweep"
    record = json.loads((out / "sweep.json").read_text())
    labels = [r["label"] for r in record["results"]]
    assert labels == [
        "euler 3 shift 1 cfg [0, 1]",
        "euler 2 shift 1 cfg [0, 1]",
        "euler 2 shift 1 cfg [0, 0.6]",
    ]
    rows = [r["rows"] for r in record["results"]]
    # 3 guided steps = 6 rows; 2 = 4; with guidance at t <= 0.6 only t = 0.5 is guided: 3.
    assert rows == [6, 4, 3]
    for r in record["results"]:
        assert 0 <= r["r_precision"] <= 1 and r["fd"] >= 0 and r["seconds_per_image"] > 0
    assert set(record["noise"]) == {"r_precision", "fd", "clip_score"}
    assert record["noise"]["r_precision"] >= 1 / 6
    chosen = record["chosen"]
    assert chosen["index"] in record["within_tolerance"] or record["within_tolerance"] == []
    assert set(record["timing"]) == {"batch 3", "batch 1"}
    table = (out / "sweep.md").read_text()
    assert chosen["label"] in table and "cfg_interval = [" in table
    assert Image.open(out / "sweep.png").size[0] > 3 * 400
    assert chosen["label"] in capsys.readouterr().out


@pytest.mark.parametrize("interval", [["0.8", "0.2"], ["-0.1", "0.5"], ["0.2", "1.5"]])
def test_a_bad_interval_on_the_command_line_is_a_clear_error(interval, capsys):
    argv = ["generate", "red apple", "--runs", "/nonexistent", "--cfg-interval", *interval]
    assert pipeline_main(argv) == 2
    assert "cfg_interval" in capsys.readouterr().err
