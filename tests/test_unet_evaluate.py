"""The UNet stage's evaluation: the Frechet distance and the CLIP score against their
closed forms, and an FD for an unconditional model in another CLIP export's image space."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from unet_runs import RES, config, finite, manifest, train_stage, val_lines

from stages.unet.evaluate import clip_score, frechet_distance

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_eval_clip_export_gives_an_fd_for_an_unconditional_model(
    pixel_shards, pixel_clips, tmp_path
):
    cfg = config(pixel_shards, "flow", val_every=2)
    # A 16 px CLIP for 8 px images: generated and real images are resized alike.
    cfg = replace(cfg, eval=replace(cfg.eval, clip_export=str(pixel_clips[2 * RES])))
    run = train_stage(cfg, tmp_path / "runs")
    val = val_lines(run)
    assert [x["step"] for x in val] == [2]
    assert finite(val[0]["fd"]) and val[0]["fd"] >= 0 and finite(val[0]["ref_fd_halves"])
    assert "clip_score" not in val[0]  # no text: no CLIP score
    assert manifest(run / "export")["upstream"] == {}  # the eval CLIP is no upstream
