"""``python -m pipeline evaluate``: measure the three exports, stage by stage, as a user has them.

- **vae**: reconstructions of the val split: L1, PSNR, SSIM and CIELAB delta E, overall and per
  data style; how many of the probe's coloured images keep their named colour; a grid of the
  worst reconstructions.
- **clip**: retrieval R@1 / R@5 over val (both ways; identical captions are one class) and the
  attribute x object probe (``stages.common.probe``).
- **unet** (text to image, through this pipeline, PNG pixels as a user gets them), on three
  prompt sets: val **captions** as written, their **short** names as people type them
  (``"red heart"``), and the **probe** prompts. CLIP score, FD against real val images,
  R-precision (own prompt vs 99 others), seconds per image of the generation, and for the
  probe the shares of images showing the named colour, object and both (judged without a
  learned model). ``measure_prompts`` is the one measurement of a prompt set; the sampling
  sweep (``pipeline/sweep.py``) calls it per setting.

Each stage's numbers go to ``<run>/<stage>/eval/metrics.json`` (grids beside them) and are
printed as one table.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms.functional import pil_to_tensor

from stages.clip.export import LoadedCLIP, load_clip
from stages.clip.stage import retrieval_metrics
from stages.common.captions import short_name
from stages.common.data import iter_split
from stages.common.files import write_json_atomic
from stages.common.probe import (
    ColourShapeJudge,
    ProbeConfig,
    Reference,
    find_references,
    image_to_prompt_r1,
    judge_rates,
    text_probe,
    word_sensitivity,
)
from stages.unet.evaluate import (
    ImageEmbedder,
    clip_score,
    frechet_distance,
    r_precision,
    spread,
)
from stages.vae.evaluate import colours_kept, reconstruction_report, save_worst_grid
from stages.vae.export import LoadedVAE, load_vae

from .demo import labelled_grid
from .load import ExportFolders
from .text2image import Text2Image, resolve_device

STAGES = ("vae", "clip", "unet")


@dataclass(frozen=True)
class EvaluateSettings:
    data: Path  # the data folder with train/ (probe references) and val/
    resolution: int  # the data resolution the exports were trained at
    num_images: int = 128  # images generated for each of the caption and short sets
    probe_seeds: int = 4  # images per probe prompt
    max_real: int = 2048  # real val images for the FD reference
    batch_size: int = 64
    seed: int = 1234  # image i of a set uses seed + i
    steps: int | None = None  # sampling settings; None: the UNet export's defaults
    cfg_scale: float | None = None
    sampler: str | None = None
    shift: float | None = None
    cfg_interval: tuple[float, float] | None = None


def _val_batches(settings: EvaluateSettings):
    return iter_split(settings.data / "val", settings.batch_size, settings.resolution)


def _to_tensor(images) -> torch.Tensor:
    """PIL images (the PNG pixels) -> (B, 3, H, W) in [-1, 1]."""
    return torch.stack([pil_to_tensor(im).float() / 127.5 - 1 for im in images])


@torch.no_grad()
def evaluate_vae(
    vae: LoadedVAE, settings: EvaluateSettings, references: list[Reference], out: Path
) -> dict[str, Any]:
    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        mean, _ = vae.encode(x.to(vae.device))
        return vae.decode(mean)

    metrics, worst = reconstruction_report(
        lambda x: (reconstruct(x), {}), _val_batches(settings), worst=8
    )
    if worst is not None:
        save_worst_grid(worst, out / "worst.png")
    if references:
        kept = colours_kept(reconstruct, references, ColourShapeJudge(references))
        metrics["probe_colours_kept"] = kept["probe_colours_kept"]
        metrics["probe_colours_lost"] = kept["lost"]
    return metrics


@torch.no_grad()
def evaluate_clip(
    clip: LoadedCLIP,
    embedder: ImageEmbedder,
    settings: EvaluateSettings,
    probe: ProbeConfig,
    references: list[Reference],
) -> dict[str, Any]:
    images, texts, labels = [], [], []
    classes: dict[str, int] = {}
    for batch in _val_batches(settings):
        images.append(embedder(batch["image"]))
        texts.append(clip.embed_texts(batch["caption"]).cpu())
        labels += [classes.setdefault(c, len(classes)) for c in batch["caption"]]
    metrics: dict[str, Any] = retrieval_metrics(
        torch.cat(images), torch.cat(texts), torch.tensor(labels)
    )
    prompts = [p for p, _, _ in probe.prompts()]
    prompt_emb = clip.embed_texts(prompts).cpu()
    metrics.update(text_probe(prompt_emb, probe))
    if references:
        emb = embedder(torch.stack([r.image for r in references]))
        metrics["probe_i2t_r1"] = image_to_prompt_r1(emb, prompt_emb, references, probe)
    return metrics


def _generate(pipe: Text2Image, prompts: list[str], settings: EvaluateSettings, seeds: list[int]):
    """PIL images, image i from ``seeds[i]`` (batched by consecutive seed runs)."""
    images = []
    for start in range(0, len(prompts), settings.batch_size):
        chunk = prompts[start : start + settings.batch_size]
        first = seeds[start]
        if seeds[start : start + len(chunk)] != list(range(first, first + len(chunk))):
            raise ValueError("seeds of a batch must be consecutive")
        generated = pipe.generate(
            chunk,
            seed=first,
            steps=settings.steps,
            cfg_scale=settings.cfg_scale,
            sampler=settings.sampler,
            shift=settings.shift,
            cfg_interval=settings.cfg_interval,
        )
        images += [g.image for g in generated]
    return images


def real_embeddings(
    embedder: ImageEmbedder, settings: EvaluateSettings
) -> tuple[torch.Tensor, list[str]]:
    """(up to ``max_real`` val image embeddings (N, E), every val caption in order)."""
    real, captions = [], []
    for batch in _val_batches(settings):
        if len(captions) < settings.max_real:
            real.append(embedder(batch["image"]))
        captions += batch["caption"]
    return torch.cat(real)[: settings.max_real], captions


@torch.no_grad()
def measure_prompts(
    pipe: Text2Image,
    embedder: ImageEmbedder,
    prompts: list[str],
    seeds: list[int],
    real_emb: torch.Tensor,
    settings: EvaluateSettings,
) -> dict[str, float]:
    """CLIP score, R-precision and FD of the images of ``prompts`` (image i from
    ``seeds[i]``, consecutive), and the wall seconds per image of their generation alone
    (PNG pixels included, embedding excluded)."""
    clip = pipe.models.clip
    start = time.perf_counter()
    images = _generate(pipe, prompts, settings, seeds)
    seconds = (time.perf_counter() - start) / len(prompts)
    generated = embedder(_to_tensor(images))
    text_emb = torch.cat(
        [
            clip.embed_texts(prompts[i : i + settings.batch_size]).cpu()
            for i in range(0, len(prompts), settings.batch_size)
        ]
    )
    return {
        "clip_score": clip_score(generated, text_emb),
        "r_precision": r_precision(
            generated, prompts, lambda t: clip.embed_texts(t).cpu(), settings.seed
        ),
        "fd": frechet_distance(generated, real_emb),
        "seconds_per_image": seconds,
    }


@torch.no_grad()
def evaluate_text_to_image(
    pipe: Text2Image,
    embedder: ImageEmbedder,
    settings: EvaluateSettings,
    probe: ProbeConfig,
    references: list[Reference],
    out: Path,
) -> dict[str, Any]:
    clip = pipe.models.clip
    real_emb, captions = real_embeddings(embedder, settings)
    chosen = spread(captions, settings.num_images)
    seeds = [settings.seed + i for i in range(len(chosen))]
    metrics: dict[str, Any] = {}
    for name, prompts in (("captions", chosen), ("short", [short_name(c) for c in chosen])):
        metrics[name] = measure_prompts(pipe, embedder, prompts, seeds, real_emb, settings)
    rows = probe.prompts()
    prompts = [p for p, _, _ in rows for _ in range(settings.probe_seeds)]
    seeds = [settings.seed + j for _ in rows for j in range(settings.probe_seeds)]
    pil = []
    for i in range(len(rows)):  # one call per prompt: seeds seed .. seed + probe_seeds - 1
        part = slice(i * settings.probe_seeds, (i + 1) * settings.probe_seeds)
        pil += _generate(pipe, prompts[part], settings, seeds[part])
    images = _to_tensor(pil)
    generated = embedder(images)
    probe_metrics: dict[str, Any] = {
        "clip_score": clip_score(generated, clip.embed_texts(prompts).cpu()),
    }
    if references:
        attributes = [a for _, a, _ in rows for _ in range(settings.probe_seeds)]
        objects = [o for _, _, o in rows for _ in range(settings.probe_seeds)]
        probe_metrics.update(judge_rates(ColourShapeJudge(references), images, attributes, objects))
    unet = pipe.models.unet
    sensitivity = word_sensitivity(
        unet.velocity(), clip.encode_text([p for p, _, _ in rows]), probe, unet.latent_shape
    )
    probe_metrics.update(sensitivity)
    metrics["probe"] = probe_metrics
    n = settings.probe_seeds
    grid = labelled_grid([(p, pil[i * n : (i + 1) * n]) for i, (p, _, _) in enumerate(rows)])
    out.mkdir(parents=True, exist_ok=True)
    grid.save(out / "probe.png")
    return metrics


def evaluate(
    folders: ExportFolders,
    settings: EvaluateSettings,
    stages: tuple[str, ...] = STAGES,
    probe: ProbeConfig | None = None,
    device: str = "auto",
    precision: str = "auto",
) -> dict[str, dict[str, Any]]:
    """Evaluate ``stages``, loading only the exports each needs (the VAE alone for ``vae``;
    the VAE and CLIP for ``clip``; all three for ``unet``). Each stage's metrics are written
    to ``<run>/<stage>/eval/metrics.json`` beside its export. Returns {stage: metrics}."""
    probe = probe or ProbeConfig()
    references = find_references(settings.data / "train", probe, settings.resolution)
    target = resolve_device(device)
    results: dict[str, dict[str, Any]] = {}
    vae = load_vae(folders.vae, device=target) if {"vae", "clip"} & set(stages) else None
    for stage in stages:
        out = Path(getattr(folders, stage)).parent / "eval"
        if stage == "vae":
            assert vae is not None
            results[stage] = evaluate_vae(vae, settings, references, out)
        elif stage == "clip":
            assert vae is not None
            clip = load_clip(folders.clip, device=target, vae_hash=vae.hash)
            embedder = ImageEmbedder(clip, vae)
            results[stage] = evaluate_clip(clip, embedder, settings, probe, references)
        else:
            pipe = Text2Image.from_exports(folders, device, precision)
            if pipe.models.clip is None or pipe.models.vae.hash == "identity":
                raise ValueError("pipeline evaluate measures latent text-to-image models")
            embedder = ImageEmbedder(pipe.models.clip, pipe.models.vae)
            results[stage] = evaluate_text_to_image(
                pipe, embedder, settings, probe, references, out
            )
        out.mkdir(parents=True, exist_ok=True)
        record = {"settings": _jsonable(settings), "references": len(references)}
        write_json_atomic(out / "metrics.json", {**record, "metrics": results[stage]})
    return results


def _jsonable(settings: EvaluateSettings) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(settings).items()}


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Rows ``stage  metric  value`` (nested sets flattened as ``set.metric``)."""
    lines = [f"{'stage':<6} {'metric':<40} value"]
    for stage, metrics in results.items():
        flat: dict[str, Any] = {}
        for key, value in metrics.items():
            if (
                isinstance(value, dict)
                and value
                and all(isinstance(v, float) for v in value.values())
            ):
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        for key, value in flat.items():
            shown = f"{value:.4f}" if isinstance(value, float) else json.dumps(value)
            lines.append(f"{stage:<6} {key:<40} {shown}")
    return "\n".join(lines)
