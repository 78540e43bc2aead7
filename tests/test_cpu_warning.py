"""A GPU preset started without CUDA says what a CPU step costs, before its first step, and
goes on; the tiny preset says nothing. Its figures are the measurements page's table."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from stages.common.cli import run_stage
from stages.common.cpu_warning import CPU_SECONDS_PER_STEP, cpu_warning, fmt_step
from stages.common.exits import EXIT_ERROR
from stages.unet.stage import UNetStage, UNetStageConfig

REPO = Path(__file__).resolve().parents[1]


def test_small_unet_names_its_step_time_and_what_max_steps_would_take(monkeypatch):
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    monkeypatch.delenv("COLAB_GPU", raising=False)
    text = cpu_warning("small", "unet", 20_000)
    assert "meant for a GPU" in text
    assert "~85 s per unet step" in text and "train.max_steps=20000 would take ~20 days" in text
    assert "Colab" not in text.split("docs/")[0] and "Runtime" not in text
    assert "would take ~2 hours" in cpu_warning("small", "unet", 85)  # a smoke run says so too


def test_clip_takes_the_figure_of_its_cache_setting():
    assert "~69 s" in cpu_warning("small", "clip", 10, cache_enabled=True)
    assert "~5.8 min" in cpu_warning("small", "clip", 10, cache_enabled=False)


def test_on_colab_it_says_where_to_switch_the_runtime(monkeypatch):
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-20261201")
    assert "Runtime > Change runtime type" in cpu_warning("base", "vae", 100_000)


@pytest.mark.parametrize("preset", ["tiny", "pokepixels-9m", "vdm"])
def test_presets_sized_for_a_cpu_or_unmeasured_say_nothing(preset):
    for stage in ("vae", "clip", "unet"):
        assert cpu_warning(preset, stage, 1600) is None


def test_the_figures_are_the_measurements_table_and_the_readme_presets_table():
    page = (REPO / "docs" / "measurements.md").read_text()
    rows = re.findall(
        r"^\| `(small|base)` \| (VAE|CLIP|UNet)([^|]*)\|[^|]*\|[^|]*\| (~[^|(]+)", page, re.M
    )
    assert len(rows) == len(CPU_SECONDS_PER_STEP) == 8
    for preset, stage, detail, step in rows:
        cached = "cache.enabled=true" in detail
        assert fmt_step(CPU_SECONDS_PER_STEP[(preset, stage.lower(), cached)]) == step.strip()
    readme = (REPO / "README.md").read_text()
    for preset in ("small", "base"):
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{preset}` |"))
        for stage, name in (("vae", "VAE"), ("clip", "CLIP"), ("unet", "UNet")):
            assert f"{name} {fmt_step(CPU_SECONDS_PER_STEP[(preset, stage, False)])}" in row


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is for machines without CUDA")
@pytest.mark.parametrize(("preset", "warned"), [("small", True), ("tiny", False)])
def test_the_stage_command_warns_before_anything_is_built(tmp_path, caplog, preset, warned):
    """No upstream export here: the run stops at once (exit 1), after the warning."""
    argv = ["--preset", preset, "--data", str(tmp_path / "none"), "--runs", str(tmp_path)]
    try:
        with caplog.at_level(logging.WARNING):
            code = run_stage("unet", UNetStageConfig, UNetStage, argv + ["train.max_steps=7"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert code == EXIT_ERROR
    assert ("train.max_steps=7 would take" in caplog.text) is warned
