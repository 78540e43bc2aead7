"""The UNet stage: network, evaluation maths, latent cache, stage contract, end-to-end run
with export, and resume through the shared loop. Exports are built from untrained models."""

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

from pipeline.text2image import SampleConfig
from stages.clip.export import TextCondition, build_clip_modules, load_clip, save_clip_export
from stages.clip.model import CLIPModelConfig, ImageTowerConfig, TextEncoderConfig
from stages.clip.tokenizer import train_tokenizer
from stages.common.cache import CachedRows
from stages.common.cli import run_stage
from stages.common.config import ConfigError, load_config
from stages.common.data import iter_split
from stages.common.export import ExportError
from stages.common.finetune import InitConfig
from stages.common.stage import RunContext
from stages.unet import stage as stage_module
from stages.unet.encode import encode_batch, latents_and_condition
from stages.unet.evaluate import clip_score, frechet_distance
from stages.unet.export import load_unet
from stages.unet.model import SpatialTransformer, UNet, UNetConfig, count_parameters
from stages.unet.samplers import SamplingConfig, cfg_velocity, euler_sample, seeded_noise
from stages.unet.schedules import FlowSchedule
from stages.unet.stage import UNetStage, UNetStageConfig, resolve_model
from stages.vae.export import load_vae, save_vae_export
from stages.vae.model import AutoencoderKL, VAEModelConfig


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from more intra-op threads, and on a busy shared CPU
    OpenMP's spinning threads make every small op wait for a time slice (measured: this
    file takes 9 s with one thread and 137 s with two on a loaded 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------------------- model


def tiny_unet_config(**kw) -> UNetConfig:
    base = dict(
        in_channels=4,
        context_dim=16,
        sample_size=8,
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8, 4),
        head_dim=8,
        groups=8,
    )
    return UNetConfig(**{**base, **kw})


def randomise_zero_inits(model: torch.nn.Module) -> None:
    """Zero-initialised output layers hide everything: give them values for the test."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if torch.all(p == 0):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def text(batch: int, length: int = 6, width: int = 16, real: int = 3) -> TextCondition:
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, :real] = True
    tokens = torch.randn(batch, length, width)
    return TextCondition(tokens, mask, tokens[:, real - 1].clone())


def test_spatial_transformer_keeps_the_input_layout():
    """The token view it returns has channels-last strides; the residual must not switch
    a NCHW activation to channels-last (a copy per block and slower CPU kernels after it)."""
    torch.manual_seed(0)
    block = SpatialTransformer(32, tiny_unet_config())
    torch.nn.init.normal_(block.proj_out.weight)
    x, cond = torch.randn(2, 32, 4, 4), text(2)
    nchw = block(x, cond.tokens, cond.mask)
    assert nchw.is_contiguous()
    channels_last = block(x.contiguous(memory_format=torch.channels_last), cond.tokens, cond.mask)
    assert not channels_last.is_contiguous()
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(channels_last, nchw)


def test_unet_shapes_zero_output_and_device_layout():
    torch.manual_seed(0)
    model = UNet(tiny_unet_config()).place("cpu")
    x, t, cond = torch.randn(2, 4, 8, 8), torch.rand(2), text(2)
    out = model(x, t, cond)
    assert out.shape == x.shape
    assert torch.all(out == 0)  # zero-initialised output conv: the untrained net predicts v = 0
    # Channels-last is CUDA's layout; on CPU weights and activations stay NCHW.
    assert model.layout("cuda") == torch.channels_last
    assert model.layout("cpu") == torch.contiguous_format
    assert UNet(tiny_unet_config(channels_last=False)).layout("cuda") == torch.contiguous_format
    assert model.conv_out.weight.is_contiguous()
    randomise_zero_inits(model)
    out = model(x.contiguous(memory_format=torch.channels_last), t, cond)
    assert out.is_contiguous()
    # The same weights stored channels-last (as ``place("cuda")`` stores them) compute the
    # same function: layout is a storage choice only.
    stored_cl = UNet(tiny_unet_config())
    stored_cl.load_state_dict(model.state_dict())
    stored_cl.to(memory_format=torch.channels_last)
    assert stored_cl.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(stored_cl(x, t, cond), out, atol=1e-5, rtol=1e-4)
    # Three levels with attention only at 2: still the right shape.
    deeper = UNet(tiny_unet_config(channel_mult=(1, 1, 2), attention_resolutions=(2,)))
    assert deeper(x, t, cond).shape == x.shape
    with pytest.raises(ValueError, match="context_dim"):
        UNet(tiny_unet_config(context_dim=0))


def test_unet_respects_padding_mask_and_uses_the_text():
    torch.manual_seed(1)
    model = UNet(tiny_unet_config()).eval()
    randomise_zero_inits(model)
    x, t, cond = torch.randn(2, 4, 8, 8), torch.rand(2), text(2, real=3)
    out = model(x, t, cond)
    padded = cond.tokens.clone()
    padded[:, 3:] = torch.randn_like(padded[:, 3:]) * 10
    same = model(x, t, TextCondition(padded, cond.mask, cond.pooled))
    torch.testing.assert_close(same, out)
    real = cond.tokens.clone()
    real[:, 1] += 1.0
    assert not torch.allclose(model(x, t, TextCondition(real, cond.mask, cond.pooled)), out)
    other_pooled = TextCondition(cond.tokens, cond.mask, cond.pooled + 1.0)
    assert not torch.allclose(model(x, t, other_pooled), out)
    assert not torch.allclose(model(x, t * 0.5, cond), out)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(2)
    model = UNet(tiny_unet_config())
    randomise_zero_inits(model)
    ckpt = UNet(tiny_unet_config(gradient_checkpointing=True))
    ckpt.load_state_dict(model.state_dict())
    x, t, cond = torch.randn(2, 4, 8, 8), torch.rand(2), text(2)
    for m in (model, ckpt):
        m(x, t, cond).square().mean().backward()
    for (name, a), b in zip(model.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name, atol=1e-6, rtol=1e-4)


def test_base_preset_is_about_230m_parameters():
    cfg = load_config(UNetStageConfig, "base", "unet")
    model_cfg = resolve_model(cfg.model, channels=4, context_dim=512, side=64)
    with torch.device("meta"):
        count = count_parameters(UNet(model_cfg))
    assert 220e6 < count < 240e6, count


def test_sample_toml_agrees_with_the_stage_sample_section():
    for preset in ("tiny", "small", "base"):
        recorded = load_config(SampleConfig, preset, "sample")
        stage = load_config(UNetStageConfig, preset, "unet").sample
        fields = ("steps", "cfg_scale", "sampler", "shift", "cfg_interval")
        assert recorded.sampling(stage) == stage, preset  # every field sample.toml sets agrees
        assert all(getattr(recorded, k) is not None for k in fields), preset


# ------------------------------------------------------------------------- evaluation


def test_frechet_distance_matches_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    # Diagonal covariances commute: FD = |mu_a - mu_b|^2 + sum (sqrt(s_a) - sqrt(s_b))^2.
    n, scale_a, scale_b = 200000, torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 1.0, 0.5])
    a = torch.randn(n, 3, generator=gen) * scale_a
    b = torch.randn(n, 3, generator=gen) * scale_b + torch.tensor([1.0, 0.0, -2.0])
    a, b = a - a.mean(0), b - b.mean(0) + torch.tensor([1.0, 0.0, -2.0])
    expected = 5.0 + ((scale_a - scale_b) ** 2).sum().item()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # A rotated copy has the same spectrum but is another distribution: FD > 0.
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=gen))[0]
    assert frechet_distance(a, a @ rotation) > 0.1


def test_clip_score_is_100_times_the_clipped_cosine():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.6, 0.8], [0.0, -1.0]])
    assert clip_score(image, text) == pytest.approx(100 * (0.6 + 0.0) / 2)


# ---------------------------------------------------------------------------- exports


def build_vae_export(
    folder: Path,
    seed: int = 0,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> str:
    """An untrained 16 px VAE export with latent statistics ``mean``/``std`` (0 and 1)."""
    torch.manual_seed(seed)
    cfg = VAEModelConfig(
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        latent_channels=4,
        norm_groups=4,
        mid_attention=False,
    )
    mean = torch.zeros(4) if mean is None else mean
    std = torch.ones(4) if std is None else std
    return save_vae_export(AutoencoderKL(cfg), cfg, folder, mean, std, resolution=16)


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


def build_clip_export(folder: Path, shards: Path, vae_hash: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    captions = [b for batch in iter_split(shards / "train", 96, 16) for b in batch["caption"]]
    tokenizer = train_tokenizer(captions, vocab_size=300, context_length=12)
    cfg = CLIPModelConfig(
        embed_dim=16,
        text=TextEncoderConfig(context_length=12, width=32, layers=1, heads=2),
        image=ImageTowerConfig(input="latent", patch_size=2, width=32, layers=1, heads=2),
    )
    m = build_clip_modules(cfg, tokenizer.vocab_size, image_channels=4, image_size=8)
    return save_clip_export(
        folder, m["text"], m["image"], m["logit_scale"], tokenizer, vae_hash=vae_hash
    )


@pytest.fixture(scope="module")
def exports(tiny_shards, tmp_path_factory) -> Path:
    """A runs root holding untrained-but-real tiny VAE and CLIP exports (read-only)."""
    runs = tmp_path_factory.mktemp("runs")
    vae_hash = build_vae_export(runs / "tiny" / "vae" / "export")
    build_clip_export(runs / "tiny" / "clip" / "export", tiny_shards, vae_hash)
    return runs


def copy_runs(exports: Path, tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    shutil.copytree(exports, runs)
    return runs


TEST_MODEL = UNetConfig(
    base_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    head_dim=8,
    ff_mult=2,
    groups=8,
)


def stage_config(shards: Path, **train) -> UNetStageConfig:
    cfg = UNetStageConfig()
    return replace(
        cfg,
        data=replace(cfg.data, path=str(shards), resolution=16, batch_size=8),
        train=replace(cfg.train, trackers=(), log_every=1, **train),
        optim=replace(cfg.optim, lr=1e-3, warmup_steps=2, schedule="constant"),
        ckpt=replace(cfg.ckpt, every_steps=0, every_minutes=0.0),
        model=TEST_MODEL,
        cache=replace(cfg.cache, shard_size=40, batch_size=32),
        sample=SamplingConfig(steps=3, cfg_scale=2.0),
        eval=replace(cfg.eval, num_images=8, grid_rows=2, grid_seeds=2, batch_size=16),
    )


# ------------------------------------------------------------------------------ cache


def test_cache_holds_the_on_the_fly_encoding_and_follows_the_exports(
    exports, tiny_shards, tmp_path, monkeypatch
):
    """The stage's encode function in the shared cache (stages/common/cache.py, tested on
    its own in test_cache.py): same values as on the fly, rebuilt for another VAE export."""
    runs = copy_runs(exports, tmp_path)
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


# --------------------------------------------------------------------------- contract


def test_run_on_other_upstream_exports_is_moved_aside_not_resumed(exports, tiny_shards, tmp_path):
    """Issue 15, item 4: a UNet run folder trained on other exports is never resumed nor a
    dead end (it used to refuse and say to delete it): it is kept aside, a new run starts."""
    runs = copy_runs(exports, tmp_path)
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


# ------------------------------------------------------------------------ end to end


def write_preset(configs: Path, cfg_text: str) -> Path:
    (configs / "tiny").mkdir(parents=True, exist_ok=True)
    (configs / "tiny" / "unet.toml").write_text(cfg_text)
    return configs


def test_stage_trains_evaluates_and_exports(exports, tiny_shards, tmp_path):
    runs = copy_runs(exports, tmp_path)
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


# ----------------------------------------------------------------------------- resume


def train_run(runs: Path, shards: Path, max_steps: int, cache: bool = True) -> dict:
    from stages.common.trainer import train

    cfg = stage_config(shards, max_steps=max_steps, val_every=0, preview_every=0)
    cfg = replace(cfg, cache=replace(cfg.cache, enabled=cache))
    assert (
        train(UNetStage(cfg, RunContext(runs, "tiny", "unet")), RunContext(runs, "tiny", "unet"))
        == 0
    )
    return load_file(str(runs / "tiny" / "unet" / "export" / "model.safetensors"))


def test_resume_through_the_shared_loop_equals_an_uninterrupted_run(exports, tiny_shards, tmp_path):
    straight = train_run(copy_runs(exports, tmp_path / "a"), tiny_shards, 6)
    runs = copy_runs(exports, tmp_path / "b")
    train_run(runs, tiny_shards, 3)
    resumed = train_run(runs, tiny_shards, 6)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    # Without the cache (encoding on the fly) the same stream trains to nearly the same
    # weights: only the fp16 storage of the text states differs.
    fly = train_run(copy_runs(exports, tmp_path / "c"), tiny_shards, 6, cache=False)
    assert not (tmp_path / "c" / "runs" / "tiny" / "unet" / "cache").exists()
    for key in straight:
        torch.testing.assert_close(fly[key], straight[key], atol=2e-3, rtol=2e-2)


# ------------------------------------------------------------------------- fine-tuning


def fine_tune(runs: Path, shards: Path, name: str, source: Path, steps: int, **model) -> Path:
    """A new run ``runs/tiny/<name>`` started from the UNet export at ``source``."""
    from stages.common.trainer import train

    cfg = stage_config(shards, max_steps=steps, val_every=0, preview_every=0)
    cfg = replace(cfg, init=InitConfig(from_=str(source)), model=replace(cfg.model, **model))
    ctx = RunContext(runs, "tiny", name)
    assert train(UNetStage(cfg, ctx), ctx) == 0
    return ctx.run_dir / "export"


def test_fine_tuning_starts_from_a_unet_export_on_the_same_upstream(exports, tiny_shards, tmp_path):
    runs = copy_runs(exports, tmp_path)
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


def test_the_stage_loss_learns_a_fixed_batch(exports, tiny_shards, tmp_path):
    """Issue 15: the end-to-end runs only check finiteness; this asserts learning. The
    stage's own loss (cache path, objective, CFG dropout) on one fixed batch with fixed draws
    of time, noise and dropout is a learnable toy: 40 AdamW steps must cut it clearly."""
    runs = copy_runs(exports, tmp_path)
    stage = UNetStage(stage_config(tiny_shards), RunContext(runs, "tiny", "unet"))
    torch.manual_seed(0)
    modules = stage.build()
    batch = next(iter(stage.train_loader(0, 1)))
    before, after = fixed_batch_losses(stage, modules, batch)
    assert after < 0.5 * before, (before, after)
