"""The `base` preset end to end at 512 px: VAE -> CLIP -> UNet -> PNG, through the CLIs.

The preset's structure is kept (factor-8 VAE with 1,2,4,4 and gradient checkpointing, 64x64x4
latents, a 12-layer text encoder of 77 tokens, a 1,2,2,4 UNet with cross-attention at 16 and
8); only widths, step counts, batch sizes and evaluation sizes are shrunk, by overrides, so a
CPU runs it in about a minute. LPIPS is off (its backbone would be downloaded) with the
overrides the offline error message names. Checked: every exit code, that each export
differs from the preset in the overridden keys only, and a 512x512 PNG.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image
from synthetic import make_shards

from pipeline.png import read_png_text
from stages.clip.stage import CLIPStageConfig
from stages.common.config import changed_keys, load_config, parse_override, to_dict
from stages.unet.stage import UNetStageConfig
from stages.vae.stage import VAEStageConfig

REPO = Path(__file__).resolve().parents[1]
PRESET = "base"
# Budgets every stage shares: two steps, validation and a preview at the last one.
SHORT = [
    *("train.max_steps=2", "train.val_every=2", "train.preview_every=2", "train.log_every=1"),
    *("train.trackers=[]", "ckpt.every_steps=2", "data.num_workers=0"),
]
OVERRIDES = {
    "vae": [
        *("model.base_channels=4", "model.norm_groups=4", "loss.disc_channels=8"),
        *("loss.lpips_weight=0", "val.metric=l1"),  # offline: no VGG backbone
        *("data.batch_size=1", "val.max_batches=1", "val.preview_images=1", "stats.batches=1"),
    ],
    "clip": [
        *("model.embed_dim=32", "model.text.width=32", "model.image.width=32"),
        *("data.batch_size=2", "val.batch_size=4", "val.preview_images=2"),
        "val.preview_candidates=4",
    ],
    "unet": [
        *("model.base_channels=16", "model.head_dim=8", "data.batch_size=2", "sample.steps=2"),
        *("eval.num_images=2", "eval.batch_size=2", "eval.grid_rows=1", "eval.grid_seeds=1"),
        *("eval.max_real=4", "cache.batch_size=4"),
    ],
}
CONFIGS = {"vae": VAEStageConfig, "clip": CLIPStageConfig, "unet": UNetStageConfig}
WIDTHS = {"base_channels", "norm_groups", "embed_dim", "width", "head_dim"}
# The UNet stage fills these from the upstream exports (0 in the preset).
RESOLVED = {"model.in_channels", "model.context_dim", "model.sample_size"}


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    tail = result.stderr[-4000:]
    assert result.returncode == 0, f"{' '.join(args[:2])} exited {result.returncode}:\n{tail}"
    return result


def test_overrides_shrink_only_widths_and_budgets():
    for stage, overrides in OVERRIDES.items():
        for text in overrides:
            parts, _ = parse_override(text)
            if parts[0] == "model":
                assert parts[-1] in WIDTHS, f"{stage}: {text} changes the preset's structure"


def test_base_preset_trains_and_writes_a_512_px_png(tmp_path):
    data = make_shards(tmp_path / "data", n_train=8, n_val=4, resolution=512, shard_size=8)
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    common = ["--preset", PRESET, "--data", str(data), "--runs", str(runs)]
    for stage in ("vae", "clip", "unet"):
        run(["-m", f"stages.{stage}", *common, *SHORT, *OVERRIDES[stage]], env)
        export = runs / PRESET / stage / "export"
        # The export is the preset with only the overridden keys (and upstream-filled ones).
        preset = to_dict(load_config(CONFIGS[stage], PRESET, stage))
        trained = json.loads((export / "config.json").read_text())
        allowed = {".".join(parse_override(t)[0]) for t in SHORT + OVERRIDES[stage]}
        allowed |= {"data.path"} | (RESOLVED if stage == "unet" else set())
        assert set(changed_keys(preset, trained)) <= allowed, stage

    info = {
        stage: json.loads((runs / PRESET / stage / "export" / "manifest.json").read_text())["info"]
        for stage in ("vae", "clip", "unet")
    }
    assert (info["vae"]["factor"], info["vae"]["resolution"]) == (8, 512)
    assert (info["clip"]["context_length"], info["clip"]["image_size"]) == (77, 64)
    assert info["unet"]["latent_shape"] == [4, 64, 64] and info["unet"]["resolution"] == 512
    assert (runs / PRESET / "vae" / "previews" / "vae_0000002.png").exists()
    assert (runs / PRESET / "unet" / "previews" / "samples_0000002.png").exists()

    out = tmp_path / "out.png"
    prompt = "a red circle"
    args = ["-m", "pipeline", "generate", prompt, "--preset", PRESET, "--runs", str(runs)]
    run([*args, "--steps", "2", "--seed", "0", "--device", "cpu", "--out", str(out)], env)
    assert Image.open(out).size == (512, 512)
    assert read_png_text(out)["prompt"] == prompt
