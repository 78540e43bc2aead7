"""The bench's equal-config peers and its harness (speed itself is measured by `make bench`)."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package

from bench import harness, models, results  # noqa: E402
from bench.harness import Case, Row, Settings, compare  # noqa: E402
from bench.unet_train import build  # noqa: E402
from stages.unet.model import UNetModelConfig  # noqa: E402

TINY = UNetModelConfig(
    in_channels=4,
    context_dim=16,
    sample_size=8,
    base_channels=16,
    channel_mult=(1, 2),
    attention_resolutions=(4,),
    head_dim=8,
    ff_mult=2,
    groups=4,
)


@pytest.mark.parametrize("side", [32, 64])
def test_base_unet_peer_has_our_parameter_count(side):
    cfg = models.unet_config(side, "base")
    with torch.device("meta"):  # 190-230M parameters: shapes only, no memory
        ours, peer = models.our_unet(cfg), models.peer_unet(cfg)
    assert models.count(ours) > 100e6
    assert models.equal_parameters(ours, peer)


def test_vae_and_tiny_unet_peers_have_our_parameter_counts():
    with torch.device("meta"):
        vae_cfg = models.vae_config("base")
        assert models.equal_parameters(models.our_vae(vae_cfg), models.peer_vae(vae_cfg))
    cfg = models.unet_config(8, "tiny")
    ours, peer = models.our_unet(cfg), models.peer_unet(cfg)
    assert models.count(ours) == models.count(peer)
    heads = models.diffusers_unet_kwargs(cfg)["attention_head_dim"]
    assert heads == tuple(cfg.base_channels * m // cfg.head_dim for m in cfg.channel_mult)


def test_equal_parameters_rejects_a_different_model():
    wider = replace(TINY, base_channels=2 * TINY.base_channels)
    assert models.equal_parameters(models.our_unet(TINY), models.peer_unet(TINY))
    assert not models.equal_parameters(models.our_unet(TINY), models.peer_unet(wider))


def test_training_step_comparison_returns_a_ratio_and_memory(one_thread):
    makers = {impl: (lambda impl=impl: build(impl, TINY, 1, 6, "cpu")) for impl in ("ours", "peer")}
    totals, per_rep, mib = compare(makers, warmup=1, min_reps=2, max_reps=2, budget_s=0.0)
    assert {len(t) for t in totals.values()} == {2}
    assert per_rep == totals  # nothing extrapolated at scale 1
    ratio = Row(Case("unet_train", "tiny", {}, lambda impl: None), totals, per_rep).ratio
    pairs = [peer / ours for peer, ours in zip(per_rep["peer"], per_rep["ours"])]
    assert math.isfinite(ratio) and ratio == pytest.approx(sum(pairs) / 2)  # median of two
    for impl in ("ours", "peer"):
        assert mib[impl]["run"] >= 0 and mib[impl]["state"] > -50  # MiB; RSS may shrink a bit


def test_ratio_is_peer_time_over_ours_paired_by_repetition(monkeypatch):
    """On a fake clock the peer's step takes 3 s and ours 1 s: the ratio is exactly 3 (peer
    over ours), and of uneven repetitions it is the median of the pairs' quotients."""
    clock = {"now": 0.0}
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock["now"])

    def step(seconds: float):
        def work() -> None:
            clock["now"] += seconds

        return lambda: work

    totals, per_rep, _ = compare(
        {"ours": step(1.0), "peer": step(3.0)},
        warmup=1,
        min_reps=3,
        max_reps=3,
        measure_memory=False,
    )
    assert totals == {"ours": [1.0] * 3, "peer": [3.0] * 3}
    assert Row(Case("x", "x", {}, lambda impl: None), totals, per_rep).ratio == 3.0
    # Pairs (2/1, 9/1, 4/4): median 2; the ratio of medians would say 4, the mean 4.
    uneven = {"peer": [2.0, 9.0, 4.0], "ours": [1.0, 1.0, 4.0]}
    assert Row(Case("x", "x", {}, lambda impl: None), uneven, uneven).ratio == 2.0


def test_scaled_part_extrapolates_the_reported_time():
    calls = {"n": 0}

    def work() -> float:
        calls["n"] += 1
        return 1.0  # claims its scalable part took 1 s: 19 more of those are added

    _, per_rep, _ = compare(
        {"ours": lambda: work, "peer": lambda: work},
        warmup=0,
        min_reps=1,
        max_reps=1,
        scale=20.0,
        measure_memory=False,
    )
    assert calls["n"] == 2
    assert 19.0 <= per_rep["ours"][0] < 19.5 and 19.0 <= per_rep["peer"][0] < 19.5


def test_write_replaces_the_section_of_the_same_device_and_command(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(f"# Benchmarks\n\nhand-written findings\n\n{results.RUNS}\n")
    case = Case("vae", "VAE decode", {}, lambda impl: lambda: None)
    row = Row(case, {"ours": [1.0], "peer": [2.0]}, {"ours": [1.0], "peer": [2.0]})
    settings = Settings()
    for command in ("python -m bench", "python -m bench", "python -m bench --quick"):
        text = results.section(settings, command, (1.0, 1.0), [row], [], 3.0)
        results.write(text, path)
    content = path.read_text()
    assert "hand-written findings" in content
    assert content.count("### ") == 2  # the repeated command replaced its own section
    assert "**2.00x**" in content
