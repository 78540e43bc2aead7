"""Stage 1: the VAE, as a ``Stage`` for the shared trainer (no loop of its own here).

- Modules: ``{"vae": AutoencoderKL}`` plus ``{"disc": NLayerDiscriminator}`` when the
  discriminator is on; both sit under the trainer's one optimizer and one backward (the loss
  keeps the GAN terms' gradients disjoint). LPIPS is frozen and held by the loss object.
- Validation reconstructs the val split (or ``val.max_batches`` batches of it) from the
  posterior mean with the modules it is given; every rank computes it alone on the bare
  network (no collective). Keys: l1, psnr, ssim, delta_e (CIELAB), lpips when LPIPS is built,
  each also per data style (``psnr/flat colour emoji``), and ``probe_colours_kept``.
  The best checkpoint is chosen on ``val.metric`` (lpips and l1 lower, psnr and ssim higher).
- Export: after training, per-channel latent statistics over ``stats.batches`` training
  batches: ``mean`` = the mean of posterior means, ``std`` = the std of *sampled* latents
  z = mu + sigma * eps, so it includes the posterior noise the UNet's targets carry.
- Fine-tuning (``init.from``): a VAE export of the same model; ``init.freeze =
  ["vae.encoder"]`` trains the decoder alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torchvision.utils import make_grid, save_image

from stages.common.checkpoint import CheckpointConfig
from stages.common.config import ConfigError, merge, to_dict
from stages.common.data import DataConfig, ShardLoader, iter_split
from stages.common.ema import EMAConfig
from stages.common.export import load_tensors, read_export
from stages.common.finetune import InitConfig, check_same_model
from stages.common.optim import OptimConfig
from stages.common.probe import ColourShapeJudge, ProbeConfig, Reference, find_references
from stages.common.run import claim_upstream
from stages.common.stage import RunContext
from stages.common.trainer import TrainConfig, unwrap

from .augment import AugmentConfig, build_augment
from .colour import colour_covariance, fold_into_conv, spread_images, whitening
from .discriminator import NLayerDiscriminator
from .evaluate import colours_kept, reconstruction_report, save_worst_grid
from .export import save_vae_export
from .loss import VAELoss, VAELossConfig, build_lpips
from .model import AutoencoderKL, DiagonalGaussian, VAEModelConfig

METRIC_DIRECTION: dict[str, Literal["min", "max"]] = {
    "lpips": "min",
    "l1": "min",
    "psnr": "max",
    "ssim": "max",
}


@dataclass(frozen=True)
class VAEValConfig:
    batch_size: int = 0  # 0: data.batch_size
    max_batches: int = 0  # 0: the whole val split
    metric: Literal["lpips", "l1", "psnr", "ssim"] = "lpips"  # keeps the best checkpoint
    preview_images: int = 8  # val images shown as originals / EMA / raw rows
    worst_images: int = 8  # worst val reconstructions (by delta E) in previews/vae_worst_*
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # colours kept (see probe.py)


@dataclass(frozen=True)
class LatentStatsConfig:
    batches: int = 50  # training batches measured for the export's latent mean and std
    seed: int = 1234  # data order and posterior noise of that measurement


@dataclass(frozen=True)
class VAEStageConfig:
    model: VAEModelConfig = field(default_factory=VAEModelConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(betas=(0.5, 0.9)))
    ema: EMAConfig = field(default_factory=EMAConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    init: InitConfig = field(default_factory=InitConfig)
    val: VAEValConfig = field(default_factory=VAEValConfig)
    stats: LatentStatsConfig = field(default_factory=LatentStatsConfig)


def without_lpips(config: VAEStageConfig) -> tuple[str, ...]:
    """Every override that trains ``config`` without LPIPS: offline, one retry must work."""
    if config.val.metric == "lpips":
        return ("loss.lpips_weight=0", "val.metric=l1")
    return ("loss.lpips_weight=0",)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def latent_statistics(
    vae: AutoencoderKL, batches, count: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean of posterior means, std of sampled z) over ``count`` batches, (C,)."""
    device = _device(vae)
    channels = vae.config.latent_channels
    mu_sum = torch.zeros(channels, dtype=torch.float64, device=device)
    z_sum, z_sq = torch.zeros_like(mu_sum), torch.zeros_like(mu_sum)
    n = 0
    for i, batch in enumerate(batches):
        if i >= count:
            break
        posterior = vae.encode(batch["image"].to(device))
        z = posterior.sample(generator).double()  # (B,C,h,w)
        mu_sum += posterior.mean.double().sum(dim=(0, 2, 3))
        z_sum += z.sum(dim=(0, 2, 3))
        z_sq += z.square().sum(dim=(0, 2, 3))
        n += z.numel() // channels
    if n == 0:
        raise ValueError("no training batch to measure the latent statistics on")
    var = (z_sq / n - (z_sum / n).square()).clamp_min(1e-12)
    return (mu_sum / n).float().cpu(), var.sqrt().float().cpu()


class VAEStage:
    """The Stage protocol for the autoencoder (see stages/common/stage.py)."""

    name = "vae"
    # Changing these between a run and its resume is harmless (read by the trainer).
    resume_safe_keys = (
        "val.*",
        "stats.*",
        "loss.kl_weight",
        "loss.disc_start",
        "loss.disc_weight",
        "loss.disc_factor",
    )

    def __init__(self, config: VAEStageConfig, ctx: RunContext) -> None:
        self.config = config
        self.ctx = ctx
        factor = config.model.factor
        if config.data.resolution % factor:
            raise ConfigError(
                f"data.resolution {config.data.resolution} is not divisible by the VAE factor "
                f"{factor} (model.channel_mult has {len(config.model.channel_mult)} levels)"
            )
        if config.val.metric == "lpips" and config.loss.lpips_weight <= 0:
            raise ConfigError(
                "val.metric = 'lpips' needs LPIPS, which loss.lpips_weight = 0 disables: "
                "set val.metric to l1, psnr or ssim"
            )
        disc_min = 3 * 2**config.loss.disc_layers  # leaves >= 1 patch after the last conv
        if config.loss.discriminator and config.data.resolution < disc_min:
            raise ConfigError(
                f"loss.disc_layers = {config.loss.disc_layers} needs images of at least "
                f"{disc_min} px (data.resolution is {config.data.resolution}): use fewer layers"
            )
        self.best_metric = (config.val.metric, METRIC_DIRECTION[config.val.metric])
        claim_upstream(ctx.run_dir, {})  # the first stage: no upstream export
        lpips_net = None
        if config.loss.lpips_weight > 0:  # built (and checked) up front
            lpips_net = build_lpips(config.loss, without_lpips(config))
        # Measured here, before any module exists, so every rank and every resume gets the
        # same basis from the same images (colour.py).
        self.colour_basis: torch.Tensor | None = None
        if config.loss.colour_whitening:
            images = spread_images(config.data.split_dir("train"), config.data.resolution)
            self.colour_basis = whitening(colour_covariance(images))
        self.loss_fn = VAELoss(config.loss, lpips_net, self.colour_basis)
        self.augment = build_augment(config.augment)
        self._preview_images: torch.Tensor | None = None
        self._references: list[Reference] | None = None
        self.started_from: dict[str, str] | None = None  # set by the trainer

    # ------------------------------------------------------------------ training

    def build(self) -> dict[str, nn.Module]:
        vae = AutoencoderKL(self.config.model)
        vae.set_input_basis(self.colour_basis)  # the encoder sees whitened colours too
        modules: dict[str, nn.Module] = {"vae": vae}
        if self.config.loss.discriminator:
            cfg = self.config.loss
            modules["disc"] = NLayerDiscriminator(
                self.config.model.in_channels, cfg.disc_channels, cfg.disc_layers
            )
        return modules

    def init_weights(self, folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], str]:
        """A VAE export's autoencoder (a discriminator, if any, starts fresh)."""
        manifest = read_export(folder, "vae", verify=True)

        def arch(model: dict) -> dict:  # a memory switch, not the architecture
            return {k: v for k, v in model.items() if k != "gradient_checkpointing"}

        # An export written before a model key existed has that key's default.
        recorded = merge(to_dict(VAEModelConfig()), manifest.get("info", {}).get("model", {}))
        check_same_model(arch(recorded), arch(to_dict(self.config.model)), folder)
        state = load_tensors(folder)
        if self.colour_basis is not None:  # exports are plain: unfold the basis from conv_in
            inverse = torch.linalg.inv(self.colour_basis.double())
            state["encoder.conv_in.weight"] = fold_into_conv(
                state["encoder.conv_in.weight"], inverse
            )
        return {"vae": state}, manifest["hash"]

    def train_loader(self, rank: int, world_size: int) -> ShardLoader:
        return ShardLoader.from_config(
            self.config.data, "train", seed=self.config.train.seed, rank=rank, world_size=world_size
        )

    def loss(self, modules: dict[str, nn.Module], batch, step: int) -> dict[str, torch.Tensor]:
        vae, disc = modules["vae"], modules.get("disc")
        x = batch["image"].to(_device(vae), non_blocking=True)  # (B,3,H,W) in [-1,1]
        if self.augment is not None:
            with torch.no_grad():
                x = self.augment(x)
        recon, mean, logvar = vae(x)  # through the wrapper: DDP / autocast see the forward
        last_layer = unwrap(vae).decoder.conv_out.weight if disc is not None else None
        return self.loss_fn(x, recon, DiagonalGaussian(mean, logvar), step, disc, last_layer)

    # ------------------------------------------------------------- evaluation

    def _val_batches(self):
        cfg = self.config
        batch_size = cfg.val.batch_size or cfg.data.batch_size
        batches = iter_split(cfg.data.split_dir("val"), batch_size, cfg.data.resolution)
        for i, batch in enumerate(batches):
            if cfg.val.max_batches and i >= cfg.val.max_batches:
                return
            yield batch

    def _probe_references(self) -> list[Reference]:
        """The probe's coloured reference images of the train split (found once)."""
        if self._references is None:
            cfg = self.config
            self._references = find_references(
                cfg.data.split_dir("train"), cfg.val.probe, cfg.data.resolution
            )
        return self._references

    @torch.no_grad()
    def validate(self, modules: dict[str, nn.Module], step: int) -> dict[str, float]:
        """Val metrics overall and per style (``stages.vae.evaluate``), the probe's colours
        kept, and a grid of the worst val reconstructions by delta E in ``previews/``."""
        vae = unwrap(modules["vae"])
        was_training = vae.training
        vae.eval()
        device = _device(vae)
        lpips_net = self.loss_fn.lpips

        def reconstruct(x: torch.Tensor) -> torch.Tensor:
            return vae.decode(vae.encode(x.to(device)).mode())

        def with_kl(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            posterior = vae.encode(x.to(device))
            return vae.decode(posterior.mode()), {"kl": posterior.kl()}

        try:
            metrics, worst = reconstruction_report(
                with_kl, self._val_batches(), lpips_net, self.config.val.worst_images
            )
            references = self._probe_references()
            if references:
                kept = colours_kept(reconstruct, references, ColourShapeJudge(references))
                metrics["probe_colours_kept"] = kept["probe_colours_kept"]
        except ValueError as err:
            raise ValueError(f"{self.config.data.split_dir('val')}: {err}") from err
        finally:
            vae.train(was_training)
        if worst is not None:
            save_worst_grid(worst, self.ctx.run_dir / "previews" / f"vae_worst_{step:07d}.png")
        return metrics

    def preview(self, modules: dict[str, dict[str, nn.Module]], step: int, folder: Path) -> None:
        """One PNG: originals, then reconstructions (posterior mean) by EMA and raw weights."""
        if self._preview_images is None:
            count = self.config.val.preview_images
            batch = next(
                iter(
                    iter_split(
                        self.config.data.split_dir("val"), count, self.config.data.resolution
                    )
                )
            )
            self._preview_images = batch["image"][:count]
        rows = [self._preview_images]
        for kind in ("ema", "raw"):
            if kind in modules:
                vae = unwrap(modules[kind]["vae"])
                was_training = vae.training
                vae.eval()
                with torch.no_grad():
                    x = self._preview_images.to(_device(vae))
                    rows.append(vae.decode(vae.encode(x).mode()).float().cpu())
                vae.train(was_training)
        grid = make_grid(torch.cat(rows).clamp(-1, 1), nrow=len(rows[0]), padding=2)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_image((grid + 1) / 2, folder / f"vae_{step:07d}.png")

    # ------------------------------------------------------------------- export

    def export(self, modules: dict[str, nn.Module], folder: Path) -> None:
        vae = unwrap(modules["vae"])
        was_training = vae.training
        vae.eval()
        cfg = self.config
        loader = ShardLoader.from_config(cfg.data, "train", seed=cfg.stats.seed)
        generator = torch.Generator(device=_device(vae)).manual_seed(cfg.stats.seed)
        mean, std = latent_statistics(vae, loader, cfg.stats.batches, generator)
        vae.train(was_training)
        save_vae_export(vae, cfg, folder, mean, std, started_from=self.started_from)
