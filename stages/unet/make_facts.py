"""What the Makefile needs to know of a preset, asked of the config loader instead of grep.

``python -m stages.unet.make_facts --preset tiny --out F [section.key=value ...]`` resolves the UNet
stage's config exactly as ``make unet`` will (defaults <- ``configs/<preset>/unet.toml`` <-
the same overrides, so ``ARGS`` counts) and writes them as Make assignments to ``--out``:

- ``EMOJI_RES``: the bundled emoji build the preset trains from: its own resolution up to
  64 px (such builds take seconds), else the one 512 px build, resized on load.
- ``PIXEL``: ``1`` for a pixel-space UNet (``inputs.autoencoder = "identity"``): no VAE export.
- ``UNCOND``: ``1`` for an unconditional UNet (``inputs.text = false``): no CLIP export.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from stages.common.config import ConfigError, load_config

from .stage import UNetStageConfig

LARGEST_EXACT_BUILD = 64  # px; above it the presets share the 512 px build
SHARED_BUILD = 512


def make_facts(preset: str, overrides: list[str]) -> dict[str, str]:
    cfg = load_config(UNetStageConfig, preset, "unet", overrides)
    resolution = cfg.data.resolution
    return {
        "EMOJI_RES": str(resolution if resolution <= LARGEST_EXACT_BUILD else SHARED_BUILD),
        "PIXEL": "1" if cfg.inputs.autoencoder == "identity" else "",
        "UNCOND": "" if cfg.inputs.text else "1",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--out", type=Path, required=True, help="the Make fragment to write")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as the stage takes")
    args = parser.parse_args()
    try:
        facts = make_facts(args.preset, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".partial")
    partial.write_text("".join(f"{name} := {value}\n" for name, value in facts.items()))
    os.replace(partial, args.out)  # a killed make never includes half a fragment
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
