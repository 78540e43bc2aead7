"""Stage 1, the VAE: network shapes, the loss maths, metrics, export, the stage contract."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import urllib.error
from pathlib import Path

import lpips
import pytest
import torch
import torchvision.models as tvm
from PIL import Image

from stages.common.cli import run_stage
from stages.common.config import ConfigError, load_config
from stages.common.data import DataConfig, ShardLoader
from stages.common.export import ExportError
from stages.common.stage import RunContext
from stages.vae import loss as loss_module
from stages.vae.augment import AugmentConfig, build_augment
from stages.vae.colour import colour_covariance, whitening
from stages.vae.discriminator import NLayerDiscriminator
from stages.vae.export import load_vae, save_vae_export
from stages.vae.loss import (
    LPIPSUnavailable,
    VAELoss,
    VAELossConfig,
    build_lpips,
    free_bits_kl,
    kl_beta,
)
from stages.vae.metrics import reconstruction_metrics
from stages.vae.model import AutoencoderKL, DiagonalGaussian, VAEModelConfig
from stages.vae.stage import LatentStatsConfig, VAEStage, VAEStageConfig, VAEValConfig


def tiny_model_config(channel_mult=(1, 2, 2), **kw) -> VAEModelConfig:
    return VAEModelConfig(
        base_channels=8, channel_mult=channel_mult, num_res_blocks=1, norm_groups=4, **kw
    )


def random_posterior(shape=(3, 4, 2, 2), seed=0) -> DiagonalGaussian:
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape, generator=gen).requires_grad_()
    logvar = (0.5 * torch.randn(shape, generator=gen)).requires_grad_()
    return DiagonalGaussian(mean, logvar)


# ------------------------------------------------------------------------------ model


@pytest.mark.parametrize(("mult", "factor"), [((1, 2, 2), 4), ((1, 2, 2, 2), 8)])
def test_round_trip_shapes(mult, factor):
    torch.manual_seed(0)
    model = AutoencoderKL(tiny_model_config(mult))
    assert model.factor == factor
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, mean, logvar = model(x)
    assert recon.shape == x.shape
    assert mean.shape == logvar.shape == (2, 4, 32 // factor, 32 // factor)
    assert model.decode(model.encode(x).mode()).shape == x.shape
    with pytest.raises(ValueError, match="divisible"):
        model.encode(torch.zeros(1, 3, 30, 30))


def test_posterior_sampling_is_seeded_and_logvar_clamped():
    model = AutoencoderKL(tiny_model_config(logvar_min=-1.0, logvar_max=1.0))
    posterior = model.encode(torch.rand(2, 3, 16, 16))
    assert posterior.logvar.min() >= -1.0 and posterior.logvar.max() <= 1.0
    a = posterior.sample(torch.Generator().manual_seed(3))
    b = posterior.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, posterior.mode())


def test_bad_group_count_is_a_clear_config_error():
    with pytest.raises(ConfigError, match="model.norm_groups"):
        VAEModelConfig(base_channels=24, norm_groups=32)


# ------------------------------------------------------------------------------- loss


def test_kl_matches_closed_form():
    posterior = random_posterior()
    q = torch.distributions.Normal(posterior.mean, posterior.std)
    p = torch.distributions.Normal(torch.zeros(()), torch.ones(()))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.kl(), expected)
    # Without free bits the loss's KL is the batch mean of the per-sample KL.
    torch.testing.assert_close(free_bits_kl(posterior, 0.0), expected.mean())


def test_free_bits_per_channel_after_batch_average():
    lam = 0.5
    mean = torch.zeros(2, 2, 1, 1)
    mean[:, 1] = 3.0  # channel 1: KL 4.5 nats per element, far above lambda
    mean[0, 0] = 0.2  # channel 0, sample 0: 0.02 nats, below lambda on its own
    mean[1, 0] = 1.2  # channel 0, sample 1: 0.72 nats; the batch mean 0.37 is below lambda
    mean.requires_grad_()
    posterior = DiagonalGaussian(mean, torch.zeros_like(mean))
    kl = free_bits_kl(posterior, lam)
    torch.testing.assert_close(kl, torch.tensor(lam + 4.5))
    kl.backward()
    assert torch.all(mean.grad[:, 0] == 0)  # channel 0 is free: not penalised
    torch.testing.assert_close(mean.grad[:, 1], torch.full((2, 1, 1), 1.5))  # d/dmu mean(mu^2/2)
    # Batch-averaged first: a channel whose batch mean is above lambda is penalised for every
    # sample, including one whose own KL is below lambda (per-sample clamping would not).
    mean2 = mean.detach().clone()
    mean2[1, 0] = 1.5  # channel 0 mean KL = (0.02 + 1.125) / 2 > 0.5
    mean2.requires_grad_()
    free_bits_kl(DiagonalGaussian(mean2, torch.zeros_like(mean2)), lam).backward()
    assert mean2.grad[0, 0].abs().item() > 0


def test_cyclical_kl_schedule():
    cfg = VAELossConfig(kl_cycles=2, kl_anneal_steps=100, kl_ramp_fraction=0.5)
    betas = [kl_beta(s, cfg) for s in range(200)]
    assert betas[0] == 0.0 and betas[50] == 0.0  # each cycle starts from zero
    assert betas[10] == pytest.approx(0.4) and betas[60] == pytest.approx(0.4)
    assert all(b == 1.0 for b in betas[25:50] + betas[75:])  # flat after the ramp and the end
    assert all(b1 <= b2 for b1, b2 in zip(betas[:25], betas[1:26]))
    assert kl_beta(7, VAELossConfig()) == 1.0  # no cycles: constant weight
    # The loss applies it: at the start of a cycle the KL contributes nothing.
    loss_fn = VAELoss(
        VAELossConfig(lpips_weight=0, kl_weight=1.0, kl_cycles=2, kl_anneal_steps=100)
    )
    x = torch.zeros(3, 3, 4, 4)
    posterior = random_posterior()
    assert loss_fn(x, x, posterior, step=0)["loss"].item() == 0.0
    at_ten = loss_fn(x, x, posterior, step=10)["loss"]
    torch.testing.assert_close(at_ten, 0.4 * posterior.kl().mean() / 48)


def gan_setup(seed=0):
    torch.manual_seed(seed)
    vae = AutoencoderKL(tiny_model_config())
    disc = NLayerDiscriminator(3, channels=8, layers=2)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    return vae, disc, x


def grads(module: torch.nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def test_gan_terms_have_disjoint_gradients():
    vae, disc, x = gan_setup()
    recon, _, _ = vae(x)
    VAELoss.generator_loss(recon, disc).backward()
    assert all(g is None for g in grads(disc))  # the generator term leaves D alone
    assert vae.decoder.conv_out.weight.grad.abs().sum() > 0
    vae.zero_grad(set_to_none=True)
    recon, _, _ = vae(x)
    d_loss, _, _ = VAELoss.discriminator_loss(x, recon, disc)
    d_loss.backward()
    assert all(g is None for g in grads(vae))  # the D term leaves the VAE alone
    assert all(g is not None for g in grads(disc)) and disc.main[0].weight.grad.abs().sum() > 0


def test_total_loss_gives_disc_only_its_hinge_gradient():
    cfg = VAELossConfig(lpips_weight=0, disc_start=0, disc_weight=0.5)
    vae, disc, x = gan_setup()
    recon, mean, logvar = vae(x)
    out = VAELoss(cfg)(
        x, recon, DiagonalGaussian(mean, logvar), 0, disc, vae.decoder.conv_out.weight
    )
    assert {"g_loss", "d_loss", "d_weight"} <= set(out)
    # Esser et al. eq. 7, computed here by hand: ||dNLL/dW|| / (||dG/dW|| + 1e-4) at the
    # decoder's last layer W, clamped, times disc_weight.
    last = vae.decoder.conv_out.weight
    nll = cfg.l1_weight * (recon - x).abs().mean()
    g = -disc(recon).mean()
    (nll_grad,) = torch.autograd.grad(nll, last, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g, last, retain_graph=True)
    ratio = (nll_grad.norm() / (g_grad.norm() + 1e-4)).item()
    assert 0 < ratio < cfg.adaptive_weight_max
    assert out["d_weight"].item() == pytest.approx(0.5 * ratio, rel=1e-4)
    # The clamp: a maximum below the ratio gives max * disc_weight.
    capped_cfg = dataclasses.replace(cfg, adaptive_weight_max=ratio / 4)
    capped = VAELoss(capped_cfg)(x, recon, DiagonalGaussian(mean, logvar), 0, disc, last)
    assert capped["d_weight"].item() == pytest.approx(0.5 * ratio / 4, rel=1e-4)
    # The total carries d_weight * g_loss + d_loss on top of the reconstruction terms.
    rest = out["loss"] - out["d_weight"] * out["g_loss"] - out["d_loss"]
    without_gan = VAELoss(dataclasses.replace(cfg, disc_start=10))(
        x, recon, DiagonalGaussian(mean, logvar), 0, disc, last
    )["loss"]
    torch.testing.assert_close(rest, without_gan)
    disc_total = torch.autograd.grad(out["loss"], list(disc.parameters()), retain_graph=True)
    d_loss, _, _ = VAELoss.discriminator_loss(x, recon, disc)
    for total, alone in zip(disc_total, torch.autograd.grad(d_loss, list(disc.parameters()))):
        torch.testing.assert_close(total, alone)
    # Before disc_start the GAN terms are absent.
    late = VAELoss(VAELossConfig(lpips_weight=0, disc_start=10))
    assert "g_loss" not in late(x, recon, DiagonalGaussian(mean, logvar), 9, disc, None)


def test_lpips_gradients_flow_to_the_reconstruction_only():
    cfg = VAELossConfig(l1_weight=0.0, kl_weight=0.0, lpips_net="squeeze", lpips_backbone="random")
    loss_fn = VAELoss(cfg)
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    out = loss_fn(x, recon, random_posterior((2, 4, 8, 8)), step=0)
    assert out["lpips"].item() > 0
    out["loss"].backward()
    assert torch.isfinite(recon.grad).all() and recon.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in loss_fn.lpips.parameters())


def test_lpips_offline_error_says_how_to_fix_and_weight_zero_skips_it(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(lpips, "LPIPS", offline)
    with pytest.raises(LPIPSUnavailable) as err:
        build_lpips(VAELossConfig(lpips_net="vgg"))
    message = str(err.value)
    assert "vgg16-397923af.pth" in message and "hub/checkpoints" in message
    assert "loss.lpips_weight=0" in message
    assert VAELoss(VAELossConfig(lpips_weight=0)).lpips is None  # never built


@pytest.mark.parametrize("preset", ["small", "base"])
def test_offline_lpips_error_names_every_fix_and_one_retry_passes(preset, monkeypatch, tmp_path):
    """Offline with an empty torch hub cache, the stage's one message names the file's exact
    path and every override that trains without LPIPS; with those the stage's checks pass."""
    attempts = []

    def offline(url, dst, *args, **kwargs):
        attempts.append((url, dst))
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    ctx = RunContext(tmp_path / "runs", preset, "vae")
    with pytest.raises(LPIPSUnavailable) as err:
        VAEStage(load_config(VAEStageConfig, preset, "vae"), ctx)
    message = str(err.value)
    [(url, dst)] = attempts
    assert url in message and dst in message  # where torch hub looks, down to the file name
    assert dst.endswith("/hub/checkpoints/vgg16-397923af.pth")
    overrides = re.search(r'ARGS="([^"]*)"', message).group(1).split()
    assert overrides == ["loss.lpips_weight=0", "val.metric=l1"]
    assert " ".join(overrides) in message
    stage = VAEStage(load_config(VAEStageConfig, preset, "vae", overrides), ctx)  # the one retry
    assert stage.loss_fn.lpips is None and len(attempts) == 1
    # The command line reports it as a config error (exit 2), not a traceback.
    argv = ["--preset", preset, "--data", str(tmp_path), "--runs", str(tmp_path / "runs")]
    assert run_stage("vae", VAEStageConfig, VAEStage, argv) == 2


class _Payload:
    """Unpickling this writes ``marker``: the proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_lpips_backbone_is_hash_checked_and_loaded_weights_only(tmp_path, monkeypatch):
    """Issue 15, item 13: torchvision loads a cached backbone without checking its hash and
    with full unpickling; lpips unpickles its linear layers the same way."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    backbone = tvm.squeezenet1_1()
    cached = tmp_path / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"
    cached.parent.mkdir()
    torch.save(backbone.state_dict(), cached)  # not torchvision's file: another sha256
    with pytest.raises(LPIPSUnavailable, match="sha256 prefix b8a52dc0"):
        build_lpips(VAELossConfig(lpips_net="squeeze"))

    monkeypatch.setattr(loss_module, "sha256_file", lambda path: "b8a52dc0" + "0" * 56)
    marker = tmp_path / "unpickled"
    cached.write_bytes(pickle.dumps(_Payload(marker)))  # a hash collision, say
    with pytest.raises(LPIPSUnavailable):
        build_lpips(VAELossConfig(lpips_net="squeeze"))
    assert not marker.exists()

    torch.save(backbone.state_dict(), cached)  # the weights land in lpips' slices
    net = build_lpips(VAELossConfig(lpips_net="squeeze"))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(net.net.slice1(x), backbone.features[:2](x))
    linear = Path(lpips.__file__).parent / "weights" / "v0.1" / "squeeze.pth"
    state = torch.load(linear, map_location="cpu", weights_only=True)
    assert torch.equal(net.lin6.model[1].weight, state["lin6.model.1.weight"])  # lpips' own


def test_augment_off_by_default_and_flip_applies():
    assert build_augment(AugmentConfig()) is None
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    torch.testing.assert_close(build_augment(AugmentConfig(hflip=1.0))(x), x.flip(-1))


# ---------------------------------------------------------------------------- metrics


def test_metrics_on_identical_and_different_images():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    same = reconstruction_metrics(x, x.clone())
    assert torch.all(same["psnr"] == 100.0) and torch.all(same["l1"] == 0)
    torch.testing.assert_close(same["ssim"], torch.ones(3))
    noisy = reconstruction_metrics(x, x + 0.2 * torch.randn_like(x))
    assert torch.all(noisy["psnr"] < 30) and torch.all(noisy["ssim"] < 0.95)
    net = build_lpips(VAELossConfig(lpips_net="squeeze", lpips_backbone="random"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.all(reconstruction_metrics(x, x, net)["lpips"].abs() < 1e-6)
    assert torch.all(reconstruction_metrics(x, -x, net)["lpips"] > 0)


# ----------------------------------------------------------------------------- export


def test_export_round_trip_and_corruption(tmp_path):
    torch.manual_seed(0)
    model = AutoencoderKL(tiny_model_config())
    mean, std = torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([1.5, 0.5, 2.0, 1.0])
    digest = save_vae_export(model, model.config, tmp_path / "export", mean, std, resolution=32)
    vae = load_vae(tmp_path / "export")
    assert vae.hash == digest and (vae.factor, vae.channels, vae.resolution) == (4, 4, 32)
    torch.testing.assert_close(vae.mean, mean)
    torch.testing.assert_close(vae.std, std)
    info = json.loads((tmp_path / "export" / "manifest.json").read_text())["info"]
    assert info["latent_mean"] == pytest.approx(mean.tolist())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = model.decode(model.encode(x).mode())
    z_mean, z_std = vae.encode(x)
    assert torch.equal(vae.decode(z_mean), expected)
    torch.testing.assert_close(z_std, model.encode(x).std.detach())
    torch.testing.assert_close(vae.denormalize(vae.normalize(z_mean)), z_mean)
    assert not any(p.requires_grad for p in vae.model.parameters())
    weights = tmp_path / "export" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="sha256"):
        load_vae(tmp_path / "export")


# ------------------------------------------------------------------------------ stage


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_presets_load(preset):
    cfg = load_config(VAEStageConfig, preset, "vae")
    assert cfg.data.resolution % cfg.model.factor == 0


def tiny_stage_config(shards: Path, **loss) -> VAEStageConfig:
    return VAEStageConfig(
        model=tiny_model_config(),
        loss=VAELossConfig(**{"lpips_weight": 0.0, "discriminator": False, **loss}),
        data=DataConfig(path=str(shards), resolution=16, batch_size=8),
        val=VAEValConfig(metric="psnr", preview_images=4),
        stats=LatentStatsConfig(batches=3),
    )


def test_stage_contract_without_the_trainer(tiny_shards, tmp_path):
    """build, loss + backward, validate, preview and export, called as the trainer does."""
    cfg = tiny_stage_config(tiny_shards, discriminator=True, disc_start=0, disc_layers=2)
    stage = VAEStage(cfg, RunContext(tmp_path / "runs", "test", "vae"))
    assert stage.best_metric == ("psnr", "max")
    torch.manual_seed(0)
    modules = stage.build()
    assert set(modules) == {"vae", "disc"}
    loader = stage.train_loader(0, 1)
    batch = next(iter(loader))
    out = stage.loss(modules, batch, step=0)
    out["loss"].backward()
    assert all(p.grad is not None for m in modules.values() for p in m.parameters())
    metrics = stage.validate(modules, step=0)
    assert set(metrics) == {"l1", "psnr", "ssim", "kl", "delta_e"} and 0 < metrics["psnr"] < 100
    assert metrics["delta_e"] > 0  # an untrained VAE changes colours
    stage.preview({"ema": modules, "raw": modules}, 5, tmp_path / "previews")
    image = Image.open(tmp_path / "previews" / "vae_0000005.png")
    assert image.size == (4 * 18 + 2, 3 * 18 + 2)  # 4 columns, rows: originals, EMA, raw
    stage.export(modules, tmp_path / "export")
    vae = load_vae(tmp_path / "export")
    assert vae.resolution == 16 and vae.factor == 4
    # The statistics: mean of posterior means, std of sampled z, over the first 3 batches
    # of the stats order, recomputed here directly.
    loader = ShardLoader.from_config(cfg.data, "train", seed=cfg.stats.seed)
    gen = torch.Generator().manual_seed(cfg.stats.seed)
    means, samples = [], []
    with torch.no_grad():
        for _, batch in zip(range(3), loader):
            posterior = modules["vae"].encode(batch["image"])
            samples.append(posterior.sample(gen))
            means.append(posterior.mean)

    def per_channel(tensors: list[torch.Tensor]) -> torch.Tensor:  # (C, N*h*w)
        return torch.cat(tensors).transpose(0, 1).flatten(1)

    torch.testing.assert_close(vae.mean, per_channel(means).mean(dim=1))
    torch.testing.assert_close(vae.std, per_channel(samples).std(dim=1, correction=0))
    assert torch.all(vae.std > 0)


def test_stage_refuses_bad_configs(tiny_shards, tmp_path):
    ctx = RunContext(tmp_path, "test", "vae")
    with pytest.raises(ConfigError, match="val.metric"):
        VAEStage(VAEStageConfig(loss=VAELossConfig(lpips_weight=0)), ctx)
    with pytest.raises(ConfigError, match="loss.disc_layers"):
        VAEStage(tiny_stage_config(tiny_shards, discriminator=True), ctx)  # 16 px, 3 layers
    with pytest.raises(ConfigError, match="data.resolution"):
        VAEStage(
            VAEStageConfig(
                model=tiny_model_config((1, 2, 2, 2, 2, 2)),
                loss=VAELossConfig(lpips_weight=0, discriminator=False),
                data=DataConfig(path=str(tiny_shards), resolution=16),
                val=VAEValConfig(metric="l1"),
            ),
            ctx,
        )


def test_end_to_end_tiny_run_writes_an_export(tiny_shards, tmp_path):
    """`python -m stages.vae --preset tiny` in miniature, through the shared trainer."""
    argv = [
        *("--preset", "tiny", "--data", str(tiny_shards), "--runs", str(tmp_path)),
        *("data.resolution=16", "data.batch_size=8", "model.base_channels=8"),
        *("model.norm_groups=4", "train.max_steps=4", "train.val_every=2", "train.log_every=2"),
        *("train.preview_every=4", "ckpt.every_steps=2", "stats.batches=2", "train.trackers=[]"),
        *("optim.lr=3e-3", "optim.warmup_steps=0"),
    ]
    assert run_stage("vae", VAEStageConfig, VAEStage, argv) == 0
    run = tmp_path / "tiny" / "vae"
    vae = load_vae(run / "export")
    assert (vae.factor, vae.resolution) == (4, 16) and torch.all(vae.std > 0)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [line for line in lines if line["split"] == "val"]
    assert [line["step"] for line in val] == [2, 4] and all(0 < v["psnr"] < 100 for v in val)
    # It learns: on the fixed validation batch and on the training batches, the L1 falls.
    assert val[1]["l1"] < 0.97 * val[0]["l1"] and val[1]["psnr"] > val[0]["psnr"]
    train = [line for line in lines if line["split"] == "train"]
    assert [line["step"] for line in train] == [2, 4] and train[1]["loss"] < train[0]["loss"]
    assert (run / "previews" / "vae_0000004.png").exists()
    assert run_stage("vae", VAEStageConfig, VAEStage, argv) == 0  # finished: nothing to do
    assert load_vae(run / "export").hash == vae.hash


def test_chroma_term_sees_colour_not_lightness():
    loss_fn = VAELoss(VAELossConfig(lpips_weight=0, discriminator=False, chroma_weight=1.0))
    posterior = DiagonalGaussian(torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2))
    green = torch.tensor([-0.4, 0.4, -0.6]).view(1, 3, 1, 1).expand(2, 3, 8, 8)
    grey = torch.zeros(2, 3, 8, 8)
    same = loss_fn(green, green.clone(), posterior, step=0)
    assert same["chroma"].item() < 1e-4
    assert loss_fn(green, grey, posterior, step=0)["chroma"].item() > 0.2  # a*, b* lost
    # two greys of different lightness differ in L1, not in chroma
    assert loss_fn(grey, grey - 0.5, posterior, step=0)["chroma"].item() < 0.02
    assert "chroma" not in VAELoss(VAELossConfig(lpips_weight=0))(grey, grey, posterior, 0)


def test_hue_augmentation_rotates_colour_and_keeps_the_range():
    torch.manual_seed(0)
    augment = build_augment(AugmentConfig(hue=1.0))
    green = torch.tensor([-0.4, 0.6, -0.6]).view(1, 3, 1, 1).expand(8, 3, 4, 4).contiguous()
    out = augment(green)
    assert out.shape == green.shape and out.min() >= -1 - 1e-5 and out.max() <= 1 + 1e-5
    assert (out - green).abs().amax(dim=(1, 2, 3)).gt(0.05).sum() >= 6  # most rotated
    white = torch.ones(2, 3, 4, 4)
    torch.testing.assert_close(augment(white), white, atol=1e-5, rtol=0)  # no hue to rotate


def test_fine_tuning_takes_the_exports_autoencoder(tiny_shards, tmp_path):
    cfg = tiny_stage_config(tiny_shards)
    torch.manual_seed(0)
    source = AutoencoderKL(cfg.model)
    export = tmp_path / "export"
    export_hash = save_vae_export(source, cfg, export, torch.zeros(4), torch.ones(4))
    stage = VAEStage(cfg, RunContext(tmp_path / "runs", "test", "vae"))
    weights, recorded = stage.init_weights(export)
    assert recorded == export_hash and set(weights) == {"vae"}
    torch.manual_seed(1)
    fresh = stage.build()["vae"]
    fresh.load_state_dict(weights["vae"], strict=True)
    for key, value in source.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, base_channels=16))
    with pytest.raises(ConfigError, match="model.base_channels"):
        VAEStage(other, RunContext(tmp_path / "runs", "test", "vae2")).init_weights(export)


def test_a_training_step_reconstructs_the_augmented_batch(tiny_shards, tmp_path):
    """Issue 15: augmentations exercised through the stage's training step: the network's
    input and the loss's target are the same augmented images, not the batch as read."""
    base = tiny_stage_config(tiny_shards)
    cfg = dataclasses.replace(base, augment=AugmentConfig(hue=1.0, affine=1.0, degrees=20.0))
    stage = VAEStage(cfg, RunContext(tmp_path / "runs", "test", "vae"))
    torch.manual_seed(0)
    modules = stage.build()
    batch = next(iter(stage.train_loader(0, 1)))
    seen: dict[str, torch.Tensor] = {}
    encode = modules["vae"].encoder.forward

    def spy_encoder(x):
        seen["input"] = x.detach().clone()
        return encode(x)

    modules["vae"].encoder.forward = spy_encoder
    loss_fn = stage.loss_fn

    def spy_loss(x, recon, *args, **kwargs):
        seen["target"] = x.detach().clone()
        return loss_fn(x, recon, *args, **kwargs)

    stage.loss_fn = spy_loss
    stage.loss(modules, batch, step=0)["loss"].backward()
    assert torch.equal(seen["input"], seen["target"])  # the target is the augmented input
    assert (seen["input"] - batch["image"]).abs().amax(dim=(1, 2, 3)).gt(0.05).all()
    plain = VAEStage(base, RunContext(tmp_path / "runs", "test", "vae2"))
    assert plain.augment is None  # off by default: the batch as read


def test_whitening_equalises_the_colour_directions():
    """W cov W^T = lambda_max * I, so a loss on W (recon - x) weighs each colour direction
    alike; a grey-only covariance is stretched by at most 10x."""
    torch.manual_seed(0)
    rotation, _ = torch.linalg.qr(
        torch.tensor([[1.0, 0.2, 0.1], [0.9, 0.3, -0.1], [0.8, 0.1, 0.5]])
    )
    mixing = rotation @ torch.diag(torch.tensor([1.0, 0.3, 0.15]))  # variances 1, 0.09, 0.0225
    images = torch.einsum("ij,bjhw->bihw", mixing, torch.randn(64, 3, 8, 8))
    cov = colour_covariance(images)
    torch.testing.assert_close(cov, torch.cov(images.permute(1, 0, 2, 3).reshape(3, -1)))
    w = whitening(cov)
    top = torch.linalg.eigvalsh(cov).max()
    torch.testing.assert_close(w @ cov @ w.T, top * torch.eye(3), rtol=1e-4, atol=1e-4)
    grey = torch.full((3, 3), 0.2) + 1e-9 * torch.eye(3)
    assert torch.linalg.eigvalsh(whitening(grey)).max() <= 10.0 + 1e-4


def test_whitened_loss_hears_the_weak_colour_direction():
    """An error along the data's weakest colour direction costs as much as an error of the
    same number of standard deviations along the strongest one."""
    cov = torch.diag(torch.tensor([1.0, 0.1, 0.01]))
    cfg = VAELossConfig(lpips_weight=0, discriminator=False, l1_weight=0, mse_weight=1)
    posterior = random_posterior((2, 4, 2, 2))
    x = torch.zeros(2, 3, 8, 8)
    strong, weak = x.clone(), x.clone()
    strong[:, 0] += 1.0  # one standard deviation along the strongest direction
    weak[:, 2] += 0.1  # one along the weakest
    with pytest.raises(ValueError, match="colour basis"):
        VAELoss(dataclasses.replace(cfg, colour_whitening=True))
    plain = VAELoss(cfg)
    assert plain(x, weak, posterior, 0)["mse"] < 0.02 * plain(x, strong, posterior, 0)["mse"]
    whitened = VAELoss(dataclasses.replace(cfg, colour_whitening=True), None, whitening(cov))
    torch.testing.assert_close(
        whitened(x, weak, posterior, 0)["mse"], whitened(x, strong, posterior, 0)["mse"]
    )


def test_input_basis_folds_into_the_export(tiny_shards, tmp_path):
    """With loss.colour_whitening the encoder sees whitened colours; the export is a plain
    VAE computing the same function, and fine-tuning from it unfolds the basis again."""
    cfg = tiny_stage_config(tiny_shards, colour_whitening=True, l1_weight=0.0, mse_weight=1.0)
    stage = VAEStage(cfg, RunContext(tmp_path / "runs", "test", "vae"))
    basis = stage.colour_basis
    assert basis is not None and not torch.allclose(basis, torch.eye(3))
    torch.manual_seed(0)
    modules = stage.build()
    batch = next(iter(stage.train_loader(0, 1)))
    stage.loss(modules, batch, step=0)["loss"].backward()
    vae = modules["vae"]
    assert "encoder.input_basis" not in vae.state_dict()  # measured again on resume
    stage.export(modules, tmp_path / "export")
    exported = load_vae(tmp_path / "export")
    with torch.no_grad():
        ours = vae.encode(batch["image"]).mean
        theirs, _ = exported.encode(batch["image"])
        plain = AutoencoderKL(cfg.model)
        plain.load_state_dict(vae.state_dict())
        unwhitened = plain.encode(batch["image"]).mean
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert (unwhitened - ours).abs().max() > 1e-3  # the basis did change the function
    weights, _ = stage.init_weights(tmp_path / "export")
    torch.testing.assert_close(
        weights["vae"]["encoder.conv_in.weight"], vae.state_dict()["encoder.conv_in.weight"]
    )
