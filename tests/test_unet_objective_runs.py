"""The four objectives (flow, eps, v, vdm) through the UNet stage in pixel space: each
trains, exports and samples with every sampler, in the stage and in the pipeline, and learns
a fixed batch; VDM's learned schedule is exported, resumes bitwise and is fixed by the seed;
VDM on VAE latents is refused. (The objectives' maths on their own: test_objectives.py.)"""

from __future__ import annotations

import pytest
import torch
from exports import write_vae_export
from learning import fixed_batch_losses
from safetensors.torch import load_file
from unet_runs import (
    KINDS,
    MODEL_TOML,
    PRESET,
    RES,
    SAMPLER_RUNS,
    config,
    finite,
    manifest,
    train_stage,
    val_lines,
)

from pipeline.load import ExportFolders, load_models
from pipeline.text2image import Text2Image
from stages.common.checkpoint import CheckpointManager
from stages.common.cli import run_stage
from stages.common.config import ConfigError
from stages.common.stage import RunContext
from stages.unet.export import load_unet
from stages.unet.objectives import OBJECTIVES
from stages.unet.samplers import SAMPLERS, RowNoise, cfg_velocity, seeded_noise
from stages.unet.schedules import LearnedSchedule
from stages.unet.stage import UNetStage, UNetStageConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", KINDS)
def test_each_objective_trains_exports_and_samples_with_every_sampler(kind, pixel_shards, tmp_path):
    runs = tmp_path / "runs"
    run = train_stage(config(pixel_shards, kind, val_every=2), runs)
    export = run / "export"
    info = manifest(export)["info"]
    assert info["objective"]["kind"] == kind
    assert info["time_convention"] == OBJECTIVES[kind].time_convention

    unet = load_unet(export, vae_hash=None, clip_hash=None)
    assert unet.objective.config.kind == kind
    assert not unet.conditional and unet.autoencoder == "identity"
    # No CLIP space here: a vdm run keeps its best checkpoint by bits/dim, the others none.
    best = CheckpointManager(run / "checkpoints").latest().manifest.get("best")
    assert (best or {}).get("metric") == ("bpd" if kind == "vdm" else None)
    seeds = [1, 2]
    noise = seeded_noise((3, RES, RES), seeds)
    grid = unet.objective.schedule.grid(3)
    assert grid[0] > 0.5 and grid[-1] == 0 and torch.all(grid[1:] < grid[:-1])
    velocity = cfg_velocity(unet.velocity(), None, None, 2.0)
    clipped = cfg_velocity(unet.velocity(clip_x0=True), None, None, 2.0)
    samples = {}
    for name, eta in SAMPLER_RUNS:
        x0 = SAMPLERS[name](velocity, noise, grid, RowNoise(seeds), eta)
        assert x0.shape == (2, 3, RES, RES) and torch.isfinite(x0).all(), (name, eta)
        samples[name, eta] = x0
        # With x0 clipped, the last step of these samplers lands on the clamped x0_hat.
        x0 = SAMPLERS[name](clipped, noise, grid, RowNoise(seeds), eta)
        assert torch.isfinite(x0).all(), (name, eta)
        if name != "heun":
            assert x0.abs().max() <= 1 + 1e-4, (name, eta)
    assert not torch.equal(samples["ddim", 0.5], samples["ddim", 0.0])  # eta adds noise
    # Stochastic samplers draw from per-image seeded streams: the same seeds, the same images.
    again = SAMPLERS["ancestral"](velocity, noise, grid, RowNoise(seeds), 0.0)
    assert torch.equal(again, samples["ancestral", 0.0])

    # The pipeline samples it with every sampler too.
    pipe = Text2Image(load_models(ExportFolders.from_runs(runs, PRESET)))
    for name, eta in SAMPLER_RUNS:
        out = pipe.generate(["", ""], seed=1, steps=3, sampler=name, eta=eta)
        assert [g.image.size for g in out] == [(RES, RES)] * 2, (name, eta)
        assert (out[0].metadata["sampler"], out[0].metadata["eta"]) == (name, str(eta))
        assert out[0].metadata["objective"] == kind

    val = val_lines(run)
    assert [x["step"] for x in val] == [2]
    assert "fd" not in val[0]  # no CLIP export of its own and no eval.clip_export: no FD
    weights = load_file(str(export / "model.safetensors"))
    schedule_keys = sorted(k for k in weights if k.startswith("schedule."))
    if kind != "vdm":
        assert schedule_keys == [] and "bpd" not in val[0]
        return

    # VDM: the bound on val in bits per dimension, and the learned schedule exported.
    assert finite(val[0]["bpd"]) and val[0]["bpd"] > 0
    learned = unet.objective.learned_schedule
    assert learned is not None
    assert schedule_keys == sorted(f"schedule.{k}" for k in learned.state_dict())
    # The exported schedule is the trained (EMA) one: the same tensors, the same gamma.
    checkpoint = CheckpointManager(run / "checkpoints").latest()
    assert checkpoint is not None and checkpoint.manifest["step"] == 2
    trained = LearnedSchedule()
    trained.load_state_dict(checkpoint.read("ema")["modules"]["schedule"])
    for key, value in trained.state_dict().items():
        assert torch.equal(learned.state_dict()[key], value), key
    u = torch.linspace(0, 1, 11)
    with torch.no_grad():
        assert torch.equal(learned.gamma(u), trained.gamma(u))
        fresh = LearnedSchedule(info["objective"]["gamma_min"], info["objective"]["gamma_max"])
        assert not torch.equal(learned.gamma(u), fresh.gamma(u))  # it was trained
    # The sampling grid follows the learned gamma: tau(u = 1) from gamma(1).
    gamma_1 = learned.gamma(torch.ones(1))
    alpha_1, sigma_1 = torch.sigmoid(-gamma_1).sqrt(), torch.sigmoid(gamma_1).sqrt()
    torch.testing.assert_close(grid[:1], sigma_1 / (alpha_1 + sigma_1))


@pytest.mark.parametrize("kind", KINDS)
def test_each_objective_learns_a_fixed_pixel_batch(kind, pixel_shards, tmp_path):
    """Issue 15: the pixel-space runs above only check finiteness; this asserts learning.
    Each objective's own loss on one fixed batch with fixed draws (time, noise, VDM's
    estimator) is a learnable toy: 40 AdamW steps must cut it clearly."""
    stage = UNetStage(config(pixel_shards, kind), RunContext(tmp_path / "runs", PRESET, "unet"))
    torch.manual_seed(0)
    modules = stage.build()
    batch = next(iter(stage.train_loader(0, 1)))
    before, after = fixed_batch_losses(stage, modules, batch)
    assert after < 0.7 * before, (kind, before, after)


# ---------------------------------------------------------------------------- refusals


def test_vdm_on_vae_latents_is_refused(pixel_shards, tmp_path, capsys):
    runs = tmp_path / "runs"
    torch.manual_seed(0)
    write_vae_export(runs / PRESET / "vae" / "export")
    ctx = RunContext(runs, PRESET, "unet")
    with pytest.raises(ConfigError, match="bits per dimension") as err:
        UNetStage(config(pixel_shards, "vdm", autoencoder="vae"), ctx)
    assert 'inputs.autoencoder = "identity"' in str(err.value)
    assert not ctx.run_dir.exists()  # refused before the run folder is touched
    # Through the stage's command line: a config error (exit 2), named.
    configs = tmp_path / "configs"
    (configs / PRESET).mkdir(parents=True)
    (configs / PRESET / "unet.toml").write_text(
        f'[data]\nresolution = 16\n[inputs]\nautoencoder = "vae"\ntext = false\n'
        f'[objective]\nkind = "vdm"\n[train]\ntrackers = []\n{MODEL_TOML}'
    )
    argv = ["--preset", PRESET, "--data", str(pixel_shards), "--runs", str(runs)]
    assert run_stage("unet", UNetStageConfig, UNetStage, argv, configs_dir=configs) == 2
    message = capsys.readouterr().err
    assert "config error" in message and "vdm" in message and "pixel space" in message
    assert not (ctx.run_dir / "checkpoints").exists()


# ------------------------------------------------------------------------------ resume


def test_vdm_resume_equals_an_uninterrupted_run(pixel_shards, tmp_path):
    straight = train_stage(config(pixel_shards, "vdm", max_steps=4), tmp_path / "a" / "runs")
    runs = tmp_path / "b" / "runs"
    half = train_stage(config(pixel_shards, "vdm", max_steps=2), runs)
    at_half = CheckpointManager(half / "checkpoints").latest()
    assert at_half is not None and at_half.manifest["step"] == 2
    schedule_at_half = at_half.read("model.schedule")
    resumed = train_stage(config(pixel_shards, "vdm", max_steps=4), runs)

    # The export (EMA UNet and schedule.* tensors) is bitwise the same...
    a = load_file(str(straight / "export" / "model.safetensors"))
    b = load_file(str(resumed / "export" / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("schedule.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # ...and so are the raw weights of both trained modules and their EMA.
    end_a = CheckpointManager(straight / "checkpoints").latest()
    end_b = CheckpointManager(resumed / "checkpoints").latest()
    assert end_a.manifest["step"] == end_b.manifest["step"] == 4
    for stem in ("model.unet", "model.schedule"):
        raw_a, raw_b = end_a.read(stem), end_b.read(stem)
        for key in raw_a:
            assert torch.equal(raw_a[key], raw_b[key]), (stem, key)
    ema_a, ema_b = end_a.read("ema")["modules"], end_b.read("ema")["modules"]
    for key in ema_a["schedule"]:
        assert torch.equal(ema_a["schedule"][key], ema_b["schedule"][key]), key
    # The schedule kept training after the resume (the comparison is not vacuous).
    final_schedule = end_b.read("model.schedule")
    assert any(not torch.equal(final_schedule[k], schedule_at_half[k]) for k in final_schedule)


def test_the_same_vdm_config_trains_the_same_model_whatever_ran_before(pixel_shards, tmp_path):
    """Like the UNet, the learned schedule starts from weights fixed by train.seed, so the
    same command twice gives the same export (the trainer seeds before ``build()``)."""
    exports = []
    for i in range(2):
        torch.manual_seed(100 + i)  # whatever the process drew before the stage was built
        run = train_stage(config(pixel_shards, "vdm"), tmp_path / f"r{i}" / "runs")
        exports.append(load_file(str(run / "export" / "model.safetensors")))
    a, b = exports
    mismatched = sorted(k for k in a if not torch.equal(a[k], b[k]))
    assert mismatched == []
