"""What the UNet stage reads (its [inputs]): VAE latents normalised by the export's
statistics and cached with the text states, the upstream exports a run was trained on, and
pixel space (the identity autoencoder), unconditional or with a pixel-input CLIP, through
the export, the pipeline and its command line."""

from __future__ import annotations

import io
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from unet_runs import (
    MODEL_TOML,
    PRESET,
    RES,
    build_clip_export,
    build_vae_export,
    config,
    copy_runs,
    finite,
    manifest,
    pixels,
    stage_config,
    train_stage,
    val_lines,
)

from pipeline.__main__ import main
from pipeline.load import ExportFolders, load_models
from pipeline.png import read_png_text
from pipeline.text2image import Text2Image
from stages.clip.export import TextCondition
from stages.common.cache import CachedRows
from stages.common.cli import run_stage
from stages.common.data import iter_split
from stages.common.export import ExportError
from stages.common.stage import RunContext
from stages.unet import stage as stage_module
from stages.unet.encode import encode_batch, latents_and_condition
from stages.unet.samplers import SAMPLERS, cfg_velocity, seeded_noise
from stages.unet.stage import UNetStage, UNetStageConfig
from stages.vae.export import IdentityAutoencoder, load_vae

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------ latent space


def test_unet_sees_latents_normalised_by_the_vae_exports_statistics(tmp_path):
    """(z - latent_mean) / latent_std with the export's own per-channel values: every other
    test export has mean 0 and std 1, where dropping the normalisation changes nothing."""
    m, s = torch.tensor([0.5, -1.0, 2.0, 0.25]), torch.tensor([2.0, 0.5, 4.0, 1.5])
    build_vae_export(tmp_path / "vae", mean=m, std=s)
    vae = load_vae(tmp_path / "vae")
    z = torch.randn(3, 4, 4, 4)
    by_hand = (z - m.view(1, 4, 1, 1)) / s.view(1, 4, 1, 1)
    torch.testing.assert_close(vae.normalize(z), by_hand)
    torch.testing.assert_close(vae.denormalize(by_hand), z)
    # The training path (cache and on the fly): a posterior with zero std samples its mean.
    batch = {
        "latent_mean": z,
        "latent_std": torch.zeros_like(z),
        "tokens": torch.zeros(3, 2, 8),
        "mask": torch.ones(3, 2, dtype=torch.bool),
        "pooled": torch.zeros(3, 8),
    }
    x0, cond = latents_and_condition(batch, vae, torch.device("cpu"))
    torch.testing.assert_close(x0, by_hand)
    assert isinstance(cond, TextCondition) and cond.tokens.shape == (3, 2, 8)


def test_cache_holds_the_on_the_fly_encoding_and_follows_the_exports(
    upstream_runs, tiny_shards, tmp_path, monkeypatch
):
    """The stage's encode function in the shared cache (stages/common/cache.py, tested on
    its own in test_cache.py): same values as on the fly, rebuilt for another VAE export."""
    runs = copy_runs(upstream_runs, tmp_path)
    encoded = []
    real = stage_module.encode_batch
    monkeypatch.setattr(
        stage_module, "encode_batch", lambda *a, **k: encoded.append(len(a[3])) or real(*a, **k)
    )
    ctx = RunContext(runs, "tiny", "unet")
    stage = UNetStage(stage_config(tiny_shards), ctx)
    loader = stage.train_loader(0, 1)
    rows = loader.dataset
    assert isinstance(rows, CachedRows) and len(rows) == 96 and sum(encoded) == 96
    (folder,) = (ctx.run_dir / "cache").iterdir()
    assert len(list(folder.glob("*.safetensors"))) == 3  # shard_size 40

    batch = next(iter_split(tiny_shards / "train", 8, 16))
    fresh = encode_batch(stage.vae, stage.clip, batch["image"], batch["caption"])
    cached = rows.__getitems__(list(range(8)))
    assert cached["key"] == batch["key"] and cached["caption"] == batch["caption"]
    torch.testing.assert_close(cached["latent_mean"], fresh["latent_mean"])
    torch.testing.assert_close(cached["latent_std"], fresh["latent_std"])
    assert cached["tokens"].dtype == torch.float16  # cache.text_dtype
    torch.testing.assert_close(cached["tokens"].float(), fresh["tokens"], atol=2e-3, rtol=2e-3)
    assert torch.equal(cached["mask"], fresh["mask"])

    stage.train_loader(0, 1)  # a hit: nothing encoded again
    assert sum(encoded) == 96

    # Another VAE export: another key, encoded anew; the stale folder goes away.
    shutil.rmtree(runs / "tiny" / "vae" / "export")
    build_vae_export(runs / "tiny" / "vae" / "export", seed=1)
    shutil.rmtree(runs / "tiny" / "clip" / "export")
    vae_hash = load_vae(runs / "tiny" / "vae" / "export").hash
    build_clip_export(runs / "tiny" / "clip" / "export", tiny_shards, vae_hash)
    UNetStage(stage_config(tiny_shards), ctx).train_loader(0, 1)
    assert sum(encoded) == 192
    (other,) = (ctx.run_dir / "cache").iterdir()
    assert other.name != folder.name


def test_run_on_other_upstream_exports_is_moved_aside_not_resumed(
    upstream_runs, tiny_shards, tmp_path
):
    """Issue 15, item 4: a UNet run folder trained on other exports is never resumed nor a
    dead end (it used to refuse and say to delete it): it is kept aside, a new run starts."""
    runs = copy_runs(upstream_runs, tmp_path)
    ctx = RunContext(runs, "tiny", "unet")
    stage = UNetStage(stage_config(tiny_shards), ctx)
    recorded = json.loads((ctx.run_dir / "upstream.json").read_text())
    assert recorded == {"vae": stage.vae.hash, "clip": stage.clip.hash}
    (ctx.run_dir / "checkpoints").mkdir()  # stands for the run's state
    UNetStage(stage_config(tiny_shards), ctx)  # same exports: the folder is kept
    assert (ctx.run_dir / "checkpoints").exists()

    # The CLIP export is replaced by one from another training: the old run goes aside.
    old_clip = stage.clip.hash
    shutil.rmtree(runs / "tiny" / "clip" / "export")
    new_clip = build_clip_export(runs / "tiny" / "clip" / "export", tiny_shards, stage.vae.hash, 7)
    UNetStage(stage_config(tiny_shards), ctx)
    (stale,) = (runs / "tiny").glob("unet.stale-*")
    assert json.loads((stale / "upstream.json").read_text())["clip"] == old_clip
    assert (stale / "checkpoints").exists() and not (ctx.run_dir / "checkpoints").exists()
    assert json.loads((ctx.run_dir / "upstream.json").read_text())["clip"] == new_clip

    # A CLIP export trained on another VAE is refused before anything is trained.
    shutil.rmtree(runs / "tiny" / "clip" / "export")
    build_clip_export(runs / "tiny" / "clip" / "export", tiny_shards, "f" * 64)
    with pytest.raises(ExportError, match="f" * 64):
        UNetStage(stage_config(tiny_shards), RunContext(runs, "tiny", "unet2"))

    # A missing upstream export is named, with the command that makes it.
    shutil.rmtree(runs / "tiny" / "vae")
    with pytest.raises(ExportError, match="make vae"):
        UNetStage(stage_config(tiny_shards), RunContext(runs, "tiny", "unet3"))


# ------------------------------------------------------------------------- pixel space


def test_pixel_space_unconditional_run_end_to_end(pixel_shards, tmp_path, capsys, monkeypatch):
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
    argv = ["--preset", preset, "--data", str(pixel_shards), "--runs", str(runs)]
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


def test_text_conditional_pixel_space_run_trains_and_samples_with_cfg(
    pixel_shards, pixel_clips, tmp_path
):
    runs = tmp_path / "runs"
    shutil.copytree(pixel_clips[RES], runs / PRESET / "clip" / "export")
    clip_hash = manifest(pixel_clips[RES])["hash"]
    run = train_stage(config(pixel_shards, "flow", text=True, val_every=2), runs)
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
