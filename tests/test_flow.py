"""Flow-matching maths: interpolation, target, samplers, shift, guidance, condition dropout."""

from __future__ import annotations

import pytest
import torch

from stages.clip.export import TextCondition
from stages.unet.flow import (
    FlowConfig,
    FlowMatching,
    cfg_velocity,
    euler_sample,
    heun_sample,
    seeded_noise,
    shift_time,
    time_grid,
)


def condition(batch: int, length: int = 5, width: int = 6, fill: float | None = None):
    tokens = (
        torch.randn(batch, length, width)
        if fill is None
        else torch.full((batch, length, width), fill)
    )
    mask = torch.ones(batch, length, dtype=torch.bool)
    return TextCondition(tokens, mask, tokens[:, 0].clone())


def test_interpolation_endpoints_and_target():
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.equal(FlowMatching.interpolate(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(FlowMatching.interpolate(x0, noise, torch.ones(3)), noise)
    t = torch.tensor([0.25, 0.5, 0.9])
    x_t = FlowMatching.interpolate(x0, noise, t)
    torch.testing.assert_close(x_t[1], 0.5 * x0[1] + 0.5 * noise[1])
    # The target is the time derivative of x_t: a finite difference along t agrees.
    eps = 1e-3
    derivative = (FlowMatching.interpolate(x0, noise, t + eps) - x_t) / eps
    torch.testing.assert_close(derivative, FlowMatching.target(x0, noise), atol=1e-3, rtol=1e-3)


def test_timesteps_are_continuous_in_unit_interval():
    for kind in ("logit_normal", "uniform"):
        flow = FlowMatching(FlowConfig(timesteps=kind))
        t = flow.sample_t(4096, torch.device("cpu"), torch.Generator().manual_seed(0))
        assert t.min() > 0 and t.max() < 1
        assert t.unique().numel() > 4000  # continuous: no grid of timesteps
    # logit-normal(0, 1) is symmetric about 1/2 and concentrated in the middle.
    t = FlowMatching(FlowConfig()).sample_t(
        20000, torch.device("cpu"), torch.Generator().manual_seed(1)
    )
    assert abs(t.mean().item() - 0.5) < 0.01
    assert ((t > 0.25) & (t < 0.75)).float().mean() > 0.6


def test_euler_is_exact_on_a_constant_field():
    noise, c = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for shift in (1.0, 3.0):
        x0 = euler_sample(lambda x, t: c, noise, steps=7, shift=shift)
        torch.testing.assert_close(x0, noise - c)


def test_heun_is_exact_on_a_field_linear_in_t():
    a, b, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    # dx/dt = a + b t  =>  x(0) = x(1) - a - b / 2
    for shift in (1.0, 2.5):
        x0 = heun_sample(lambda x, t: a + b * t.view(-1, 1, 1, 1), noise, steps=3, shift=shift)
        torch.testing.assert_close(x0, noise - a - b / 2)
    # Euler is not exact on that field: the test can tell the two apart.
    x0 = euler_sample(lambda x, t: a + b * t.view(-1, 1, 1, 1), noise, steps=3)
    assert not torch.allclose(x0, noise - a - b / 2)


def test_samplers_evaluate_on_the_shifted_grid():
    seen = []
    euler_sample(
        lambda x, t: seen.append(t[0].item()) or torch.zeros_like(x), torch.zeros(1, 1), 4, 3.0
    )
    expected = time_grid(4, 3.0)[:-1].tolist()
    assert seen == pytest.approx(expected)
    assert seen[0] == pytest.approx(1.0)


def test_shift_keeps_endpoints_and_is_monotone():
    t = torch.linspace(0, 1, 101)
    for shift in (0.5, 1.0, 3.0):
        s = shift_time(t, shift)
        assert s[0].item() == 0.0 and s[-1].item() == pytest.approx(1.0)
        assert torch.all(s[1:] > s[:-1])
    assert torch.all(shift_time(t[1:-1], 3.0) > t[1:-1])  # more time spent near noise
    torch.testing.assert_close(shift_time(t, 1.0), t)
    with pytest.raises(ValueError, match="shift"):
        shift_time(t, 0.0)


class CountingModel:
    """v = x * (1 + mean pooled): depends on the condition, counts forwards."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t, cond):
        self.calls += 1
        return x * (1 + cond.pooled.mean(dim=1)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1)


def test_guidance_scales_and_one_batched_forward():
    model = CountingModel()
    cond, null = condition(3, fill=2.0), condition(1, fill=-1.0)
    x, t = torch.randn(3, 2, 4, 4), torch.full((3,), 0.4)
    v_cond = model(x, t, cond)
    v_uncond = model(x, t, null.expand(3))
    model.calls = 0
    torch.testing.assert_close(cfg_velocity(model, cond, null, 1.0)(x, t), v_cond)
    torch.testing.assert_close(cfg_velocity(model, cond, null, 0.0)(x, t), v_uncond)
    torch.testing.assert_close(
        cfg_velocity(model, cond, null, 4.0)(x, t), v_uncond + 4.0 * (v_cond - v_uncond)
    )
    assert model.calls == 3  # one forward per guided evaluation
    model.calls = 0
    euler_sample(cfg_velocity(model, cond, null, 5.0), x, steps=6)
    assert model.calls == 6


def test_condition_dropout_rate_and_null_rows():
    flow = FlowMatching(FlowConfig(cond_dropout=0.1))
    cond, null = (
        condition(20000, length=2, width=2, fill=1.0),
        condition(1, length=2, width=2, fill=0.0),
    )
    null.mask[0, 1] = False
    dropped_cond, dropped = flow.drop_condition(cond, null, torch.Generator().manual_seed(0))
    rate = dropped.float().mean().item()
    assert abs(rate - 0.1) < 0.01  # 20000 draws: std 0.002
    assert torch.all(dropped_cond.tokens[dropped] == 0) and torch.all(
        dropped_cond.tokens[~dropped] == 1
    )
    assert torch.all(~dropped_cond.mask[dropped][:, 1]) and torch.all(dropped_cond.mask[~dropped])
    none = FlowMatching(FlowConfig(cond_dropout=0.0)).drop_condition(cond, null)[1]
    assert not none.any()


def test_loss_is_mse_to_the_velocity():
    flow = FlowMatching(FlowConfig(cond_dropout=0.0))
    x0 = torch.randn(4, 2, 3, 3)
    gen = torch.Generator().manual_seed(3)
    perfect = {}

    def oracle(x_t, t, cond):  # recovers v from x_t given the x0 it was built from
        perfect["v"] = (x_t - x0) / t.view(-1, 1, 1, 1)
        return perfect["v"]

    out = flow.loss(oracle, x0, condition(4), condition(1), gen)
    assert out["loss"].item() < 1e-8
    out = flow.loss(lambda x, t, c: torch.zeros_like(x), x0, condition(4), condition(1), gen)
    assert out["loss"].item() > 0.5


def test_seeded_noise_depends_on_the_seed_only():
    a = seeded_noise((2, 3, 3), [5, 6, 7])
    b = seeded_noise((2, 3, 3), [7])
    torch.testing.assert_close(a[2:], b)
    assert not torch.allclose(a[0], a[1])
