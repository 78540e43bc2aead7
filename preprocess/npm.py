"""Fetch npm package tarballs into a cache folder with the npm client (``npm pack``).

The only network access of preprocessing, kept apart so that tests hand the emoji builder
tarballs of their own. A cached tarball is reused when it still unpacks (every member read
through gzip's CRC check); a new one is packed into a temporary folder and renamed into
place, so the cache never holds half a download under the final name.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path


class NpmFetchError(RuntimeError):
    """npm is missing, failed, or produced a tarball that does not unpack."""


def tarball_name(spec: str) -> str:
    """``@twemoji/svg@15.0.0`` -> ``twemoji-svg-15.0.0.tgz`` (the name ``npm pack`` writes)."""
    name, _, version = spec.rpartition("@")
    if not name or not version:
        raise ValueError(f"npm spec {spec!r} is not of the form name@version")
    return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def tarball_unpacks(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if member.isfile():
                    tar.extractfile(member).read()
        return True
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        return False


def _npm_pack(spec: str, destination: Path) -> Path:
    try:
        subprocess.run(
            ["npm", "pack", spec, "--pack-destination", str(destination), "--silent"],
            check=True,
            capture_output=True,
            text=True,
        )
    except FileNotFoundError as err:
        raise NpmFetchError(
            "npm is not installed: `sudo apt-get install npm` (Debian, Ubuntu; `make setup` "
            "does it as root), or pass the package tarballs (--openmoji-tgz / --twemoji-tgz)"
        ) from err
    except subprocess.CalledProcessError as err:
        raise NpmFetchError(f"npm pack {spec} failed: {err.stderr.strip()}") from err
    packed = destination / tarball_name(spec)
    if not packed.exists():
        raise NpmFetchError(f"npm pack {spec} did not write {packed.name}")
    return packed


def fetch_npm_packages(specs: Sequence[str], cache_dir: Path) -> list[Path]:
    """The tarball of each ``name@version`` spec, packed into ``cache_dir`` unless cached."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for spec in specs:
        target = cache_dir / tarball_name(spec)
        if not (target.exists() and tarball_unpacks(target)):
            with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".npm-pack-") as tmp:
                packed = _npm_pack(spec, Path(tmp))
                if not tarball_unpacks(packed):
                    raise NpmFetchError(f"{spec}: the tarball npm produced does not unpack")
                os.replace(packed, target)
        paths.append(target)
    return paths
