"""Does bf16 sampling change the images? fp32 vs bf16 autocast on a trained export.

A precision change is half speed, half quality; ``make bench`` measures the speed with
random weights, this measures the quality on trained ones (so it is not part of
``make bench``: it needs the exports of a finished run).

    .venv/bin/python -m bench.precision --runs runs --preset tiny --data data/emoji-32

Same prompts (val captions), same seeds, the export's own sampling settings, and the UNet
stage's evaluator; sampling runs under ``torch.autocast(device, bf16)`` exactly as the
pipeline runs it, the VAE decode and the CLIP embedding stay fp32. Printed per precision:
CLIP score, FD to real val, seconds; and the mean absolute difference of the decoded images
(pixels in [0, 255]) between the two. The noise floor is fp32 with a second set of seeds:
a bf16 change smaller than that is below what the metrics can see at this sample size.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch

from pipeline.load import ExportFolders, load_models
from stages.unet.evaluate import (
    EvalConfig,
    Evaluator,
    ImageEmbedder,
    clip_score,
    frechet_distance,
)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__)
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--data", type=Path, required=True, help="dataset with a val split")
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()

    device = torch.device("cpu")
    models = load_models(ExportFolders.from_runs(args.runs, args.preset), device)
    if models.clip is None:
        raise SystemExit("bench.precision scores prompts: it needs a text-conditional export")
    unet = models.unet
    evaluator = Evaluator(
        models.vae,
        models.clip,
        ImageEmbedder(models.clip, models.vae),
        args.data / "val",
        unet.resolution,
        EvalConfig(num_images=args.images, max_real=2048),
        unet.sampling,
        unet.objective,
    )
    captions = evaluator.captions
    assert evaluator.real is not None
    texts = evaluator._embed_texts(captions)
    print(f"{args.preset}: {len(captions)} images, {unet.sampling}, torch {torch.__version__}")

    def run(dtype: torch.dtype, first_seed: int) -> torch.Tensor:
        seeds = [first_seed + i for i in range(len(captions))]
        autocast = (
            contextlib.nullcontext()
            if dtype == torch.float32
            else torch.autocast(device.type, dtype=dtype)
        )
        start = time.perf_counter()
        with autocast:
            latents = evaluator.generate(unet.model, captions, seeds).float()
        seconds = time.perf_counter() - start
        embedded = evaluator.embedder.embed_samples(latents, models.vae)  # type: ignore[union-attr]
        name = f"{str(dtype).removeprefix('torch.')}, seeds {first_seed}+"
        score = clip_score(embedded, texts)
        fd = frechet_distance(embedded, evaluator.real)  # type: ignore[arg-type]
        print(f"  {name:<24} CLIP score {score:6.2f}  FD {fd:.4f}  {seconds:7.1f} s sampling")
        return latents

    seed = evaluator.cfg.seed
    images = {}
    for dtype in (torch.float32, torch.bfloat16):
        latents = run(dtype, seed)
        images[dtype] = models.vae.decode(models.vae.denormalize(latents)).clamp(-1, 1)
    run(torch.float32, seed + 10_000)  # the noise floor: other seeds, same precision
    diff = (images[torch.float32] - images[torch.bfloat16]).abs().mean() * 127.5
    print(f"  mean |fp32 - bf16| of decoded images: {diff:.2f} of 255")


if __name__ == "__main__":
    main()
