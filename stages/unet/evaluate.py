"""Evaluation of the UNet on fixed val prompts and seeds: a sample grid and two CLIP numbers.

- **CLIP score** (Hessel et al. 2021, w = 100): 100 * mean(max(cos(image, caption), 0)) with
  the CLIP export's image and text towers, over images generated for val captions.
- **Fréchet distance** between the image-tower embeddings of generated and of real val
  images (FID's formula in the CLIP export's embedding space):
      FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)
  The trace term uses the symmetric PSD form, so two ``eigh`` calls in float64 suffice
  (no scipy, no complex square roots).
- The **reference**, computed once: real val images against their own captions, and the FD
  between two disjoint (interleaved) halves of val: the order of magnitude a perfect
  generator reaches at that sample size (FD is biased upwards at small sample sizes).

Generation follows the pipeline exactly: noise from a CPU generator per image seed, guided
velocity in one batched forward, the configured sampler and shift. A latent image tower
embeds the generated normalised latents directly; a pixel tower gets decoded images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.utils import save_image

from stages.clip.export import LoadedCLIP, TextCondition
from stages.common.data import iter_split
from stages.vae.export import LoadedVAE

from .flow import SAMPLERS, SamplingConfig, cfg_velocity, seeded_noise


@dataclass(frozen=True)
class EvalConfig:
    prompts: tuple[str, ...] = ()  # grid rows; empty: distinct val captions spread over val
    grid_rows: int = 4  # rows taken from val when ``prompts`` is empty
    grid_seeds: int = 4  # columns per weights: EMA on the left half, raw on the right
    num_images: int = 64  # generated for the CLIP score and FD, for val captions
    max_real: int = 2048  # real val images embedded for the reference statistics
    batch_size: int = 64
    seed: int = 1234  # image i uses seed + i; the grid uses seed + column


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


class Evaluator:
    """Fixed prompts, seeds and real statistics for one run; models are passed per call."""

    def __init__(
        self,
        vae: LoadedVAE,
        clip: LoadedCLIP,
        val_dir: Path,
        resolution: int,
        cfg: EvalConfig,
        sampling: SamplingConfig,
    ):
        self.vae, self.clip, self.cfg, self.sampling = vae, clip, cfg, sampling
        side = resolution // vae.factor
        self.latent_shape = (vae.channels, side, side)
        real, captions = [], []
        for batch in iter_split(val_dir, cfg.batch_size, resolution):
            real.append(self._embed_pixels(batch["image"]))
            captions += batch["caption"]
            if len(captions) >= cfg.max_real:
                break
        if not captions:
            raise ValueError(f"{val_dir}: no readable validation sample to evaluate against")
        self.real = torch.cat(real)[: cfg.max_real]
        self.real_captions = captions[: cfg.max_real]
        # Captions to generate for: spread evenly over val (shards are often ordered by
        # category), repeating captions when val is smaller than ``num_images``.
        self.captions = spread(captions, cfg.num_images)
        self.grid_prompts = list(cfg.prompts) or spread(
            list(dict.fromkeys(captions)), cfg.grid_rows
        )

    # ---------------------------------------------------------------- embeddings

    @torch.no_grad()
    def _embed_pixels(self, images: torch.Tensor) -> torch.Tensor:
        if self.clip.image_input == "latent":
            mean, _ = self.vae.encode(images)  # as the CLIP stage: the posterior mean
            return self.clip.embed_images(self.vae.normalize(mean)).cpu()
        return self.clip.embed_images(images).cpu()

    @torch.no_grad()
    def _embed_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.clip.image_input == "latent":
            return self.clip.embed_images(latents).cpu()
        return self.clip.embed_images(self.decode(latents).clamp(-1, 1)).cpu()

    def _embed_texts(self, captions: list[str]) -> torch.Tensor:
        return torch.cat(
            [
                self.clip.embed_texts(captions[i : i + self.cfg.batch_size]).cpu()
                for i in range(0, len(captions), self.cfg.batch_size)
            ]
        )

    @torch.no_grad()
    def reference(self) -> dict[str, float]:
        """Real val images vs their captions, and FD between two disjoint halves of val.

        The halves interleave (even / odd samples): shards are often ordered by category
        or style, and first-half-vs-second-half would measure that order, not noise.
        """
        even, odd = self.real[0::2], self.real[1::2]
        out = {"ref_clip_score": clip_score(self.real, self._embed_texts(self.real_captions))}
        if len(odd) >= 2:
            out["ref_fd_halves"] = frechet_distance(even[: len(odd)], odd)
        return out

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images (B, 3, H, W) in [-1, 1] (not clamped)."""
        return self.vae.decode(self.vae.denormalize(latents.to(self.vae.device)))

    @torch.no_grad()
    def generate(self, model: nn.Module, captions: list[str], seeds: list[int]) -> torch.Tensor:
        """Normalised latents (B, C, h, w) for ``captions``, image i from ``seeds[i]``."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        out = []
        s = self.sampling
        for i in range(0, len(captions), self.cfg.batch_size):
            chunk = captions[i : i + self.cfg.batch_size]
            cond: TextCondition = self.clip.encode_text(chunk).to(device)
            velocity = cfg_velocity(model, cond, self.clip.null.to(device), s.cfg_scale)
            noise = seeded_noise(self.latent_shape, seeds[i : i + len(chunk)]).to(device)
            out.append(SAMPLERS[s.sampler](velocity, noise, s.steps, s.shift))
        model.train(was_training)
        return torch.cat(out)

    @torch.no_grad()
    def metrics(self, model: nn.Module) -> dict[str, float]:
        seeds = [self.cfg.seed + i for i in range(len(self.captions))]
        latents = self.generate(model, self.captions, seeds)
        generated = self._embed_latents(latents.float())
        return {
            "clip_score": clip_score(generated, self._embed_texts(self.captions)),
            "fd": frechet_distance(generated, self.real),
        }

    @torch.no_grad()
    def grid(self, models: dict[str, nn.Module], path: Path) -> Path:
        """Rows = prompts; columns = ``grid_seeds`` seeds per model, models left to right."""
        rows, seeds = self.grid_prompts, self.cfg.grid_seeds
        captions = [p for p in rows for _ in range(seeds)]
        seed_list = [self.cfg.seed + j for _ in rows for j in range(seeds)]
        per_model = []
        for model in models.values():
            images = self.decode(self.generate(model, captions, seed_list)).cpu()
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
