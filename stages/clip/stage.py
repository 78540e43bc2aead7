"""Stage 2: contrastive training of the text encoder against a small image tower.

The tokenizer is trained once from the train split's captions at the first start of a run
and kept in the run folder (a resumed run, and the export, reuse that file). The run folder
records the VAE export it trains on; a run on another one is moved aside, never resumed. Images reach
the tower as normalised VAE latents (posterior mean, ``(z - mean) / std`` with the export's
statistics) or as pixels. Validation is retrieval over the whole val split in both
directions; a retrieved item counts as a hit when its caption tokenises identically to the
query's, because identical captions have identical embeddings and an exact-pair rule would
be decided by tie-breaking. The chance level of that rule is logged alongside.

Fine-tuning (``init.from``): a CLIP export of the same model, whose tokenizer the run takes
instead of training one (its embeddings learned those token ids); a latent tower must have
learned the run's VAE export. ``init.freeze = ["text"]`` trains the image tower alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stages.common.cache import CacheConfig, cached_batches, ensure_cache
from stages.common.captions import CaptionAugmentConfig, augment_captions
from stages.common.checkpoint import CheckpointConfig
from stages.common.config import to_dict
from stages.common.data import (
    CorruptSample,
    DataConfig,
    ShardDataset,
    ShardLoader,
    iter_split,
    load_index,
)
from stages.common.ema import EMAConfig
from stages.common.export import ExportError, check_upstream, load_tensors, read_export
from stages.common.finetune import InitConfig, check_same_model, state_dicts_by_prefix
from stages.common.optim import OptimConfig
from stages.common.probe import (
    ProbeConfig,
    Reference,
    find_references,
    image_to_prompt_r1,
    text_probe,
)
from stages.common.run import claim_upstream, is_main_process, wait_for_file
from stages.common.stage import ResumableLoader, RunContext
from stages.common.trainer import TrainConfig, unwrap
from stages.vae.export import LoadedVAE, load_vae

from .export import build_clip_modules, save_clip_export
from .grounding import GroundingConfig, grounding_report, write_report
from .loss import CLIPLossConfig, LogitScale, caption_groups, contrastive_loss
from .model import CLIPModelConfig, ImageTower, TextEncoder
from .tokenizer import CLIPTokenizer, train_tokenizer

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 32768  # an upper bound: a small corpus yields fewer merges
    min_frequency: int = 2  # a pair must occur this often to be merged
    max_captions: int = 0  # train on the first N train captions (0 = all of them)


@dataclass(frozen=True)
class CLIPValConfig:
    batch_size: int = 256
    preview_images: int = 8  # val images whose top-1 caption the preview lists
    preview_candidates: int = 64  # captions they are matched against
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # attribute x object prompts


@dataclass(frozen=True)
class CLIPCacheConfig(CacheConfig):
    """The train split's normalised VAE posterior means, encoded once (the frozen VAE and
    unaugmented images give the tower the same input every epoch; on a CPU encoding each
    batch again costs more than the CLIP step). Off by default."""

    enabled: bool = False
    batch_size: int = 256


@dataclass(frozen=True)
class CLIPStageConfig:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    init: InitConfig = field(default_factory=InitConfig)
    model: CLIPModelConfig = field(default_factory=CLIPModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: CLIPLossConfig = field(default_factory=CLIPLossConfig)
    val: CLIPValConfig = field(default_factory=CLIPValConfig)
    cache: CLIPCacheConfig = field(default_factory=CLIPCacheConfig)
    captions: CaptionAugmentConfig = field(default_factory=CaptionAugmentConfig)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)


def read_captions(split_dir: Path, limit: int = 0) -> list[str]:
    """Every readable caption of a split (text members only; images are not decoded)."""
    dataset = ShardDataset(load_index(split_dir), resolution=1)
    count = len(dataset) if limit <= 0 else min(limit, len(dataset))
    captions = []
    for i in range(count):
        try:
            captions.append(dataset.caption(i))
        except (CorruptSample, OSError, ValueError):
            continue  # the loader skips the same samples
    if not captions:
        raise ValueError(f"{split_dir}: no readable caption to train the tokenizer on")
    return captions


def prepare_tokenizer(run_dir: Path, config: CLIPStageConfig) -> CLIPTokenizer:
    """Load the run's tokenizer, training it first if this run has none.

    Only the main process trains (and writes atomically); other ranks wait for the file.
    """
    path = Path(run_dir) / TOKENIZER_FILE
    context = config.model.text.context_length
    if not path.exists():
        if is_main_process() and config.init.from_:
            # Fine-tuning: the export's token ids are what its embeddings learned.
            source = Path(config.init.from_)
            read_export(source, "clip", verify=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            shutil.copyfile(source / TOKENIZER_FILE, tmp)
            os.replace(tmp, path)
            log.info("took the tokenizer of %s", source)
        elif is_main_process():
            train_dir = config.data.split_dir("train")
            captions = read_captions(train_dir, config.tokenizer.max_captions)
            tokenizer = train_tokenizer(
                captions, config.tokenizer.vocab_size, context, config.tokenizer.min_frequency
            )
            tokenizer.save(path)
            log.info("trained a %d-token BPE on %d captions", tokenizer.vocab_size, len(captions))
        else:
            wait_for_file(path)
    return CLIPTokenizer.from_file(path, context)


def _chance_recall(class_sizes: torch.Tensor, total: int, k: int) -> float:
    """Expected recall@k of a random ranking: 1 - C(N - n, k) / C(N, k), averaged."""
    k = min(k, total)
    miss = [math.comb(total - int(n), k) / math.comb(total, k) for n in class_sizes]
    return 1.0 - sum(miss) / len(miss)


def retrieval_metrics(
    image_emb: torch.Tensor, text_emb: torch.Tensor, classes: torch.Tensor, chunk: int = 1024
) -> dict[str, float]:
    """Recall@1/5 both ways over normalised (N, E) embeddings; a hit shares the query's class."""
    total = image_emb.shape[0]
    k = min(5, total)
    hits = {"t2i": torch.zeros(total, k, dtype=torch.bool), "i2t": torch.zeros(total, k).bool()}
    for start in range(0, total, chunk):
        rows = slice(start, start + chunk)
        t2i = (text_emb[rows] @ image_emb.T).topk(k, dim=1).indices  # (n, k) image indices
        i2t = (image_emb[rows] @ text_emb.T).topk(k, dim=1).indices  # (n, k) text indices
        hits["t2i"][rows] = classes[t2i] == classes[rows, None]
        hits["i2t"][rows] = classes[i2t] == classes[rows, None]
    metrics = {}
    for direction, hit in hits.items():
        metrics[f"{direction}_r1"] = hit[:, 0].float().mean().item()
        metrics[f"{direction}_r5"] = hit.any(dim=1).float().mean().item()
    metrics["mean_recall"] = sum(metrics.values()) / 4
    sizes = torch.bincount(classes)[classes]
    metrics["chance_r1"] = _chance_recall(sizes, total, 1)
    metrics["chance_r5"] = _chance_recall(sizes, total, 5)
    metrics["val_samples"] = float(total)
    return metrics


class CLIPStage:
    """The CLIP stage for the shared trainer (see ``stages.common.stage.Stage``)."""

    name = "clip"
    best_metric = ("mean_recall", "max")
    # Change no training computation (a cache shard holds fixed rows; the order is the same).
    resume_safe_keys = ("val.*", "grounding.*", "cache.batch_size", "cache.shard_size")

    def __init__(self, config: CLIPStageConfig, ctx: RunContext):
        self.config = config
        self.ctx = ctx
        image = config.model.image
        self.vae: LoadedVAE | None = None
        vae_dir = ctx.export_dir("vae")
        if image.input == "latent":
            try:
                self.vae = load_vae(vae_dir, device=ctx.device)
            except ExportError as err:
                raise ExportError(
                    f"the CLIP stage's latent image tower needs the VAE export at {vae_dir}: "
                    f"run `make vae` first ({err})"
                ) from err
            if config.data.resolution % self.vae.factor:
                raise ValueError(
                    f"data.resolution {config.data.resolution} is not a multiple of the VAE "
                    f"factor {self.vae.factor}"
                )
            self.image_channels = self.vae.channels
            self.image_size = config.data.resolution // self.vae.factor
        else:
            self.image_channels, self.image_size = 3, config.data.resolution
        # Before anything is written there: a run on another VAE export is moved aside.
        claim_upstream(ctx.run_dir, {"vae": self.vae.hash} if self.vae is not None else {})
        self.tokenizer = prepare_tokenizer(ctx.run_dir, config)
        self._references: list[Reference] | None = None
        self.started_from: dict[str, str] | None = None  # set by the trainer

    # ------------------------------------------------------------------ the trainer's calls

    def build(self) -> dict[str, nn.Module]:
        cfg = self.config
        return build_clip_modules(
            cfg.model,
            self.tokenizer.vocab_size,
            self.image_channels,
            self.image_size,
            LogitScale(cfg.loss.init_temperature, cfg.loss.max_logit_scale),
        )

    def init_weights(self, folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], str]:
        """A CLIP export's towers and logit scale (its tokenizer is the run's already)."""
        manifest = read_export(folder, self.name, verify=True)
        if self.vae is not None:  # the latent tower learned this VAE's latents
            try:
                check_upstream(manifest, "vae", self.vae.hash, self.ctx.export_dir("vae"))
            except ExportError as err:
                raise ExportError(f"init.from: {folder}: {err}") from None
        recorded = manifest.get("info", {}).get("model", {})
        check_same_model(recorded, to_dict(self.config.model), folder)
        prefixes = {name: f"{name}." for name in ("text", "image", "logit_scale")}
        return state_dicts_by_prefix(load_tensors(folder), prefixes), manifest["hash"]

    def train_loader(self, rank: int, world_size: int) -> ResumableLoader:
        cfg = self.config
        if cfg.cache.enabled and self.vae is not None:
            vae = self.vae

            def encode(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
                mean, _ = vae.encode(batch["image"])  # the posterior mean: deterministic
                return {"latent": vae.normalize(mean)}

            rows = ensure_cache(
                self.ctx.run_dir / "cache",
                {"encoder": "clip/1", "vae": vae.hash},
                encode,
                cfg.data.split_dir("train"),
                cfg.data.resolution,
                cfg.cache,
                rank,
                world_size,
                num_workers=cfg.data.num_workers,
            )
            return cached_batches(rows, cfg.data.batch_size, cfg.train.seed, rank, world_size)
        return ShardLoader.from_config(
            cfg.data, "train", seed=cfg.train.seed, rank=rank, world_size=world_size
        )

    def tower_inputs(self, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        """A batch -> the image tower's input on ``device``: cached latents, the VAE's
        normalised posterior mean of the images, or the images themselves."""
        if "latent" in batch:
            return batch["latent"].to(device)
        if self.vae is None:
            return batch["image"].to(device)
        vae = self._vae_on(device)
        mean, _ = vae.encode(batch["image"])  # the posterior mean: deterministic
        return vae.normalize(mean)

    def _vae_on(self, device: torch.device) -> LoadedVAE:
        """The frozen VAE on the towers' device (moved once, at the first batch)."""
        vae = self.vae
        if vae.device != device:
            vae.model.to(device)
            vae.mean, vae.std = vae.mean.to(device), vae.std.to(device)
        return vae

    def _embed(
        self, modules: dict[str, nn.Module], batch: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(modules["text"].parameters()).device
        ids, mask = self.tokenizer.encode(batch["caption"])
        image_emb = modules["image"](self.tower_inputs(batch, device))
        text_emb = modules["text"](ids.to(device), mask.to(device)).embedding
        return F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)

    def loss(self, modules: dict[str, nn.Module], batch: Any, step: int) -> dict[str, torch.Tensor]:
        captions = augment_captions(list(batch["caption"]), self.config.captions)
        image_emb, text_emb = self._embed(modules, {**batch, "caption": captions})
        scale = modules["logit_scale"]()
        groups = caption_groups(captions, image_emb.device)
        loss, accuracy = contrastive_loss(image_emb, text_emb, scale, groups)
        return {"loss": loss, "batch_i2t_acc": accuracy, "logit_scale": scale.detach()}

    @torch.no_grad()
    def validate(self, modules: dict[str, nn.Module], step: int) -> dict[str, float]:
        """Retrieval over the whole val split; every rank computes it alone (no collective)."""
        bare = {name: unwrap(m) for name, m in modules.items()}
        images, texts, labels = [], [], []
        class_of: dict[tuple[int, ...], int] = {}  # token sequence -> class id
        val_dir = self.config.data.split_dir("val")
        for batch in iter_split(val_dir, self.config.val.batch_size, self.config.data.resolution):
            image_emb, text_emb = self._embed(bare, batch)
            images.append(image_emb.cpu())
            texts.append(text_emb.cpu())
            ids, _ = self.tokenizer.encode(batch["caption"])
            labels += [class_of.setdefault(tuple(row), len(class_of)) for row in ids.tolist()]
        if not images:
            raise ValueError(f"{val_dir}: no readable validation sample")
        metrics = retrieval_metrics(torch.cat(images), torch.cat(texts), torch.tensor(labels))
        return {**metrics, **self.probe(bare)}

    @torch.no_grad()
    def probe(self, bare: dict[str, nn.Module]) -> dict[str, float]:
        """The attribute x object probe (``stages.common.probe``): the text side, and when
        the train split has the probe's images, the share of them whose own prompt ranks
        first among the probe prompts (``probe_i2t_r1``)."""
        cfg = self.config.val.probe
        prompts = [p for p, _, _ in cfg.prompts()]
        device = next(bare["text"].parameters()).device
        ids, mask = self.tokenizer.encode(prompts)
        text_emb = F.normalize(
            bare["text"](ids.to(device), mask.to(device)).embedding.float(), dim=-1
        )
        out = text_probe(text_emb.cpu(), cfg)
        if self._references is None:
            train_dir = self.config.data.split_dir("train")
            self._references = find_references(train_dir, cfg, self.config.data.resolution)
        if self._references:
            images = torch.stack([r.image for r in self._references])
            image_emb = bare["image"](self.tower_inputs({"image": images}, device)).float()
            out["probe_i2t_r1"] = image_to_prompt_r1(image_emb, text_emb, self._references, cfg)
        return out

    @torch.no_grad()
    def preview(self, modules: dict[str, dict[str, nn.Module]], step: int, folder: Path) -> None:
        """A JSON of the top-1 caption (among the first val captions) of a few val images."""
        val = self.config.val
        val_dir = self.config.data.split_dir("val")
        batch = next(iter_split(val_dir, val.preview_candidates, self.config.data.resolution))
        captions = batch["caption"]
        shown = min(val.preview_images, len(captions))
        inputs = {"image": batch["image"][:shown]}
        examples = [{"key": batch["key"][i], "caption": captions[i]} for i in range(shown)]
        ids, mask = self.tokenizer.encode(captions)
        for kind, group in modules.items():
            bare = {name: unwrap(m) for name, m in group.items()}
            device = next(bare["text"].parameters()).device
            image_emb = bare["image"](self.tower_inputs(inputs, device)).float()
            text_emb = bare["text"](ids.to(device), mask.to(device)).embedding.float()
            # (shown, candidates) cosine similarities
            scores = F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
            for example, row in zip(examples, scores):
                best = int(row.argmax())
                example[f"{kind}_top1"] = captions[best]
                example[f"{kind}_correct"] = captions[best] == example["caption"]
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        out = {"step": step, "candidates": len(captions), "examples": examples}
        (folder / f"retrieval_{step:07d}.json").write_text(json.dumps(out, indent=2) + "\n")

    def export(self, modules: dict[str, nn.Module], folder: Path) -> None:
        text = unwrap(modules["text"])
        image = unwrap(modules["image"])
        logit_scale = unwrap(modules["logit_scale"])
        if not isinstance(text, TextEncoder) or not isinstance(image, ImageTower):
            raise TypeError(f"export got {type(text).__name__} / {type(image).__name__}")
        save_clip_export(
            folder,
            text,
            image,
            logit_scale,
            self.tokenizer,
            self.config,
            vae_hash=self.vae.hash if self.vae is not None else None,
            started_from=self.started_from,
        )
        if self.config.grounding.enabled:
            self.grounding(text, image)

    @torch.no_grad()
    def grounding(self, text: TextEncoder, image: ImageTower) -> None:
        """The grounding report (``grounding.py``) of the exported towers over the train
        split, written to the run folder."""
        cfg, device = self.config, next(text.parameters()).device
        embeddings, captions = [], []
        train_dir = cfg.data.split_dir("train")
        for batch in iter_split(train_dir, cfg.val.batch_size, cfg.data.resolution):
            embeddings.append(image(self.tower_inputs(batch, device)).float().cpu())
            captions += batch["caption"]

        def embed_texts(words: list[str]) -> torch.Tensor:
            ids, mask = self.tokenizer.encode(words)
            return text(ids.to(device), mask.to(device)).embedding.float().cpu()

        report = grounding_report(torch.cat(embeddings), captions, embed_texts, cfg.grounding)
        path = write_report(report, self.ctx.run_dir)
        flagged = report["flagged"]
        shown = ", ".join(flagged[:10]) + (
            f" and {len(flagged) - 10} more" if len(flagged) > 10 else ""
        )
        log.info("grounding report: %s (flagged: %s)", path, shown or "none")
