"""Noise schedules against closed forms: DDPM's betas and alpha-bar, the flow-time tables and
grids, and VDM's learned monotone gamma (its derivative, its inverse, its grid)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stages.unet.schedules import (
    DiscreteVP,
    FlowSchedule,
    LearnedSchedule,
    ddpm_betas,
    flow_time,
    shift_time,
)

# ------------------------------------------------------------------ DiscreteVP


def test_linear_alpha_bar_endpoints():
    vp = DiscreteVP("linear")
    assert vp.alpha_bar.shape == (1001,) and vp.alpha_bar.dtype == torch.float64
    assert vp.alpha_bar[0].item() == 1.0
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]  # linspace, by hand
    expected = math.prod(1 - b for b in betas)
    assert vp.alpha_bar[-1].item() == pytest.approx(expected, rel=1e-9)
    assert vp.alpha_bar[-1].item() == pytest.approx(4.0358e-5, rel=1e-4)
    torch.testing.assert_close(vp.betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    # alpha_bar_k / alpha_bar_{k-1} = 1 - beta_k: the chain's one-step factor.
    torch.testing.assert_close(vp.alpha_bar[1:] / vp.alpha_bar[:-1], 1 - vp.betas)


def test_cosine_alpha_bar_is_the_improved_ddpm_curve():
    vp = DiscreteVP("cosine")
    s = 0.008
    u = torch.arange(1001, dtype=torch.float64) / 1000
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    clipped = vp.betas == 0.999
    # The clip binds at the last step only (f(1) = 0 would give beta = 1).
    assert clipped.nonzero().flatten().tolist() == [999]
    torch.testing.assert_close(vp.alpha_bar[:-1], f[:-1] / f[0], atol=1e-12, rtol=1e-9)
    assert vp.alpha_bar[-1].item() == pytest.approx(vp.alpha_bar[-2].item() * 0.001)
    assert vp.alpha_bar[0].item() == 1.0


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_betas_and_tau_table(kind):
    vp = DiscreteVP(kind)
    assert torch.all((vp.betas > 0) & (vp.betas < 1))
    assert torch.all(vp.alpha_bar[1:] < vp.alpha_bar[:-1])  # strictly decreasing
    assert vp.tau[0].item() == 0.0
    assert torch.all(vp.tau[1:] > vp.tau[:-1])  # increasing flow time
    assert vp.tau[-1] < 1
    # tau = sigma / (alpha + sigma) with alpha^2 + sigma^2 = 1.
    alpha, sigma = vp.alpha_bar.sqrt(), (1 - vp.alpha_bar).sqrt()
    torch.testing.assert_close(vp.tau, sigma / (alpha + sigma))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_vp_alpha_sigma_is_variance_preserving_and_indexed_by_k(kind):
    vp = DiscreteVP(kind)
    k = torch.tensor([1, 2, 17, 500, 999, 1000])
    alpha, sigma = vp.alpha_sigma(k.float() / 1000)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(6))
    torch.testing.assert_close(alpha.double() ** 2, vp.alpha_bar[k], atol=1e-6, rtol=1e-5)
    assert alpha.dtype == torch.float32


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_full_and_strided_grids(kind):
    T = 1000
    vp = DiscreteVP(kind, T)
    full = vp.grid(T)
    assert full.shape == (T + 1,)
    assert full[0].item() == pytest.approx(vp.tau[T].item())
    assert full[-1].item() == 0.0
    assert torch.all(full[1:] < full[:-1])
    torch.testing.assert_close(full, vp.tau.flip(0).float())  # every step of the chain
    # Strided (DDIM): 50 steps of 20, trailing: k = 1000, 980, ..., 20, then tau = 0.
    strided = vp.grid(50)
    assert strided.shape == (51,) and strided[-1].item() == 0.0
    assert torch.all(strided[1:] < strided[:-1])
    ks = torch.arange(1000, 0, -20)
    torch.testing.assert_close(strided[:-1], vp.tau[ks].float())
    # model_time maps the grid back to u = k / T exactly.
    torch.testing.assert_close(vp.model_time(strided[:-1]), ks.float() / T, atol=0, rtol=0)
    torch.testing.assert_close(
        vp.model_time(full), torch.arange(T, -1, -1).float() / T, atol=0, rtol=0
    )
    # A shifted grid spends its steps at high noise: more of the 50 above tau(1/2).
    shifted = vp.grid(50, shift=3.0)
    assert shifted[0] == strided[0] and shifted[-1] == 0 and torch.all(shifted.diff() < 0)
    middle = vp.tau[T // 2].item()
    assert (shifted > middle).sum() > (strided > middle).sum()


def test_grid_step_limits():
    vp = DiscreteVP("linear", 50)
    assert vp.grid(50).shape == (51,) and vp.grid(1).tolist() == [pytest.approx(vp.tau[50]), 0.0]
    with pytest.raises(ValueError, match="exceeds"):
        vp.grid(51)
    with pytest.raises(ValueError, match="steps"):
        vp.grid(0)
    with pytest.raises(ValueError, match="num_timesteps"):
        DiscreteVP("linear", 1)
    with pytest.raises(ValueError, match="beta"):
        DiscreteVP("linear", 100, 0.02, 1e-4)


def test_vp_sample_u_is_uniform_over_the_steps():
    vp = DiscreteVP("linear", 10)
    u = vp.sample_u(20000, torch.device("cpu"), torch.Generator().manual_seed(0))
    k = u * 10
    torch.testing.assert_close(k, k.round())  # on the grid k / T
    counts = torch.bincount(k.round().long(), minlength=11)
    assert counts[0] == 0  # k = 0 is the data itself: never trained on
    assert (counts[1:] - 2000).abs().max() < 200  # uniform over 1..T (std ~ 42)


def test_ddpm_betas_cosine_matches_formula_at_small_t():
    betas = ddpm_betas("cosine", 4, 1e-4, 0.02)
    f = [math.cos((k / 4 + 0.008) / 1.008 * math.pi / 2) ** 2 for k in range(5)]
    expected = [min(1 - f[k + 1] / f[k], 0.999) for k in range(4)]
    assert betas.tolist() == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------ FlowSchedule, shift


def test_flow_schedule_is_its_own_flow_time():
    flow = FlowSchedule()
    u = torch.linspace(0, 1, 11)
    alpha, sigma = flow.alpha_sigma(u)
    torch.testing.assert_close(alpha, 1 - u)
    torch.testing.assert_close(sigma, u)
    torch.testing.assert_close(flow_time(alpha, sigma), u)
    assert torch.equal(flow.model_time(u), u)
    grid = flow.grid(10)
    torch.testing.assert_close(grid, torch.linspace(1, 0, 11))
    assert grid[0] == 1 and grid[-1] == 0


def test_shift_time_closed_form():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(shift_time(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    # shift s then 1/s is the identity (the map is a Mobius transform of the odds).
    torch.testing.assert_close(shift_time(shift_time(t, 3.0), 1 / 3), t)


# ------------------------------------------------------------------ LearnedSchedule


@pytest.fixture(scope="module")
def fine_u() -> torch.Tensor:
    return torch.linspace(0, 1, 2001)


def perturbed(scale: float, seed: int) -> LearnedSchedule:
    """A LearnedSchedule (initialised from ``seed``) with N(0, scale^2) added to every
    parameter (raw, before softplus)."""
    with torch.random.fork_rng():  # nn.Linear's init draws from the global generator
        torch.manual_seed(seed)
        schedule = LearnedSchedule()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in schedule.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return schedule


def test_learned_gamma_at_init_spans_gamma_min_to_gamma_max(fine_u):
    schedule = LearnedSchedule(gamma_min=-13.3, gamma_max=5.0)
    with torch.no_grad():
        gamma, dgamma = schedule(fine_u)
    assert gamma[0].item() == pytest.approx(-13.3, abs=1e-4)
    assert gamma[-1].item() == pytest.approx(5.0, abs=1e-4)
    assert torch.all(gamma.diff() > 0) and torch.all(dgamma > 0)
    # The mean slope is the span (the derivative integrates to gamma_1 - gamma_0).
    assert dgamma.mean().item() == pytest.approx(18.3, rel=1e-3)
    other = LearnedSchedule(gamma_min=-5.0, gamma_max=2.0, hidden=16)
    with torch.no_grad():
        ends = other.gamma(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(ends, torch.tensor([-5.0, 2.0]))
    with pytest.raises(ValueError, match="gamma_min"):
        LearnedSchedule(gamma_min=1.0, gamma_max=1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learned_gamma_stays_monotone_with_endpoints_after_perturbation(fine_u, seed):
    schedule = perturbed(1.0, seed)
    with torch.no_grad():
        gamma, dgamma = schedule(fine_u)
        gamma_1 = schedule.gamma_0 + F.softplus(schedule.span_raw)
    assert torch.all(gamma.diff() > 0) and torch.all(dgamma > 0)
    # float32: g(u) ~ 500 is normalised by g(1) - g(0) ~ 20-100, so ~1e-5 rounding.
    assert gamma[0].item() == pytest.approx(schedule.gamma_0.item(), abs=1e-3)
    assert gamma[-1].item() == pytest.approx(gamma_1.item(), abs=1e-3)
    # alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma): variance preserving.
    alpha, sigma = schedule.alpha_sigma(fine_u)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(fine_u))
    torch.testing.assert_close(torch.log(sigma**2 / alpha**2), gamma, atol=1e-3, rtol=1e-4)


def gamma_float64(schedule: LearnedSchedule, u: torch.Tensor) -> torch.Tensor:
    """The same gamma(u), evaluated in float64 from the module's parameters."""
    p = {name: v.detach().double() for name, v in schedule.named_parameters()}
    x = torch.cat([u.double(), torch.tensor([0.0, 1.0], dtype=torch.float64)])[:, None]
    h = F.linear(x, F.softplus(p["l1.weight"]), p["l1.bias"])
    s = torch.sigmoid(F.linear(h, F.softplus(p["l2.weight"]), p["l2.bias"]))
    g = (h + F.linear(s, F.softplus(p["l3.weight"]), p["l3.bias"]))[:, 0]
    span = F.softplus(p["span_raw"])
    return p["gamma_0"] + span * (g[:-2] - g[-2]) / (g[-1] - g[-2])


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_learned_gamma_float32_matches_float64_and_stays_monotone(fine_u, scale):
    """Monotone by construction, however far the parameters move, and as computed.

    At scale 3 g(u) ~ 1000 (1024 positive l3 terms) while g(1) - g(0) ~ 0.14: computed
    in float32 the normalisation would quantise gamma in steps of ~1e-2 (it is float64).
    """
    schedule = perturbed(scale, 0)
    with torch.no_grad():
        gamma, dgamma = schedule(fine_u)
    reference = gamma_float64(schedule, fine_u)
    assert torch.all(dgamma > 0) and torch.all(reference.diff() > 0)
    torch.testing.assert_close(gamma.double(), reference, atol=1e-3, rtol=0)
    assert torch.all(gamma.diff() > 0)


@pytest.mark.parametrize("seed", [None, 3])
def test_learned_dgamma_matches_autograd(seed):
    schedule = LearnedSchedule() if seed is None else perturbed(1.0, seed)
    u = torch.rand(64, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    gamma, dgamma = schedule(u)
    (auto,) = torch.autograd.grad(gamma.sum(), u)  # gamma_i depends on u_i only
    torch.testing.assert_close(dgamma, auto, rtol=1e-4, atol=1e-4)
    jac = torch.func.jacrev(lambda x: schedule(x)[0])(u.detach()[:16])
    torch.testing.assert_close(jac, torch.diag(dgamma.detach()[:16]), rtol=1e-4, atol=1e-4)
    # And both agree with a central finite difference in float64 terms of gamma.
    h = 1e-3
    u0 = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        fd = (schedule.gamma(u0 + h) - schedule.gamma(u0 - h)) / (2 * h)
        torch.testing.assert_close(fd, schedule(u0)[1], rtol=1e-2, atol=1e-2)


def test_learned_dgamma_carries_gradients_to_the_parameters():
    schedule = LearnedSchedule(hidden=32)
    gamma, dgamma = schedule(torch.rand(8))
    (gamma.sum() + dgamma.sum()).backward()
    for name in ("gamma_0", "span_raw", "l1.weight", "l2.weight", "l3.weight", "l2.bias"):
        grad = dict(schedule.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("seed", [None, 5])
def test_learned_model_time_inverts_the_grid(seed):
    schedule = LearnedSchedule() if seed is None else perturbed(1.0, seed)
    for steps, shift in ((10, 1.0), (100, 1.0), (20, 3.0)):
        grid = schedule.grid(steps, shift)
        assert grid.shape == (steps + 1,) and grid[-1].item() == 0.0
        assert torch.all(grid[1:] < grid[:-1]) and grid[0] < 1
        u = shift_time(torch.linspace(1.0, 0.0, steps + 1), shift)[:-1]
        torch.testing.assert_close(schedule.model_time(grid[:-1]), u, atol=1e-5, rtol=0)
        # The grid is the flow time of (alpha, sigma) at those u.
        with torch.no_grad():
            alpha, sigma = schedule.alpha_sigma(u)
        torch.testing.assert_close(grid[:-1], sigma / (alpha + sigma))


def test_learned_model_time_closed_form_at_init():
    """tau / (1 - tau) = exp(gamma / 2): invert a known gamma value by hand."""
    schedule = LearnedSchedule(gamma_min=-13.3, gamma_max=5.0)
    with torch.no_grad():
        gamma = schedule.gamma(torch.tensor([0.0, 0.4, 1.0]))
    tau = torch.sigmoid(gamma / 2)  # sigma / (alpha + sigma) = 1 / (1 + exp(-gamma / 2))
    torch.testing.assert_close(
        schedule.model_time(tau), torch.tensor([0.0, 0.4, 1.0]), atol=1e-5, rtol=0
    )
