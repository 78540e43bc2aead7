"""The Makefile, run by make itself: `make setup`'s npm check against fake ``id``, ``npm`` and
``apt-get`` on a PATH of their own, and what the stage targets run (``-n``). The stand-in venv
has an up-to-date stamp (nothing is installed) and a python that wraps this one, which the
Makefile asks for the preset's facts (``stages/unet/make_facts.py``)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")


def fake(path: Path, script: str) -> None:
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)


def stand_in_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake(venv / "bin" / "python", f'exec "{sys.executable}" "$@"')
    (venv / ".installed").touch()  # newer than pyproject.toml and the Makefile: no pip
    return venv


def make_setup(tmp_path: Path, uid: int, have_npm: bool) -> tuple[str, list[str]]:
    """stdout of `make setup` and the apt-get command lines it ran."""
    bin_dir, log = tmp_path / "bin", tmp_path / "apt-get.log"
    bin_dir.mkdir()
    fake(bin_dir / "id", f"echo {uid}")
    fake(bin_dir / "apt-get", f'echo "$DEBIAN_FRONTEND apt-get $*" >> {log}')
    if have_npm:
        fake(bin_dir / "npm", "exit 0")
    venv = stand_in_venv(tmp_path)
    result = subprocess.run(
        [MAKE, "-C", str(REPO), "--no-print-directory", "setup", f"VENV={venv}"],
        env={
            **{k: v for k, v in os.environ.items() if k != "DEBIAN_FRONTEND"},
            "PATH": str(bin_dir),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    return result.stdout, calls


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_setup_leaves_npm_alone_when_it_is_there(tmp_path):
    out, calls = make_setup(tmp_path, uid=1000, have_npm=True)
    assert "npm" not in out and calls == []


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_setup_prints_the_command_for_npm_without_root(tmp_path):
    out, calls = make_setup(tmp_path, uid=1000, have_npm=False)
    assert "sudo apt-get install npm" in out and calls == []


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_setup_installs_npm_from_debian_as_root(tmp_path):
    _, calls = make_setup(tmp_path, uid=0, have_npm=False)
    assert calls == [" apt-get update -qq", "noninteractive apt-get install -y -qq npm"]


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
@pytest.mark.parametrize("data", ["https://example.org/mine", "s3://bucket/mine", "shards.txt"])
def test_remote_data_needs_no_local_manifest(tmp_path, data):
    """`make vae DATA=<URL or list file>` runs the stage on it (here: printed, -n) instead of
    looking for a local manifest to build."""
    venv = stand_in_venv(tmp_path)
    result = subprocess.run(
        [MAKE, "-C", str(REPO), "--no-print-directory", "-n", "vae", f"VENV={venv}"]
        + [f"DATA={data}", f"RUNS={tmp_path / 'runs'}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"-m stages.vae --preset tiny --data {data}" in result.stdout


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
@pytest.mark.parametrize(
    ("preset", "args", "data", "upstream"),
    [
        ("tiny", "", "emoji-32", ["vae", "clip"]),
        ("small", "", "emoji-512", ["vae", "clip"]),  # 256 px, resized from the 512 px build
        ("vdm", "", "emoji-64", []),  # pixel space and unconditional
        ("tiny", "inputs.text=false", "emoji-32", ["vae"]),  # ARGS count, as the stage sees them
    ],
)
def test_stage_targets_take_data_and_upstream_from_the_resolved_config(
    tmp_path, preset, args, data, upstream
):
    venv = stand_in_venv(tmp_path)
    result = subprocess.run(
        [MAKE, "-C", str(REPO), "--no-print-directory", "-n", "unet", f"VENV={venv}"]
        + [f"PRESET={preset}", f"ARGS={args}", f"RUNS={tmp_path / 'runs'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    trained = [s for s in ("vae", "clip", "unet") if f"-m stages.{s} --preset" in result.stdout]
    assert trained == [*upstream, "unet"]
    assert f"--data data/{data} " in result.stdout


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_an_unknown_preset_is_named_with_the_known_ones(tmp_path):
    venv = stand_in_venv(tmp_path)
    result = subprocess.run(
        [MAKE, "-C", str(REPO), "--no-print-directory", "-n", "unet", f"VENV={venv}"]
        + ["PRESET=nope", f"RUNS={tmp_path / 'runs'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "unknown preset 'nope'" in result.stderr and "tiny" in result.stderr


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_help_lists_every_target_and_variable_with_a_line_each(tmp_path):
    """From the Makefile's own `## ` comments; it needs no virtual environment (none is made)."""
    result = subprocess.run(
        [MAKE, "-C", str(REPO), "--no-print-directory", "help", f"VENV={tmp_path / 'none'}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "none").exists()
    makefile = (REPO / "Makefile").read_text()
    targets = re.search(r"^\.PHONY:(.*)$", makefile, flags=re.M).group(1).split()
    variables = re.findall(r"^([A-Z_]+)\s*\?=", makefile, flags=re.M)
    listed = {}
    for line in result.stdout.splitlines():
        if match := re.match(r"^  (\S+) +(\S.*)$", line):
            listed[match.group(1)] = match.group(2)
    assert set(targets) | set(variables) <= set(listed), result.stdout
    assert len(variables) >= 10 and "PRESET" in variables and "bench" in targets
