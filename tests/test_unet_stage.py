"""The latent-space UNet stage end to end on untrained VAE and CLIP exports: it trains,
evaluates and exports; it resumes through the shared loop to the same weights; it fine-tunes
from a UNet export on the same upstream; and its loss learns a fixed batch."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from learning import fixed_batch_losses
from PIL import Image
from safetensors.torch import load_file
from unet_runs import build_clip_export, copy_runs, stage_config

from stages.clip.export import load_clip
from stages.common.balance import BalanceConfig
from stages.common.cli import run_stage
from stages.common.config import ConfigError
from stages.common.export import ExportError
from stages.common.finetune import InitConfig
from stages.common.stage import RunContext
from stages.common.trainer import train
from stages.unet.export import load_unet
from stages.unet.samplers import cfg_velocity, euler_sample, seeded_noise
from stages.unet.schedules import FlowSchedule
from stages.unet.stage import UNetStage, UNetStageConfig
from stages.vae.export import load_vae

pytestmark = pytest.mark.usefixtures("one_thread")


# -------------------------------------------------------------------------- end to end


def write_preset(configs: Path, cfg_text: str) -> Path:
    (configs / "tiny").mkdir(parents=True, exist_ok=True)
    (configs / "tiny" / "unet.toml").write_text(cfg_text)
    return configs


def test_stage_trains_evaluates_and_exports(upstream_runs, tiny_shards, tmp_path):
    runs = copy_runs(upstream_runs, tmp_path)
    configs = write_preset(
        tmp_path / "configs",
        """
[data]
resolution = 16
batch_size = 8
[train]
max_steps = 4
val_every = 2
preview_every = 4
trackers = []
[optim]
lr = 1e-3
warmup_steps = 1
[model]
base_channels = 16
channel_mult = [1, 2]
num_res_blocks = 1
attention_resolutions = [4]
head_dim = 8
groups = 8
[cache]
shard_size = 40
[sample]
steps = 3
[eval]
num_images = 8
grid_rows = 2
grid_seeds = 2
""",
    )
    argv = ["--preset", "tiny", "--data", str(tiny_shards), "--runs", str(runs)]
    assert run_stage("unet", UNetStageConfig, UNetStage, argv, configs_dir=configs) == 0
    run = runs / "tiny" / "unet"
    vae = load_vae(runs / "tiny" / "vae" / "export")
    clip = load_clip(runs / "tiny" / "clip" / "export")

    # Validation logged both numbers and the reference; the grid has EMA | raw columns.
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [x for x in lines if x["split"] == "val"]
    assert [x["step"] for x in val] == [2, 4]
    for key in ("fd", "clip_score", "ref_fd_halves", "ref_clip_score"):
        assert all(isinstance(x[key], float) for x in val), key
    grid = run / "previews" / "samples_0000004.png"
    with Image.open(grid) as image:  # 2 prompts x (2 EMA + 2 raw seeds) of 16 px, padding 1
        assert image.size == (4 * 17 + 1, 2 * 17 + 1)
    assert len(list((run / "cache").iterdir())) == 1

    # The export records both upstream hashes and the sampling defaults; it samples.
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    assert manifest["upstream"] == {"vae": vae.hash, "clip": clip.hash}
    assert manifest["info"]["latent_shape"] == [4, 8, 8]
    unet = load_unet(run / "export", vae_hash=vae.hash, clip_hash=clip.hash)
    assert unet.sampling.steps == 3 and unet.model.config.context_dim == 32
    weights = load_file(str(run / "export" / "model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in weights.items() if k.startswith("conv_out"))
    cond = clip.encode_text(["a red circle", "a blue square"])
    velocity = cfg_velocity(unet.velocity(), cond, clip.null, 3.0)
    x0 = euler_sample(velocity, seeded_noise((4, 8, 8), [1, 2]), FlowSchedule().grid(3))
    assert x0.shape == (2, 4, 8, 8) and torch.isfinite(x0).all()

    # Sampling with other exports is refused, naming both hashes.
    with pytest.raises(ExportError) as err:
        load_unet(run / "export", vae_hash=vae.hash, clip_hash="0" * 64)
    assert clip.hash in str(err.value) and "0" * 64 in str(err.value)

    # Re-running the finished command does nothing and succeeds.
    assert run_stage("unet", UNetStageConfig, UNetStage, argv, configs_dir=configs) == 0


# ------------------------------------------------------------------------------ resume


def train_run(
    runs: Path, shards: Path, max_steps: int, cache: bool = True, balance: bool = False
) -> dict:

    cfg = stage_config(shards, max_steps=max_steps, val_every=0, preview_every=0)
    cfg = replace(cfg, cache=replace(cfg.cache, enabled=cache))
    if balance:  # every name word of the tiny captions a concept, each capped at one sample
        cfg = replace(cfg, balance=BalanceConfig(True, cap=1, min_count=2, min_look_auc=0.0))
    assert (
        train(UNetStage(cfg, RunContext(runs, "tiny", "unet")), RunContext(runs, "tiny", "unet"))
        == 0
    )
    return load_file(str(runs / "tiny" / "unet" / "export" / "model.safetensors"))


def test_resume_through_the_shared_loop_equals_an_uninterrupted_run(
    upstream_runs, tiny_shards, tmp_path
):
    straight = train_run(copy_runs(upstream_runs, tmp_path / "a"), tiny_shards, 6)
    runs = copy_runs(upstream_runs, tmp_path / "b")
    train_run(runs, tiny_shards, 3)
    resumed = train_run(runs, tiny_shards, 6)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    # Without the cache (encoding on the fly) the same stream trains to nearly the same
    # weights: only the fp16 storage of the text states differs.
    fly = train_run(copy_runs(upstream_runs, tmp_path / "c"), tiny_shards, 6, cache=False)
    assert not (tmp_path / "c" / "runs" / "tiny" / "unet" / "cache").exists()
    for key in straight:
        torch.testing.assert_close(fly[key], straight[key], atol=2e-3, rtol=2e-2)


def test_concept_balanced_runs_resume_exactly_and_report_the_balance(
    upstream_runs, tiny_shards, tmp_path
):
    straight = train_run(copy_runs(upstream_runs, tmp_path / "a"), tiny_shards, 6, balance=True)
    runs = copy_runs(upstream_runs, tmp_path / "b")
    train_run(runs, tiny_shards, 3, balance=True)
    resumed = train_run(runs, tiny_shards, 6, balance=True)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    report = json.loads((runs / "tiny" / "unet" / "balance.json").read_text())
    assert report["concepts"] > 0 and report["downweighted_samples"] > 0
    uniform = train_run(copy_runs(upstream_runs, tmp_path / "c"), tiny_shards, 6)
    assert any(not torch.equal(straight[k], uniform[k]) for k in straight)  # another stream


# ------------------------------------------------------------------------- fine-tuning


def fine_tune(runs: Path, shards: Path, name: str, source: Path, steps: int, **model) -> Path:
    """A new run ``runs/tiny/<name>`` started from the UNet export at ``source``."""

    cfg = stage_config(shards, max_steps=steps, val_every=0, preview_every=0)
    cfg = replace(cfg, init=InitConfig(from_=str(source)), model=replace(cfg.model, **model))
    ctx = RunContext(runs, "tiny", name)
    assert train(UNetStage(cfg, ctx), ctx) == 0
    return ctx.run_dir / "export"


def test_fine_tuning_starts_from_a_unet_export_on_the_same_upstream(
    upstream_runs, tiny_shards, tmp_path
):
    runs = copy_runs(upstream_runs, tmp_path)
    train_run(runs, tiny_shards, 2)
    source = runs / "tiny" / "unet" / "export"
    source_hash = json.loads((source / "manifest.json").read_text())["hash"]
    # No step: the export is exactly the weights it started from, and says so.
    same = fine_tune(runs, tiny_shards, "ft0", source, 0)
    start, kept = (
        load_file(str(source / "model.safetensors")),
        load_file(str(same / "model.safetensors")),
    )
    assert start.keys() == kept.keys() and all(torch.equal(start[k], kept[k]) for k in start)
    manifest = json.loads((same / "manifest.json").read_text())
    assert manifest["info"]["init"] == {"from": str(source), "hash": source_hash}
    # Another architecture is refused by name.
    with pytest.raises(ConfigError, match="model.base_channels"):
        fine_tune(runs, tiny_shards, "ft1", source, 1, base_channels=8)
    # A CLIP export other than the one the UNet learned from: refused, naming both hashes.
    old_clip = manifest["upstream"]["clip"]
    shutil.rmtree(runs / "tiny" / "clip" / "export")
    vae_hash = manifest["upstream"]["vae"]
    new_clip = build_clip_export(runs / "tiny" / "clip" / "export", tiny_shards, vae_hash, 7)
    with pytest.raises(ExportError, match="init.from") as err:
        fine_tune(runs, tiny_shards, "ft2", source, 1)
    assert old_clip in str(err.value) and new_clip in str(err.value)


# ---------------------------------------------------------------------------- learning


def test_the_stage_loss_learns_a_fixed_batch(upstream_runs, tiny_shards, tmp_path):
    """Issue 15: the end-to-end runs only check finiteness; this asserts learning. The
    stage's own loss (cache path, objective, CFG dropout) on one fixed batch with fixed draws
    of time, noise and dropout is a learnable toy: 40 AdamW steps must cut it clearly."""
    runs = copy_runs(upstream_runs, tmp_path)
    stage = UNetStage(stage_config(tiny_shards), RunContext(runs, "tiny", "unet"))
    torch.manual_seed(0)
    modules = stage.build()
    batch = next(iter(stage.train_loader(0, 1)))
    before, after = fixed_batch_losses(stage, modules, batch)
    assert after < 0.5 * before, (before, after)
