"""Evaluation of the UNet on fixed prompts and seeds: a sample grid and CLIP-space numbers.

- **CLIP score** (Hessel et al. 2021, w = 100): 100 * mean(max(cos(image, caption), 0)) with
  the CLIP export's image and text towers, over images generated for val captions
  (text-conditional models only).
- **R-precision** (Xu et al. 2018): whether each generated image's own caption ranks first
  among it and 99 other val captions by the same CLIP similarity.
- **Fréchet distance** between the image-tower embeddings of generated and of real val
  images (FID's formula in a CLIP export's embedding space):
      FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)
  The trace term uses the symmetric PSD form, so two ``eigh`` calls in float64 suffice
  (no scipy, no complex square roots). The embedding space is the model's own CLIP export
  or, for unconditional or pixel-space models, the one named by ``eval.clip_export``
  (images are resized to that CLIP's resolution first, as FID resizes to 299 px).
- **Bits per dimension** on val images for the ``vdm`` objective (its variational bound).
- The **reference**, computed once: real val images against their own captions, and the FD
  between two disjoint (interleaved) halves of val: the order of magnitude a perfect
  generator reaches at that sample size (FD is biased upwards at small sample sizes).

Generation follows the pipeline exactly: noise from a CPU generator per image seed, the
objective's flow velocity, guidance in one batched forward, the configured sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import save_image

from stages.clip.export import LoadedCLIP, TextCondition, load_clip
from stages.common.data import iter_split
from stages.common.export import ExportError
from stages.vae.export import IdentityAutoencoder, LoadedVAE, load_vae

from .objectives import VDM, Objective
from .samplers import SAMPLERS, RowNoise, SamplerConfig, cfg_velocity, seeded_noise

Autoencoder = LoadedVAE | IdentityAutoencoder


@dataclass(frozen=True)
class EvalConfig:
    prompts: tuple[str, ...] = ()  # grid rows; empty: distinct val captions spread over val
    grid_rows: int = 4  # rows taken from val when ``prompts`` is empty
    grid_seeds: int = 4  # columns per weights: EMA on the left half, raw on the right
    num_images: int = 64  # generated for the CLIP score and FD, for val captions
    max_real: int = 2048  # real val images embedded for the reference statistics
    batch_size: int = 64
    seed: int = 1234  # image i uses seed + i; the grid uses seed + column
    # The CLIP export whose image space the FD is measured in, for models without their own
    # (unconditional or pixel-space ones); "" = the model's own CLIP export, or no FD.
    clip_export: str = ""
    bpd_images: int = 256  # val images for the vdm objective's bits per dimension


def spread(items: list[str], count: int) -> list[str]:
    """``count`` items evenly spaced over ``items`` (cycling when ``count`` is larger)."""
    return [items[(i * len(items)) // count % len(items)] for i in range(count)]


def psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix by eigendecomposition (negative noise clipped)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FD between Gaussians fitted to the rows of ``a`` (N, E) and ``b`` (M, E)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = psd_sqrt(cov_a)
    # tr sqrt(S_a S_b) = tr sqrt(S_a^1/2 S_b S_a^1/2): same eigenvalues, symmetric PSD form.
    inner = root_a @ cov_b @ root_a
    trace_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return float(fd.clamp(min=0))


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """100 * mean over pairs of max(cos, 0); embeddings (N, E) L2-normalised."""
    return float(100 * (image_emb * text_emb).sum(-1).clamp(min=0).mean())


def r_precision(
    image_emb: torch.Tensor,
    texts: list[str],
    embed_texts: Any,
    seed: int,
    candidates: int = 100,
) -> float:
    """R-precision (Xu et al. 2018, AttnGAN): the share of images whose own text ranks first
    among itself and ``candidates - 1`` other distinct texts of ``texts`` drawn at random.

    image_emb (N, E) normalised, ``texts`` the N prompts they were generated from;
    ``embed_texts(list[str]) -> (M, E)`` normalised. With fewer distinct texts than
    ``candidates`` every other one is a candidate (so the chance level is 1 / pool size).
    """
    pool = list(dict.fromkeys(texts))
    pool_emb = embed_texts(pool).float().cpu()  # (P, E)
    where = {t: i for i, t in enumerate(pool)}
    others = min(candidates - 1, len(pool) - 1)
    generator = torch.Generator().manual_seed(seed)
    hits = 0
    for emb, text in zip(image_emb.float().cpu(), texts):
        own = where[text]
        draw = torch.randperm(len(pool) - 1, generator=generator)[:others]
        draw = draw + (draw >= own).long()  # skip the own text
        scores = pool_emb @ emb  # (P,)
        hits += int(bool(others == 0 or scores[own] > scores[draw].max()))
    return hits / max(len(texts), 1)


class ImageEmbedder:
    """A CLIP export's image tower as an embedding of [-1, 1] images of any size.

    A latent-input tower needs the VAE export it was trained on (found next to the CLIP
    export, ``<preset>/vae/export``, and checked against the recorded hash)."""

    def __init__(self, clip: LoadedCLIP, vae: Autoencoder):
        self.clip, self.vae = clip, vae
        latent = clip.image_input == "latent"
        self.resolution = clip.image_size * (vae.factor if latent else 1)

    @classmethod
    def from_export(cls, folder: Path, device: torch.device) -> ImageEmbedder:
        folder = Path(folder)
        clip = load_clip(folder, device=device)
        if clip.image_input != "latent":
            return cls(clip, IdentityAutoencoder(device))
        vae_folder = folder.parent.parent / "vae" / "export"
        if not (vae_folder / "manifest.json").exists():
            raise ExportError(
                f"{folder} embeds VAE latents, but there is no VAE export at {vae_folder}"
            )
        vae = load_vae(vae_folder, device=device)
        return cls(load_clip(folder, device=device, vae_hash=vae.hash), vae)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, E) L2-normalised, on the CPU."""
        images = images.float().clamp(-1, 1)
        if images.shape[-1] != self.resolution:
            images = F.interpolate(
                images, size=(self.resolution, self.resolution), mode="bilinear", antialias=True
            )
        if self.clip.image_input == "latent":
            mean, _ = self.vae.encode(images)  # as the CLIP stage: the posterior mean
            return self.clip.embed_images(self.vae.normalize(mean)).cpu()
        return self.clip.embed_images(images).cpu()

    @torch.no_grad()
    def embed_samples(self, samples: torch.Tensor, autoencoder: Autoencoder) -> torch.Tensor:
        """(B, E) for a model's samples (normalised latents of ``autoencoder``, or pixels).

        A latent tower trained on this very VAE at this latent side embeds them as they
        are, as the CLIP stage embedded its training latents; otherwise they are decoded.
        """
        latent = self.clip.image_input == "latent"
        if (
            latent
            and self.vae.hash == autoencoder.hash
            and samples.shape[-1] == self.clip.image_size
        ):
            return self.clip.embed_images(samples).cpu()
        return self(autoencoder.decode(autoencoder.denormalize(samples.to(autoencoder.device))))


class Evaluator:
    """Fixed prompts, seeds and real statistics for one run; models are passed per call.

    ``text`` is the model's CLIP export (None: unconditional); ``embedder`` the image space
    of the FD (None: no FD); ``objective`` turns the network into a flow velocity.
    """

    def __init__(
        self,
        autoencoder: Autoencoder,
        text: LoadedCLIP | None,
        embedder: ImageEmbedder | None,
        val_dir: Path,
        resolution: int,
        cfg: EvalConfig,
        sampling: SamplerConfig,
        objective: Objective,
    ):
        self.autoencoder, self.text, self.embedder = autoencoder, text, embedder
        self.cfg, self.sampling, self.objective = cfg, sampling, objective
        side = resolution // autoencoder.factor
        self.latent_shape = (autoencoder.channels, side, side)
        real, captions, pixels = [], [], []
        limit = max(cfg.max_real, cfg.bpd_images if isinstance(objective, VDM) else 0)
        for batch in iter_split(val_dir, cfg.batch_size, resolution):
            if embedder is not None and len(captions) < cfg.max_real:
                real.append(embedder(batch["image"]))
            if isinstance(objective, VDM):
                pixels.append(batch["image"])
            captions += batch["caption"]
            if len(captions) >= limit:
                break
        if not captions:
            raise ValueError(f"{val_dir}: no readable validation sample to evaluate against")
        self.real = torch.cat(real)[: cfg.max_real] if real else None
        self.real_captions = captions[: cfg.max_real]
        self.bpd_images = torch.cat(pixels)[: cfg.bpd_images] if pixels else None
        # Captions to generate for: spread evenly over val (shards are often ordered by
        # category), repeating captions when val is smaller than ``num_images``.
        self.captions = spread(captions, cfg.num_images)
        self.grid_prompts = list(cfg.prompts) or spread(
            list(dict.fromkeys(captions)), cfg.grid_rows
        )
        if text is None:
            self.grid_prompts = [""] * cfg.grid_rows  # rows of seeds, no prompt

    def _embed_texts(self, captions: list[str]) -> torch.Tensor:
        assert self.embedder is not None
        clip = self.embedder.clip
        return torch.cat(
            [
                clip.embed_texts(captions[i : i + self.cfg.batch_size]).cpu()
                for i in range(0, len(captions), self.cfg.batch_size)
            ]
        )

    @torch.no_grad()
    def reference(self) -> dict[str, float]:
        """Real val images vs their captions, and FD between two disjoint halves of val.

        The halves interleave (even / odd samples): shards are often ordered by category
        or style, and first-half-vs-second-half would measure that order, not noise.
        """
        if self.real is None:
            return {}
        out = {}
        if self.text is not None:
            texts = self._embed_texts(self.real_captions)
            out["ref_clip_score"] = clip_score(self.real, texts)
        even, odd = self.real[0::2], self.real[1::2]
        if len(odd) >= 2:
            out["ref_fd_halves"] = frechet_distance(even[: len(odd)], odd)
        return out

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (or pixels) -> images (B, 3, H, W) in [-1, 1] (not clamped)."""
        ae = self.autoencoder
        return ae.decode(ae.denormalize(latents.to(ae.device)))

    @torch.no_grad()
    def generate(
        self, model: nn.Module, captions: list[str], seeds: list[int], schedule: Any = None
    ) -> torch.Tensor:
        """Model-space samples (B, C, h, w), image i from ``seeds[i]`` (captions ignored
        by an unconditional model)."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        out = []
        s = self.sampling
        velocity_model = self.objective.velocity(model, schedule, s.clip_x0)
        grid = (schedule or self.objective.schedule).grid(s.steps, s.shift, device)
        for i in range(0, len(seeds), self.cfg.batch_size):
            chunk_seeds = seeds[i : i + self.cfg.batch_size]
            cond: TextCondition | None = None
            null = None
            if self.text is not None:
                cond = self.text.encode_text(captions[i : i + len(chunk_seeds)]).to(device)
                null = self.text.null.to(device)
            velocity = cfg_velocity(velocity_model, cond, null, s.cfg_scale, s.cfg_interval)
            noise = seeded_noise(self.latent_shape, chunk_seeds).to(device)
            sampler = SAMPLERS[s.sampler]
            out.append(sampler(velocity, noise, grid, RowNoise(chunk_seeds), s.eta))
        model.train(was_training)
        return torch.cat(out)

    @torch.no_grad()
    def metrics(self, model: nn.Module, schedule: Any = None) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.embedder is not None:
            seeds = [self.cfg.seed + i for i in range(len(self.captions))]
            latents = self.generate(model, self.captions, seeds, schedule)
            generated = self.embedder.embed_samples(latents.float(), self.autoencoder)
            if self.text is not None:
                out["clip_score"] = clip_score(generated, self._embed_texts(self.captions))
                out["r_precision"] = r_precision(
                    generated, self.captions, self._embed_texts, self.cfg.seed
                )
            assert self.real is not None
            out["fd"] = frechet_distance(generated, self.real)
        if self.bpd_images is not None:
            out["bpd"] = self.bits_per_dim(model, schedule)
        return out

    @torch.no_grad()
    def bits_per_dim(self, model: nn.Module, schedule: Any = None) -> float:
        """The vdm bound on the fixed val images (unconditional: cond None), fixed noise."""
        assert self.bpd_images is not None
        device = next(model.parameters()).device
        generator = torch.Generator(device).manual_seed(self.cfg.seed)
        total, count = 0.0, 0
        for i in range(0, len(self.bpd_images), self.cfg.batch_size):
            x0 = self.bpd_images[i : i + self.cfg.batch_size].to(device)
            cond = None
            if self.text is not None:  # the unconditional branch: the bound of p(x)
                cond = self.text.null.to(device).expand(len(x0))
            bpd = self.objective.bits_per_dim(model, x0, cond, schedule, generator)
            total, count = total + bpd * len(x0), count + len(x0)
        return total / count

    @torch.no_grad()
    def grid(self, models: dict[str, nn.Module], path: Path, schedules: dict | None = None):
        """Rows = prompts; columns = ``grid_seeds`` seeds per model, models left to right."""
        rows, seeds = self.grid_prompts, self.cfg.grid_seeds
        captions = [p for p in rows for _ in range(seeds)]
        if self.text is None:  # unconditional: every cell its own seed
            seed_list = [self.cfg.seed + j for j in range(len(rows) * seeds)]
        else:
            seed_list = [self.cfg.seed + j for _ in rows for j in range(seeds)]
        per_model = []
        for name, model in models.items():
            schedule = (schedules or {}).get(name)
            images = self.decode(self.generate(model, captions, seed_list, schedule)).cpu()
            per_model.append(images.view(len(rows), seeds, *images.shape[1:]))
        grid = torch.cat(per_model, dim=1).flatten(0, 1)  # (rows * models * seeds, 3, H, W)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image((grid.clamp(-1, 1) + 1) / 2, path, nrow=seeds * len(models), padding=1)
        (path.with_suffix(".txt")).write_text(
            f"rows (prompts): {rows}\ncolumns: {seeds} seeds each for {list(models)}\n"
        )
        return path


def describe(metrics: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )
