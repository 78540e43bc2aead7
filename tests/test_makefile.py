"""`make setup`'s npm check, run by make itself against fake ``id``, ``npm`` and ``apt-get``
on a PATH of their own (the venv stamp is made up to date first: nothing is installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")


def fake(path: Path, script: str) -> None:
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)


def make_setup(tmp_path: Path, uid: int, have_npm: bool) -> tuple[str, list[str]]:
    """stdout of `make setup` and the apt-get command lines it ran."""
    bin_dir, log = tmp_path / "bin", tmp_path / "apt-get.log"
    bin_dir.mkdir()
    fake(bin_dir / "id", f"echo {uid}")
    fake(bin_dir / "apt-get", f'echo "$DEBIAN_FRONTEND apt-get $*" >> {log}')
    if have_npm:
        fake(bin_dir / "npm", "exit 0")
    (bin_dir / "grep").symlink_to(shutil.which("grep"))  # the Makefile reads unet.toml
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed").touch()  # newer than pyproject.toml and the Makefile: no pip
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
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed").touch()
    result = subprocess.run(
        [MAKE, "-C", str(REPO), "--no-print-directory", "-n", "vae", f"VENV={venv}"]
        + [f"DATA={data}", f"RUNS={tmp_path / 'runs'}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"-m stages.vae --preset tiny --data {data}" in result.stdout
