"""The UNet stage's modes end to end: pixel space (identity autoencoder), unconditional
models, the four objectives (flow, eps, v, vdm) through the stage, the export, the pipeline
and every sampler; VDM's learned schedule in the export and across a resume; refusals; the
FD in another CLIP export's space; and the presets. Tiny 8 px shards, CPU, a few steps."""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from exports import one_torch_thread, write_vae_export
from learning import fixed_batch_losses
from PIL import Image
from safetensors.torch import load_file
from synthetic import make_shards

from pipeline.__main__ import main
from pipeline.load import ExportFolders, load_models
from pipeline.png import read_png_text
from pipeline.text2image import SampleConfig, Text2Image
from stages.clip.export import build_clip_modules, save_clip_export
from stages.clip.model import CLIPModelConfig, ImageTowerConfig, TextEncoderConfig
from stages.clip.tokenizer import train_tokenizer
from stages.common.checkpoint import CheckpointManager
from stages.common.cli import run_stage
from stages.common.config import CONFIGS_DIR, ConfigError, load_config
from stages.common.data import iter_split
from stages.common.stage import RunContext
from stages.common.trainer import train
from stages.unet.export import load_unet
from stages.unet.model import UNet, UNetConfig, count_parameters
from stages.unet.objectives import OBJECTIVES
from stages.unet.samplers import (
    SAMPLERS,
    RowNoise,
    SamplingConfig,
    cfg_velocity,
    check_sampling,
    seeded_noise,
)
from stages.unet.schedules import LearnedSchedule
from stages.unet.stage import InputsConfig, UNetStage, UNetStageConfig, resolve_model
from stages.vae.export import IdentityAutoencoder

RES = 8  # pixel space: the UNet denoises 3 x 8 x 8 images
PRESET = "modes"
KINDS = ("flow", "eps", "v", "vdm")
# (sampler, eta): every sampler, DDIM deterministic and stochastic.
SAMPLER_RUNS = (("euler", 0.0), ("heun", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("ancestral", 0.0))
MODEL = UNetConfig(
    base_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    head_dim=8,
    ff_mult=0,
    groups=4,
)
MODEL_TOML = """
[model]
base_channels = 8
channel_mult = [1, 2]
num_res_blocks = 1
attention_resolutions = [4]
head_dim = 8
ff_mult = 0
groups = 4
"""


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """32 train and 16 val synthetic 8 px samples (read-only)."""
    folder = tmp_path_factory.mktemp("shards8")
    return make_shards(folder, n_train=32, n_val=16, resolution=RES, shard_size=16)


def write_pixel_clip(folder: Path, shards: Path, image_size: int, seed: int = 0) -> str:
    """An untrained CLIP export whose image tower reads [-1, 1] pixels (no VAE upstream)."""
    torch.manual_seed(seed)
    captions = [c for batch in iter_split(shards / "train", 64, RES) for c in batch["caption"]]
    tokenizer = train_tokenizer(captions, vocab_size=300, context_length=12)
    cfg = CLIPModelConfig(
        embed_dim=16,
        text=TextEncoderConfig(context_length=12, width=32, layers=1, heads=2),
        image=ImageTowerConfig(input="pixel", patch_size=4, width=32, layers=1, heads=2),
    )
    m = build_clip_modules(cfg, tokenizer.vocab_size, image_channels=3, image_size=image_size)
    return save_clip_export(folder, m["text"], m["image"], m["logit_scale"], tokenizer)


@pytest.fixture(scope="module")
def pixel_clips(shards, tmp_path_factory) -> dict[int, Path]:
    """Pixel-input CLIP exports by image side: 8 (the data's) and 16 (resized to)."""
    root = tmp_path_factory.mktemp("pixel-clips")
    folders = {size: root / f"clip{size}" / "export" for size in (RES, 2 * RES)}
    for size, folder in folders.items():
        write_pixel_clip(folder, shards, size)
    return folders


def config(
    shards: Path, kind: str = "flow", autoencoder: str = "identity", text: bool = False, **train_kw
) -> UNetStageConfig:
    cfg = UNetStageConfig()
    train_kw = {"max_steps": 2, "val_every": 0, "preview_every": 0, **train_kw}
    return replace(
        cfg,
        data=replace(cfg.data, path=str(shards), resolution=RES, batch_size=8),
        train=replace(cfg.train, trackers=(), log_every=1, **train_kw),
        optim=replace(cfg.optim, lr=1e-3, warmup_steps=0, schedule="constant"),
        ckpt=replace(cfg.ckpt, every_steps=0, every_minutes=0.0),
        model=MODEL,
        inputs=InputsConfig(autoencoder=autoencoder, text=text),  # type: ignore[arg-type]
        objective=replace(cfg.objective, kind=kind),
        sample=SamplingConfig(steps=3, cfg_scale=2.0),
        eval=replace(
            cfg.eval, num_images=8, grid_rows=2, grid_seeds=2, batch_size=16, bpd_images=16
        ),
    )


def train_stage(cfg: UNetStageConfig, runs: Path) -> Path:
    """Train through the shared loop (resuming if the run folder has a checkpoint)."""
    ctx = RunContext(runs, PRESET, "unet")
    assert train(UNetStage(cfg, ctx), ctx) == 0
    return ctx.run_dir


def val_lines(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["split"] == "val"]


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def pixels(generated) -> np.ndarray:
    return np.asarray(generated.image, dtype=np.int16)


def finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


# --------------------------------------------------------- pixel space, unconditional


def test_pixel_space_unconditional_run_end_to_end(shards, tmp_path, capsys, monkeypatch):
    # The preset's name is a real one, so `python -m pipeline` reads its sample.toml.
    preset = "pokepixels-9m"
    configs = tmp_path / "configs"
    (configs / preset).mkdir(parents=True)
    (configs / preset / "unet.toml").write_text(
        f"""
[data]
resolution = {RES}
batch_size = 8
[train]
max_steps = 2
val_every = 0
preview_every = 2
trackers = []
[optim]
lr = 1e-3
warmup_steps = 0
[inputs]
autoencoder = "identity"
text = false
[objective]
kind = "eps"
{MODEL_TOML}
[sample]
sampler = "ddim"
steps = 3
clip_x0 = true
[eval]
grid_rows = 2
grid_seeds = 2
"""
    )
    runs = tmp_path / "runs"
    argv = ["--preset", preset, "--data", str(shards), "--runs", str(runs)]
    assert run_stage("unet", UNetStageConfig, UNetStage, argv, configs_dir=configs) == 0
    folders = ExportFolders.from_runs(runs, preset)
    assert not folders.vae.exists() and not folders.clip.exists()  # none was ever needed
    run = runs / preset / "unet"

    # The export records no upstream and says what it needs: pixels, no text.
    recorded = manifest(folders.unet)
    assert recorded["upstream"] == {}
    assert json.loads((run / "upstream.json").read_text()) == {}
    info = recorded["info"]
    assert info["inputs"] == {"autoencoder": "identity", "text": False}
    assert info["latent_shape"] == [3, RES, RES] and info["resolution"] == RES
    assert info["model"]["context_dim"] == -1 and info["model"]["in_channels"] == 3
    assert info["objective"]["kind"] == "eps"
    assert not (run / "cache").exists()  # nothing to cache without a VAE and a CLIP
    # Unconditional preview: 2 rows x (2 EMA + 2 raw) cells of 8 px, padding 1.
    with Image.open(run / "previews" / "samples_0000002.png") as grid:
        assert grid.size == (4 * (RES + 1) + 1, 2 * (RES + 1) + 1)

    # The pipeline loads it with no VAE or CLIP folder anywhere.
    models = load_models(folders)
    assert isinstance(models.vae, IdentityAutoencoder) and models.clip is None
    assert not models.unet.conditional and models.unet.autoencoder == "identity"
    assert models.hashes["clip"] == "none" and models.hashes["unet"] == recorded["hash"]
    pipe = Text2Image(models)
    assert pipe.resolution == RES and not pipe.conditional
    out = pipe.generate(["", ""], seed=3, steps=3)
    assert [g.image.size for g in out] == [(RES, RES)] * 2
    assert out[0].metadata["objective"] == "eps" and out[0].metadata["sampler"] == "ddim"
    assert out[0].metadata["prompt"] == "" and out[0].metadata["clip_hash"] == "none"
    alone = pipe.generate([""], seed=4, steps=3)  # image i uses seed + i, whatever the batch
    np.testing.assert_array_equal(pixels(out[1]), pixels(alone[0]))
    np.testing.assert_array_equal(pixels(alone[0]), pixels(pipe.generate([""], seed=4)[0]))
    assert np.abs(pixels(out[0]) - pixels(out[1])).max() > 0  # another seed, another image
    # A prompt or a negative prompt for an unconditional model is a clear error.
    with pytest.raises(ValueError, match="unconditional"):
        pipe.generate(["a red circle"], steps=2)
    with pytest.raises(ValueError, match="unconditional"):
        pipe.generate([""], negative_prompt="a blue square", steps=2)

    # `python -m pipeline generate` with no prompt writes the same image.
    png = tmp_path / "uncond.png"
    common = ["--preset", preset, "--runs", str(runs), "--device", "cpu", "--seed", "3"]
    common += ["--precision", "fp32"]  # the same precision as `pipe` above
    assert main(["generate", "--steps", "3", "--out", str(png), *common]) == 0
    assert capsys.readouterr().out.strip() == str(png)
    text = read_png_text(png)
    assert (text["prompt"], text["sampler"], text["steps"]) == ("", "ddim", "3")
    with Image.open(png) as image:
        assert image.size == (RES, RES)
        np.testing.assert_array_equal(np.asarray(image.convert("RGB"), np.int16), pixels(out[0]))
    # --eta reaches DDIM, and is refused for a sampler it does not apply to.
    noisy = tmp_path / "eta.png"
    assert main(["generate", "--steps", "3", "--eta", "0.5", "--out", str(noisy), *common]) == 0
    assert read_png_text(noisy)["eta"] == "0.5"
    with Image.open(png) as plain, Image.open(noisy) as stochastic:
        assert np.abs(np.asarray(plain, np.int16) - np.asarray(stochastic, np.int16)).max() > 0
    bad = ["generate", "--sampler", "euler", "--eta", "0.5", "--out", str(tmp_path / "x.png")]
    capsys.readouterr()
    assert main([*bad, *common]) == 2
    assert "ddim" in capsys.readouterr().err
    # A prompt on the command line is refused with the same message.
    assert main(["generate", "a red circle", "--out", str(tmp_path / "y.png"), *common]) == 2
    assert "unconditional" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()
    # `interactive` reads seeds for it: one PNG per seed, a word is refused and skipped.
    monkeypatch.setattr(sys, "stdin", io.StringIO("3\na red circle\n4\n\n9\n"))
    folder = tmp_path / "samples"
    assert main(["interactive", "--folder", str(folder), "--steps", "3", *common]) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == [str(folder / "000000.png"), str(folder / "000001.png")]
    assert "type a seed" in captured.err
    assert [read_png_text(folder / f"00000{i}.png")["seed"] for i in (0, 1)] == ["3", "4"]
    with Image.open(folder / "000000.png") as image:
        np.testing.assert_array_equal(np.asarray(image.convert("RGB"), np.int16), pixels(out[0]))


# ------------------------------------------------------------------------- objectives


@pytest.mark.parametrize("kind", KINDS)
def test_each_objective_trains_exports_and_samples_with_every_sampler(kind, shards, tmp_path):
    runs = tmp_path / "runs"
    run = train_stage(config(shards, kind, val_every=2), runs)
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


# --------------------------------------------------------------------------- refusals


def test_vdm_on_vae_latents_is_refused(shards, tmp_path, capsys):
    runs = tmp_path / "runs"
    torch.manual_seed(0)
    write_vae_export(runs / PRESET / "vae" / "export")
    ctx = RunContext(runs, PRESET, "unet")
    with pytest.raises(ConfigError, match="bits per dimension") as err:
        UNetStage(config(shards, "vdm", autoencoder="vae"), ctx)
    assert 'inputs.autoencoder = "identity"' in str(err.value)
    assert not ctx.run_dir.exists()  # refused before the run folder is touched
    # Through the stage's command line: a config error (exit 2), named.
    configs = tmp_path / "configs"
    (configs / PRESET).mkdir(parents=True)
    (configs / PRESET / "unet.toml").write_text(
        f'[data]\nresolution = 16\n[inputs]\nautoencoder = "vae"\ntext = false\n'
        f'[objective]\nkind = "vdm"\n[train]\ntrackers = []\n{MODEL_TOML}'
    )
    argv = ["--preset", PRESET, "--data", str(shards), "--runs", str(runs)]
    assert run_stage("unet", UNetStageConfig, UNetStage, argv, configs_dir=configs) == 2
    message = capsys.readouterr().err
    assert "config error" in message and "vdm" in message and "pixel space" in message
    assert not (ctx.run_dir / "checkpoints").exists()


# ---------------------------------------------------------- text-conditional pixels


def test_text_conditional_pixel_space_run_trains_and_samples_with_cfg(
    shards, pixel_clips, tmp_path
):
    runs = tmp_path / "runs"
    shutil.copytree(pixel_clips[RES], runs / PRESET / "clip" / "export")
    clip_hash = manifest(pixel_clips[RES])["hash"]
    run = train_stage(config(shards, "flow", text=True, val_every=2), runs)
    assert json.loads((run / "upstream.json").read_text()) == {"clip": clip_hash}
    recorded = manifest(run / "export")
    assert recorded["upstream"] == {"clip": clip_hash}
    assert recorded["info"]["inputs"] == {"autoencoder": "identity", "text": True}
    assert not (run / "cache").exists()  # the latent cache is for VAE latents only
    # Its own (pixel-input) CLIP export measures the FD and the CLIP score.
    val = val_lines(run)[0]
    for key in ("fd", "clip_score", "ref_fd_halves", "ref_clip_score"):
        assert finite(val[key]), key

    folders = ExportFolders.from_runs(runs, PRESET)
    assert not folders.vae.exists()
    models = load_models(folders)
    assert isinstance(models.vae, IdentityAutoencoder) and models.clip.hash == clip_hash
    unet = models.unet
    assert unet.conditional and unet.model.config.context_dim == models.clip.width
    assert unet.model.config.in_channels == 3

    # CFG: v = v_u + s (v_c - v_u) in one batched forward; s = 0 is the null branch alone.
    clip = models.clip
    cond = clip.encode_text(["a red circle", "a blue square"])
    y, tau = seeded_noise((3, RES, RES), [5, 6]), torch.full((2,), 0.7)
    net = unet.velocity()
    with torch.no_grad():
        v_c, v_u = net(y, tau, cond), net(y, tau, clip.null.expand(2))
        assert not torch.allclose(v_c, v_u)  # the trained network reads the text
        for scale in (0.0, 4.0):
            guided = cfg_velocity(net, cond, clip.null, scale)(y, tau)
            torch.testing.assert_close(guided, v_u + scale * (v_c - v_u), atol=1e-5, rtol=1e-4)
    grid = unet.objective.schedule.grid(3)
    noise = seeded_noise((3, RES, RES), [1, 2])
    plain = SAMPLERS["euler"](cfg_velocity(net, cond, clip.null, 1.0), noise, grid)
    guided = SAMPLERS["euler"](cfg_velocity(net, cond, clip.null, 4.0), noise, grid)
    assert torch.isfinite(guided).all() and not torch.equal(plain, guided)

    pipe = Text2Image(models)
    out = pipe.generate(["a red circle", "a blue square"], seed=1, steps=3, cfg_scale=4.0)
    assert [g.image.size for g in out] == [(RES, RES)] * 2
    assert out[0].metadata["clip_hash"] == clip_hash and out[0].metadata["vae_hash"] == "identity"
    alone = pipe.generate(["a blue square"], seed=2, steps=3, cfg_scale=4.0)
    np.testing.assert_array_equal(pixels(out[1]), pixels(alone[0]))


# ------------------------------------------------------------------ FD via clip_export


def test_eval_clip_export_gives_an_fd_for_an_unconditional_model(shards, pixel_clips, tmp_path):
    cfg = config(shards, "flow", val_every=2)
    # A 16 px CLIP for 8 px images: generated and real images are resized alike.
    cfg = replace(cfg, eval=replace(cfg.eval, clip_export=str(pixel_clips[2 * RES])))
    run = train_stage(cfg, tmp_path / "runs")
    val = val_lines(run)
    assert [x["step"] for x in val] == [2]
    assert finite(val[0]["fd"]) and val[0]["fd"] >= 0 and finite(val[0]["ref_fd_halves"])
    assert "clip_score" not in val[0]  # no text: no CLIP score
    assert manifest(run / "export")["upstream"] == {}  # the eval CLIP is no upstream


# ------------------------------------------------------------------------------ resume


def test_vdm_resume_equals_an_uninterrupted_run(shards, tmp_path):
    straight = train_stage(config(shards, "vdm", max_steps=4), tmp_path / "a" / "runs")
    runs = tmp_path / "b" / "runs"
    half = train_stage(config(shards, "vdm", max_steps=2), runs)
    at_half = CheckpointManager(half / "checkpoints").latest()
    assert at_half is not None and at_half.manifest["step"] == 2
    schedule_at_half = at_half.read("model.schedule")
    resumed = train_stage(config(shards, "vdm", max_steps=4), runs)

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


def test_the_same_vdm_config_trains_the_same_model_whatever_ran_before(shards, tmp_path):
    """Like the UNet, the learned schedule starts from weights fixed by train.seed, so the
    same command twice gives the same export (the trainer seeds before ``build()``)."""
    exports = []
    for i in range(2):
        torch.manual_seed(100 + i)  # whatever the process drew before the stage was built
        run = train_stage(config(shards, "vdm"), tmp_path / f"r{i}" / "runs")
        exports.append(load_file(str(run / "export" / "model.safetensors")))
    a, b = exports
    mismatched = sorted(k for k in a if not torch.equal(a[k], b[k]))
    assert mismatched == []


# ----------------------------------------------------------------------------- presets

ALL_PRESETS = ("tiny", "small", "base", "pokepixels-9m", "cifar-ddpm-17m", "ddpm-58m", "vdm")
# Pixel-space, unconditional presets: (parameters, objective kind).
NEW_PRESETS = {
    "pokepixels-9m": (9.9e6, "eps"),
    "cifar-ddpm-17m": (17.3e6, "eps"),
    "ddpm-58m": (59.1e6, "eps"),
    "vdm": (9.9e6, "vdm"),
}


@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_preset_loads_strictly(preset):
    cfg = load_config(UNetStageConfig, preset, "unet")
    sample = load_config(SampleConfig, preset, "sample")
    check_sampling(cfg.sample.sampler, cfg.sample.steps, cfg.sample.eta)
    # What sample.toml sets agrees with the defaults the UNet export will record.
    assert sample.sampling(cfg.sample) == cfg.sample


@pytest.mark.parametrize("preset", sorted(NEW_PRESETS))
def test_new_pixel_presets_size_and_sampling(preset):
    expected, kind = NEW_PRESETS[preset]
    cfg = load_config(UNetStageConfig, preset, "unet")
    assert cfg.inputs == InputsConfig(autoencoder="identity", text=False)
    assert cfg.objective.kind == kind
    assert cfg.sample.clip_x0  # pixel space: x0 clamped to [-1, 1] while sampling
    model = resolve_model(cfg.model, channels=3, context_dim=-1, side=cfg.data.resolution)
    with torch.device("meta"):
        count = count_parameters(UNet(model))
    assert abs(count - expected) <= 0.05 * expected, count
    recorded = tomllib.loads((CONFIGS_DIR / preset / "sample.toml").read_text())
    assert recorded["sampler"] == cfg.sample.sampler
    assert recorded["steps"] == cfg.sample.steps
    sample = load_config(SampleConfig, preset, "sample")
    assert sample.sampling(cfg.sample) == cfg.sample  # the pipeline samples as the previews


def test_vdm_preset_is_pixel_space_and_ddpm_58m_uses_cosine_betas():
    assert load_config(UNetStageConfig, "ddpm-58m", "unet").objective.beta_schedule == "cosine"
    for preset in ("pokepixels-9m", "cifar-ddpm-17m"):
        assert load_config(UNetStageConfig, preset, "unet").objective.beta_schedule == "linear"
    # The vdm preset's UNet is the pokepixels-9m network.
    vdm, poke = (load_config(UNetStageConfig, p, "unet") for p in ("vdm", "pokepixels-9m"))
    assert vdm.model == poke.model and vdm.data.resolution == poke.data.resolution


@pytest.mark.parametrize("kind", KINDS)
def test_each_objective_learns_a_fixed_pixel_batch(kind, shards, tmp_path):
    """Issue 15: the pixel-space runs above only check finiteness; this asserts learning.
    Each objective's own loss on one fixed batch with fixed draws (time, noise, VDM's
    estimator) is a learnable toy: 40 AdamW steps must cut it clearly."""
    stage = UNetStage(config(shards, kind), RunContext(tmp_path / "runs", PRESET, "unet"))
    torch.manual_seed(0)
    modules = stage.build()
    batch = next(iter(stage.train_loader(0, 1)))
    before, after = fixed_batch_losses(stage, modules, batch)
    assert after < 0.7 * before, (kind, before, after)
