"""Stage 3: the UNet over frozen VAE latents and CLIP text states, or over pixels, or both.

The stage loads the VAE and CLIP exports (refusing a CLIP export trained on another VAE),
resolves the network's input channels, context width and latent side from them, and holds
them frozen. Training reads the shared latent cache (``stages/common/cache.py``, filled by
``encode.py``'s function) or, with ``cache.enabled = false``, encodes each batch on the fly
with the same maths. With ``captions.enabled`` the
captions are rewritten each step (the name alone, fewer tags, no style: as people type
them) and the text is encoded on the fly from the cache's captions.

``inputs.autoencoder = "identity"`` trains on pixels (no VAE export needed, no latent
statistics) and ``inputs.text = false`` trains an unconditional model (no CLIP export);
the objective (``objectives.py``: flow matching, DDPM eps / v, VDM) is a config choice, its
learned schedule (VDM) a second trained module exported beside the UNet as ``schedule.*``.

Fine-tuning (``init.from``, ``stages/common/finetune.py``) starts from a UNet export of the
same architecture, inputs and objective kind trained against the very VAE and CLIP exports
this run uses (its latents and text states are what the weights learned), and records the
export's hash in its own export's ``info["init"]``.

The stage contract: the run folder records the upstream export hashes it trained against
in ``upstream.json`` (``stages.common.run.claim_upstream``); a run folder trained against
other exports is moved aside and a new run starts, and the export's manifest records them
for the pipeline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from stages.clip.export import LoadedCLIP, load_clip
from stages.common.balance import BalanceConfig, concept_weights
from stages.common.cache import CachedRows, cached_batches, ensure_cache
from stages.common.captions import CaptionAugmentConfig, augment_captions
from stages.common.checkpoint import CheckpointConfig
from stages.common.config import ConfigError, to_dict
from stages.common.data import DataConfig, ResumableBatches, ShardLoader
from stages.common.ema import EMAConfig
from stages.common.export import (
    ExportError,
    check_upstream,
    load_tensors,
    read_export,
    write_export,
)
from stages.common.files import write_json_atomic
from stages.common.finetune import InitConfig, check_same_model, state_dicts_by_prefix
from stages.common.optim import OptimConfig
from stages.common.run import claim_upstream
from stages.common.stage import RunContext
from stages.common.trainer import TrainConfig, unwrap
from stages.vae.export import IdentityAutoencoder, LoadedVAE, load_vae

from .encode import UNetCacheConfig, encode_batch, latents_and_condition
from .evaluate import EvalConfig, Evaluator, ImageEmbedder, describe
from .export import InputsConfig
from .model import UNet, UNetModelConfig, count_parameters
from .objectives import VDM, ObjectiveConfig, make_objective
from .samplers import SamplerConfig, check_sampling

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UNetStageConfig:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    init: InitConfig = field(default_factory=InitConfig)
    model: UNetModelConfig = field(default_factory=UNetModelConfig)
    inputs: InputsConfig = field(default_factory=InputsConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    cache: UNetCacheConfig = field(default_factory=UNetCacheConfig)
    sample: SamplerConfig = field(default_factory=SamplerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    captions: CaptionAugmentConfig = field(default_factory=CaptionAugmentConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)


def resolve_model(
    cfg: UNetModelConfig, channels: int, context_dim: int, side: int
) -> UNetModelConfig:
    """Fill the 0 (= from upstream) fields; a set field must agree with the exports."""
    resolved = {"in_channels": channels, "context_dim": context_dim, "sample_size": side}
    for name, value in resolved.items():
        given = getattr(cfg, name)
        if given not in (0, value):  # context_dim -1: no text encoder
            raise ConfigError(
                f"model.{name} = {given} disagrees with the upstream exports/data ({value}); "
                "leave it at 0 to take it from them"
            )
    return replace(cfg, **resolved)


class UNetStage:
    """The UNet stage for the shared trainer (see ``stages.common.stage.Stage``)."""

    name = "unet"
    best_metric: tuple[str, Literal["min", "max"]] | None = ("fd", "min")
    # Evaluation settings never touch training; the cache and on-the-fly paths read the
    # same sample stream (same permutation over the same indices) with the same maths.
    resume_safe_keys = (
        "eval.*",
        "sample.*",
        "cache.enabled",
        "cache.batch_size",
        "cache.shard_size",
    )

    def __init__(self, config: UNetStageConfig, ctx: RunContext):
        self.ctx = ctx
        inputs = config.inputs
        if config.objective.kind == "vdm" and inputs.autoencoder != "identity":
            raise ConfigError(
                "objective.kind = vdm reports bits per dimension of 8-bit pixels: it needs "
                'inputs.autoencoder = "identity" (pixel space)'
            )
        exports = {name: ctx.export_dir(name) for name in inputs.upstream}
        for name, folder in exports.items():
            if not (folder / "manifest.json").exists():
                raise ExportError(
                    f"the UNet stage needs the {name} export at {folder}, which does not "
                    f"exist: run `make {name} PRESET={ctx.preset}` first"
                )
        s = config.sample
        check_sampling(s.sampler, s.steps, s.eta, s.cfg_interval)
        self.vae: LoadedVAE | IdentityAutoencoder = (
            load_vae(exports["vae"], device=ctx.device)
            if "vae" in exports
            else IdentityAutoencoder(ctx.device)
        )
        self.clip: LoadedCLIP | None = None
        self.hashes: dict[str, str] = {}
        if "vae" in exports:
            self.hashes["vae"] = self.vae.hash
        if "clip" in exports:
            # A latent-tower CLIP export records the VAE it was trained on: refuse another.
            vae_hash = self.vae.hash if "vae" in exports else None
            self.clip = load_clip(exports["clip"], device=ctx.device, vae_hash=vae_hash)
            self.hashes["clip"] = self.clip.hash

        resolution = config.data.resolution
        if resolution % self.vae.factor:
            raise ConfigError(
                f"data.resolution {resolution} is not a multiple of the VAE factor "
                f"{self.vae.factor}"
            )
        side = resolution // self.vae.factor
        # The CLIP export's image tower only serves evaluation, where images are resized
        # to its resolution (``ImageEmbedder``); the UNet needs its text width only.
        context = self.clip.width if self.clip is not None else -1
        model = resolve_model(config.model, self.vae.channels, context, side)
        self.config = replace(config, model=model)
        self.latent_shape = (self.vae.channels, side, side)
        self.objective = make_objective(config.objective)
        # The best checkpoint follows the FD when there is a CLIP space to measure it in,
        # else VDM's bits per dimension, else none is kept.
        if self.clip is not None or config.eval.clip_export:
            self.best_metric = ("fd", "min")
        else:
            self.best_metric = ("bpd", "min") if isinstance(self.objective, VDM) else None
        self._evaluator: Evaluator | None = None
        self.reference: dict[str, float] = {}
        self.started_from: dict[str, str] | None = None  # set by the trainer
        claim_upstream(ctx.run_dir, self.hashes)

    @property
    def uses_cache(self) -> bool:
        """The latent cache holds VAE posteriors and text states: latent, conditional runs."""
        return self.config.cache.enabled and self.clip is not None and "vae" in self.hashes

    @property
    def evaluator(self) -> Evaluator:
        """Built at the first validation or preview: reads val and computes the reference."""
        if self._evaluator is None:
            cfg = self.config
            embedder = None
            if cfg.eval.clip_export:
                embedder = ImageEmbedder.from_export(Path(cfg.eval.clip_export), self.ctx.device)
            elif self.clip is not None and "vae" not in self.hashes:
                # Pixel space: a latent-tower CLIP needs its own VAE, found beside it.
                embedder = ImageEmbedder.from_export(self.ctx.export_dir("clip"), self.ctx.device)
            elif self.clip is not None:
                embedder = ImageEmbedder(self.clip, self.vae)
            self._evaluator = Evaluator(
                self.vae,
                self.clip,
                embedder,
                cfg.data.split_dir("val"),
                cfg.data.resolution,
                cfg.eval,
                cfg.sample,
                self.objective,
            )
            self.reference = self._evaluator.reference()
            log.info("unet reference (real val images): %s", describe(self.reference))
        return self._evaluator

    # ------------------------------------------------------------------ the trainer's calls

    def build(self) -> dict[str, nn.Module]:
        # Built again here, after the trainer seeded the RNG: VDM's learned schedule is
        # initialised randomly and must be the same for the same train.seed.
        self.objective = make_objective(self.config.objective)
        unet = UNet(self.config.model).place(self.ctx.device)
        log.info("unet: %.2fM parameters", count_parameters(unet) / 1e6)
        schedule = self.objective.learned_schedule
        return {"unet": unet} if schedule is None else {"unet": unet, "schedule": schedule}

    def init_weights(self, folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], str]:
        """A UNet export's weights (and VDM's schedule), refusing one that does not fit."""
        manifest = read_export(folder, self.name, verify=True)
        info = manifest.get("info", {})
        try:
            for name, actual in self.hashes.items():
                check_upstream(manifest, name, actual, self.ctx.export_dir(name))
        except ExportError as err:
            raise ExportError(f"init.from: {folder}: {err}") from None
        cfg = self.config
        recorded = {
            "inputs": to_dict(InputsConfig.recorded(info)),
            "objective.kind": info.get("objective", {}).get("kind", "flow"),
        }
        current = {"inputs": to_dict(cfg.inputs), "objective.kind": cfg.objective.kind}
        for key, value in recorded.items():
            if value != current[key]:
                raise ConfigError(
                    f"init.from: {folder} was trained with {key} = {value}, this run has "
                    f"{current[key]}: fine-tuning keeps them"
                )

        def arch(model: dict) -> dict:  # a memory switch, not the architecture
            return {k: v for k, v in model.items() if k != "gradient_checkpointing"}

        check_same_model(arch(info.get("model", {})), arch(to_dict(cfg.model)), folder)
        prefixes = {"unet": "", "schedule": "schedule."}
        if self.objective.learned_schedule is None:
            del prefixes["schedule"]
        return state_dicts_by_prefix(load_tensors(folder), prefixes), manifest["hash"]

    def train_loader(self, rank: int, world_size: int) -> ResumableBatches | ShardLoader:
        cfg = self.config
        seed = cfg.train.seed
        if not self.uses_cache:
            if cfg.balance.enabled:
                raise ConfigError("balance.enabled needs the latent cache (cache.enabled = true)")
            return ShardLoader.from_config(cfg.data, "train", seed, rank, world_size)
        text_dtype = getattr(torch, cfg.cache.text_dtype)
        vae, clip = self.vae, self.clip

        def encode(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            return encode_batch(vae, clip, batch["image"], batch["caption"], text_dtype)

        parts = {"encoder": "unet/1", "vae": vae.hash, "clip": clip.hash}
        parts["text_dtype"] = cfg.cache.text_dtype
        rows = ensure_cache(
            self.ctx.run_dir / "cache",
            parts,
            encode,
            cfg.data.split_dir("train"),
            cfg.data.resolution,
            cfg.cache,
            rank,
            world_size,
            num_workers=cfg.data.num_workers,
        )
        return cached_batches(
            rows,
            cfg.data.batch_size,
            seed,
            rank,
            world_size,
            num_workers=cfg.data.num_workers,
            pin_memory=cfg.data.pin_memory and torch.cuda.is_available(),
            weights=self._balance(rows) if cfg.balance.enabled else None,
        )

    @torch.no_grad()
    def _balance(self, rows: CachedRows) -> torch.Tensor:
        """Concept-balanced sampling weights (``stages/common/balance.py``) of the cached
        rows, in the frozen CLIP's image space; every rank computes the same ones, and the
        report goes to the run folder."""
        features, captions = [], []
        for start in range(0, len(rows), 1024):
            batch = rows.__getitems__(list(range(start, min(start + 1024, len(rows)))))
            mean = batch["latent_mean"].to(self.ctx.device, torch.float32)
            if self.clip.image_input == "latent":
                features.append(self.clip.embed_images(self.vae.normalize(mean)).float().cpu())
            else:  # a pixel tower sees the decoded posterior mean
                features.append(self.clip.embed_images(self.vae.decode(mean)).float().cpu())
            captions += batch["caption"]
        weights, report = concept_weights(
            captions, F.normalize(torch.cat(features), dim=-1), self.config.balance
        )
        write_json_atomic(self.ctx.run_dir / "balance.json", report)
        log.info(
            "balance: %d concepts, %d of %d samples down-weighted, %.2f distinct per epoch",
            report["concepts"],
            report["downweighted_samples"],
            report["samples"],
            report["distinct_per_epoch"],
        )
        return weights

    def loss(self, modules: dict[str, nn.Module], batch: Any, step: int) -> dict[str, torch.Tensor]:
        unet = modules["unet"]
        device = next(unet.parameters()).device
        augment = self.clip is not None and self.config.captions.enabled
        if augment:  # rewritten captions (stages/common/captions.py), encoded below
            batch = {**batch, "caption": augment_captions(batch["caption"], self.config.captions)}
        if "image" not in batch:  # from the latent cache
            x0, cond = latents_and_condition(batch, self.vae, device)
            if augment:  # the cached states are of the captions as written
                cond = self.clip.encode_text(batch["caption"]).to(device)
        elif self.clip is not None and "vae" in self.hashes:  # on the fly, the cache's maths
            encoded = encode_batch(self.vae, self.clip, batch["image"], batch["caption"])
            x0, cond = latents_and_condition(encoded, self.vae, device)
        else:  # pixel space (identity: the images, zero std) or an unconditional VAE run
            mean, std = self.vae.encode(batch["image"])
            x0 = self.vae.normalize(mean + std * torch.randn(mean.shape, device=mean.device))
            x0 = x0.to(device)
            cond = self.clip.encode_text(list(batch["caption"])) if self.clip else None
        null = self.clip.null if self.clip is not None else None
        return self.objective.loss(unet, x0, cond, null, schedule=modules.get("schedule"))

    @torch.no_grad()
    def validate(self, modules: dict[str, nn.Module], step: int) -> dict[str, float]:
        evaluator = self.evaluator
        metrics = evaluator.metrics(unwrap(modules["unet"]), _schedule(modules))
        return {**metrics, **self.reference}

    @torch.no_grad()
    def preview(self, modules: dict[str, dict[str, nn.Module]], step: int, folder: Path) -> None:
        nets = {kind: unwrap(group["unet"]) for kind, group in modules.items()}
        schedules = {kind: _schedule(group) for kind, group in modules.items()}
        path = self.evaluator.grid(nets, Path(folder) / f"samples_{step:07d}.png", schedules)
        log.info("unet preview: %s", path)

    def export(self, modules: dict[str, nn.Module], folder: Path) -> None:
        unet = unwrap(modules["unet"])
        cfg = self.config
        tensors = dict(unet.state_dict())
        schedule = _schedule(modules)
        if schedule is not None:
            tensors.update({f"schedule.{k}": v for k, v in schedule.state_dict().items()})
        info = {
            "model": to_dict(cfg.model),
            "inputs": to_dict(cfg.inputs),
            "objective": to_dict(cfg.objective),
            "latent_shape": list(self.latent_shape),
            "resolution": cfg.data.resolution,
            "sampling": to_dict(cfg.sample),
            "time_convention": self.objective.time_convention,
            "parameters": count_parameters(unet),
        }
        if self.started_from is not None:
            info["init"] = self.started_from
        write_export(Path(folder), self.name, tensors, cfg, info, self.hashes)


def _schedule(modules: dict[str, nn.Module]) -> nn.Module | None:
    """The learned schedule (VDM) of a module group, unwrapped; None for fixed schedules."""
    return unwrap(modules["schedule"]) if "schedule" in modules else None
