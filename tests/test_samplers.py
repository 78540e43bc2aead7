"""Samplers, guidance, seeded noise and the flow objective's maths (ported from test_flow).

Everything is checked against closed forms: the rectified-flow path and its derivative,
exact integration of fields the samplers must integrate exactly, SD3's shifted grid,
DDPM's textbook ancestral update, DDIM's identities (eta 0 = Euler, eta 1 = ancestral) and
DDIM inversion, all on Gaussian data x0 ~ N(0, c^2) where the ideal network is known.
"""

from __future__ import annotations

import pytest
import torch

from stages.clip.export import TextCondition
from stages.unet.objectives import ObjectiveConfig, make_objective
from stages.unet.samplers import (
    SAMPLERS,
    RowNoise,
    ancestral_sample,
    cfg_velocity,
    check_cfg_interval,
    check_sampling,
    ddim_sample,
    euler_sample,
    evaluation_times,
    guided_rows,
    heun_sample,
    partial_grid,
    seeded_noise,
)
from stages.unet.schedules import DiscreteVP, FlowSchedule, LearnedSchedule, shift_time


def condition(batch: int, length: int = 5, width: int = 6, fill: float | None = None):
    tokens = (
        torch.randn(batch, length, width)
        if fill is None
        else torch.full((batch, length, width), fill)
    )
    mask = torch.ones(batch, length, dtype=torch.bool)
    return TextCondition(tokens, mask, tokens[:, 0].clone())


def bcast(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, 1, 1, 1)


# Gaussian data x0 ~ N(0, c^2), one std per channel: the ideal flow velocity is known.
STDS = torch.tensor([0.3, 0.6, 1.0, 1.5]).view(1, 4, 1, 1)


def gaussian_velocity(y: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """E[noise - x0 | y] for y = (1 - tau) x0 + tau noise: linear in y."""
    t, c2 = bcast(tau), STDS**2
    return (t - (1 - t) * c2) * y / ((1 - t) ** 2 * c2 + t**2)


class Replay:
    """A fake ``rng``: hands out pre-drawn noise in order (one tensor per stochastic step)."""

    def __init__(self, draws: list[torch.Tensor]):
        self.draws, self.used = draws, 0

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        z = self.draws[self.used]
        self.used += 1
        return z.to(like.dtype)


# ------------------------------------------------------------------ flow objective maths


def test_interpolation_endpoints_and_target():
    flow = make_objective(ObjectiveConfig())
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)

    def interpolate(t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = flow.schedule.alpha_sigma(t)
        return bcast(alpha) * x0 + bcast(sigma) * noise

    assert torch.equal(interpolate(torch.zeros(3)), x0)
    assert torch.equal(interpolate(torch.ones(3)), noise)
    t = torch.tensor([0.25, 0.5, 0.9])
    x_t = interpolate(t)
    torch.testing.assert_close(x_t[1], 0.5 * x0[1] + 0.5 * noise[1])
    # The target is the time derivative of x_t: a finite difference along t agrees.
    eps = 1e-3
    derivative = (interpolate(t + eps) - x_t) / eps
    alpha, sigma = flow.schedule.alpha_sigma(t)
    target = flow.target(x0, noise, alpha, sigma)
    torch.testing.assert_close(target, noise - x0)
    torch.testing.assert_close(derivative, target, atol=1e-3, rtol=1e-3)


def test_timesteps_are_continuous_in_unit_interval():
    for kind in ("logit_normal", "uniform"):
        flow = make_objective(ObjectiveConfig(timesteps=kind))
        t = flow.sample_u(4096, torch.device("cpu"), torch.Generator().manual_seed(0))
        assert t.min() > 0 and t.max() < 1
        assert t.unique().numel() > 4000  # continuous: no grid of timesteps
    # logit-normal(0, 1) is symmetric about 1/2 and concentrated in the middle.
    t = make_objective(ObjectiveConfig()).sample_u(
        20000, torch.device("cpu"), torch.Generator().manual_seed(1)
    )
    assert abs(t.mean().item() - 0.5) < 0.01
    assert ((t > 0.25) & (t < 0.75)).float().mean() > 0.6
    # uniform: mean 1/2, variance 1/12.
    t = make_objective(ObjectiveConfig(timesteps="uniform")).sample_u(
        20000, torch.device("cpu"), torch.Generator().manual_seed(2)
    )
    assert abs(t.mean().item() - 0.5) < 0.01 and abs(t.var().item() - 1 / 12) < 0.003


def test_condition_dropout_rate_and_null_rows():
    objective = make_objective(ObjectiveConfig(cond_dropout=0.1))
    cond, null = (
        condition(20000, length=2, width=2, fill=1.0),
        condition(1, length=2, width=2, fill=0.0),
    )
    null.mask[0, 1] = False
    dropped_cond, dropped = objective.drop_condition(cond, null, torch.Generator().manual_seed(0))
    rate = dropped.float().mean().item()
    assert abs(rate - 0.1) < 0.01  # 20000 draws: std 0.002
    assert torch.all(dropped_cond.tokens[dropped] == 0) and torch.all(
        dropped_cond.tokens[~dropped] == 1
    )
    assert torch.all(~dropped_cond.mask[dropped][:, 1]) and torch.all(dropped_cond.mask[~dropped])
    none = make_objective(ObjectiveConfig(cond_dropout=0.0)).drop_condition(cond, null)[1]
    assert not none.any()
    # Unconditional (cond None): nothing to drop.
    nothing, dropped = objective.drop_condition(None, None)
    assert nothing is None and dropped.numel() == 0


def test_loss_is_mse_to_the_velocity():
    flow = make_objective(ObjectiveConfig(cond_dropout=0.0))
    x0 = torch.randn(4, 2, 3, 3)
    gen = torch.Generator().manual_seed(3)

    def oracle(x_t, t, cond):  # recovers v from x_t given the x0 it was built from
        return (x_t - x0) / bcast(t)

    out = flow.loss(oracle, x0, condition(4), condition(1), gen)
    assert out["loss"].item() < 1e-8
    assert out["dropped"].item() == 0.0
    out = flow.loss(lambda x, t, c: torch.zeros_like(x), x0, condition(4), condition(1), gen)
    assert out["loss"].item() > 0.5


# ------------------------------------------------------------------ grids and exactness


def test_euler_is_exact_on_a_constant_field():
    noise, c = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for shift in (1.0, 3.0):
        x0 = euler_sample(lambda x, t: c, noise, FlowSchedule().grid(7, shift))
        torch.testing.assert_close(x0, noise - c)


def test_heun_is_exact_on_a_field_linear_in_t():
    a, b, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)

    def field(x, t):
        return a + b * bcast(t)

    # dx/dt = a + b t  =>  x(0) = x(1) - a - b / 2
    for shift in (1.0, 2.5):
        x0 = heun_sample(field, noise, FlowSchedule().grid(3, shift))
        torch.testing.assert_close(x0, noise - a - b / 2)
    # Euler is not exact on that field: the test can tell the two apart.
    x0 = euler_sample(field, noise, FlowSchedule().grid(3))
    assert not torch.allclose(x0, noise - a - b / 2)


def test_samplers_evaluate_on_the_shifted_grid():
    grid = FlowSchedule().grid(4, 3.0)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    torch.testing.assert_close(grid, 3 * t / (1 + 2 * t))  # SD3 eq. 23 by hand
    for name, sampler in SAMPLERS.items():
        seen = []

        def record(x, tau, seen=seen):
            seen.append(tau[0].item())
            return torch.zeros_like(x)

        sampler(record, torch.zeros(1, 1), grid)
        expected = grid[:-1].tolist()
        if name == "heun":  # also at the end of each step
            expected = [v for pair in zip(grid[:-1].tolist(), grid[1:].tolist()) for v in pair]
        assert seen == pytest.approx(expected), name
        assert seen[0] == pytest.approx(1.0)


def test_samplers_start_from_the_first_grid_point():
    """y_0 = grid[0] * noise: with a zero field Euler and Heun return it unchanged."""
    noise = torch.randn(2, 3, 4, 4)
    grid = DiscreteVP("linear", 50).grid(10)
    assert grid[0] < 1
    for sampler in (euler_sample, heun_sample):
        out = sampler(lambda y, t: torch.zeros_like(y), noise, grid)
        torch.testing.assert_close(out, grid[0] * noise)


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
    with pytest.raises(ValueError, match="steps"):
        FlowSchedule().grid(0)


# ------------------------------------------------------------------ guidance


class CountingModel:
    """v = x * (1 + mean pooled) + t: depends on the condition, counts forwards."""

    def __init__(self):
        self.calls = 0
        self.conds = []

    def __call__(self, x, t, cond):
        self.calls += 1
        self.conds.append(cond)
        if cond is None:
            return 2 * x + bcast(t)
        return x * bcast(1 + cond.pooled.mean(dim=1)) + bcast(t)


def test_guidance_scales_and_one_batched_forward():
    model = CountingModel()
    cond, null = condition(3, fill=2.0), condition(1, fill=-1.0)
    x, t = torch.randn(3, 2, 4, 4), torch.full((3,), 0.4)
    v_cond = model(x, t, cond)
    v_uncond = model(x, t, null.expand(3))
    model.calls = 0
    torch.testing.assert_close(cfg_velocity(model, cond, null, 0.0)(x, t), v_uncond)
    torch.testing.assert_close(
        cfg_velocity(model, cond, null, 4.0)(x, t), v_uncond + 4.0 * (v_cond - v_uncond)
    )
    assert model.calls == 2  # one forward per guided evaluation (the doubled batch)
    model.calls = 0
    torch.testing.assert_close(cfg_velocity(model, cond, null, 1.0)(x, t), v_cond)
    assert model.calls == 1 and model.conds[-1] is cond  # scale 1: the conditional branch only
    model.calls = 0
    euler_sample(cfg_velocity(model, cond, null, 5.0), x, FlowSchedule().grid(6))
    assert model.calls == 6
    # A null condition of the full batch works too; a mismatched one is refused.
    torch.testing.assert_close(cfg_velocity(model, cond, null.expand(3), 0.0)(x, t), v_uncond)
    with pytest.raises(ValueError, match="batch"):
        cfg_velocity(model, cond, condition(2), 2.0)


def test_unconditional_guidance_is_a_single_forward():
    model = CountingModel()
    x, t = torch.randn(3, 2, 4, 4), torch.full((3,), 0.4)
    for scale in (1.0, 5.0):  # no condition: the scale cannot apply
        model.calls, model.conds = 0, []
        torch.testing.assert_close(cfg_velocity(model, None, None, scale)(x, t), 2 * x + bcast(t))
        assert model.calls == 1 and model.conds == [None]


# ------------------------------------------------------------------ DDPM / DDIM identities


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ancestral_on_the_full_grid_is_the_textbook_ddpm_update(kind):
    """Ho et al. eq. 11 step by step, in float64, with the same z: ours agrees to ~1e-6.

    Ours starts from y = tau_T noise, i.e. x_T = (alpha_T + sigma_T) y = sigma_T noise, and
    its last step (k = 1 -> 0) adds no noise, as DDPM's.
    """
    T, c = 50, 0.5
    objective = make_objective(
        ObjectiveConfig(kind="eps", beta_schedule=kind, num_timesteps=T, beta_end=0.2)
    )
    schedule = objective.schedule
    abar, betas = schedule.alpha_bar, schedule.betas

    def eps_model(x, u, cond):  # the ideal noise prediction for x0 ~ N(0, c^2)
        alpha, sigma = (bcast(v).double() for v in schedule.alpha_sigma(u))
        return (sigma * x.double() / (alpha**2 * c**2 + sigma**2)).to(x.dtype)

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 2, 3, 3, generator=g)
    zs = [torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(T - 1)]
    rng = Replay(zs)
    ours = ancestral_sample(
        cfg_velocity(objective.velocity(eps_model), None, None, 1.0),
        noise,
        schedule.grid(T),
        rng=rng,
    )
    assert rng.used == T - 1  # one draw per step but the last

    x = (1 - abar[T]).sqrt() * noise.double()
    for k in range(T, 0, -1):
        beta, sigma = betas[k - 1], (1 - abar[k]).sqrt()
        eps = sigma * x / (abar[k] * c**2 + sigma**2)
        x = (x - beta / sigma * eps) / (1 - beta).sqrt()
        if k > 1:
            x = x + (beta * (1 - abar[k - 1]) / (1 - abar[k])).sqrt() * zs[T - k]
    torch.testing.assert_close(ours.double(), x, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "grid",
    [FlowSchedule().grid(12), FlowSchedule().grid(12, 3.0), DiscreteVP("cosine").grid(12)],
    ids=["flow", "flow-shift3", "vp-cosine"],
)
def test_ddim_identities(grid):
    noise = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    seeds = list(range(8))
    ddim0 = ddim_sample(gaussian_velocity, noise, grid)
    # eta = 0 is Euler in flow time (Song et al. eq. 12 rewritten in y) ...
    torch.testing.assert_close(ddim0, euler_sample(gaussian_velocity, noise, grid))
    # ... deterministic: bitwise equal on a second run, whatever rng is passed.
    assert torch.equal(ddim0, ddim_sample(gaussian_velocity, noise, grid, rng=RowNoise(seeds)))
    # eta = 1 is the ancestral sampler, given the same noise draws.
    ddim1 = ddim_sample(gaussian_velocity, noise, grid, RowNoise(seeds), eta=1.0)
    ancestral = ancestral_sample(gaussian_velocity, noise, grid, RowNoise(seeds))
    torch.testing.assert_close(ddim1, ancestral, atol=1e-5, rtol=1e-5)
    # 0 < eta < 1: reproducible from the seeds, different from eta = 0 and from other seeds.
    half = ddim_sample(gaussian_velocity, noise, grid, RowNoise(seeds), eta=0.5)
    assert torch.equal(half, ddim_sample(gaussian_velocity, noise, grid, RowNoise(seeds), eta=0.5))
    assert (half - ddim0).abs().max() > 1e-2
    other = ddim_sample(gaussian_velocity, noise, grid, RowNoise([s + 100 for s in seeds]), 0.5)
    assert (half - other).abs().max() > 1e-2
    # A row depends on its own seed only, not on the batch it was drawn in.
    single = ddim_sample(gaussian_velocity, noise[3:4], grid, RowNoise([3]), eta=0.5)
    torch.testing.assert_close(single, half[3:4])


def invert(velocity_fn, x0: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """DDIM inversion: Euler on the reversed grid, tau = 0 up to grid[0], the velocity
    evaluated at the start of each step; returns the state y at grid[0]."""
    up = grid.flip(0)
    y = x0.clone()
    for tau, tau_next in zip(up[:-1], up[1:]):
        y = y + (tau_next - tau) * velocity_fn(y, tau.expand(y.shape[0]))
    return y


@pytest.mark.parametrize(
    "schedule",
    [FlowSchedule(), DiscreteVP("linear"), DiscreteVP("cosine")],
    ids=["flow", "vp-linear", "vp-cosine"],
)
def test_ddim_inverts_its_own_trajectory(schedule):
    x0 = torch.randn(64, 4, 4, 4, generator=torch.Generator().manual_seed(2)) * STDS
    errors = []
    for steps in (100, 200):
        grid = schedule.grid(steps)
        latent = invert(gaussian_velocity, x0, grid)
        # The latent is noise-like: std close to 1 in every channel, whatever c was.
        assert torch.allclose(latent.std(dim=(0, 2, 3)), torch.ones(4), atol=0.1)
        back = ddim_sample(gaussian_velocity, latent / grid[0], grid)
        errors.append(((back - x0).norm() / x0.norm()).item())
        # eta = 1 forgets the latent: the inversion test can tell a stochastic sampler apart.
        lost = ddim_sample(gaussian_velocity, latent / grid[0], grid, RowNoise(range(64)), 1.0)
        assert ((lost - x0).norm() / x0.norm()).item() > 0.5
    assert errors[1] < 0.03  # measured 1.3-1.9 % at 200 steps
    assert 1.6 < errors[0] / errors[1] < 2.4  # first order: halving the step halves the error


def test_samplers_reproduce_gaussian_data():
    """With the ideal velocity of N(0, c^2) data every sampler returns std ~ c per channel."""
    noise = torch.randn(512, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    for name, sampler in SAMPLERS.items():
        grid = FlowSchedule().grid(200 if name == "ancestral" else 100)
        out = sampler(gaussian_velocity, noise, grid, RowNoise(range(512)))
        std = out.std(dim=(0, 2, 3))
        torch.testing.assert_close(std, STDS.flatten(), rtol=0.04, atol=0.0, msg=name)
        assert out.mean().abs() < 0.02, name


# ------------------------------------------------------------------ noise and settings


def test_seeded_noise_depends_on_the_seed_only():
    a = seeded_noise((2, 3, 3), [5, 6, 7])
    b = seeded_noise((2, 3, 3), [7])
    torch.testing.assert_close(a[2:], b)
    assert not torch.allclose(a[0], a[1])


def test_row_noise_is_per_row_and_differs_from_the_initial_noise():
    like = torch.zeros(3, 2, 4, 4)
    a, b = RowNoise([5, 6, 7]), RowNoise([7])
    first = a(like)
    torch.testing.assert_close(first[2:], b(like[:1]))
    assert not torch.allclose(first[0], first[1])
    assert not torch.allclose(a(like), first)  # each call draws afresh
    # Later draws are other streams than the initial noise of the same seed.
    assert not torch.allclose(first[0], seeded_noise((2, 4, 4), [5])[0])
    assert first.dtype == like.dtype and first.shape == like.shape


def test_check_sampling_rejects_bad_settings():
    for sampler in SAMPLERS:
        check_sampling(sampler, 1, 0.0)
    check_sampling("ddim", 20, 1.0)
    with pytest.raises(ValueError, match="unknown sampler"):
        check_sampling("dpm++", 20, 0.0)
    with pytest.raises(ValueError, match="steps"):
        check_sampling("euler", 0, 0.0)
    for eta in (-0.1, 1.5):
        with pytest.raises(ValueError, match="eta"):
            check_sampling("ddim", 20, eta)
    for sampler in ("euler", "heun", "ancestral"):
        with pytest.raises(ValueError, match="ddim"):
            check_sampling(sampler, 20, 0.5)


def test_samplers_work_on_every_schedule_grid():
    noise = torch.randn(2, 4, 3, 3)
    schedules = [FlowSchedule(), DiscreteVP("linear"), DiscreteVP("cosine"), LearnedSchedule()]
    for schedule in schedules:
        grid = schedule.grid(5)
        assert grid.shape == (6,) and grid[-1] == 0
        for sampler in SAMPLERS.values():
            out = sampler(gaussian_velocity, noise, grid, RowNoise([0, 1]))
            assert out.shape == noise.shape and torch.isfinite(out).all()


# ------------------------------------------------------------------ image-to-image


def test_partial_grid_starts_at_the_strength_in_flow_time():
    grid = FlowSchedule().grid(20)
    cut = partial_grid(grid, 0.6)
    assert cut[0].item() == pytest.approx(0.6) and cut[-1] == 0
    assert len(cut) - 1 == 12  # 0.6 of the 20 steps, no near-zero first step
    torch.testing.assert_close(cut[1:], grid[9:])
    assert partial_grid(grid, 1.0) is grid
    assert partial_grid(grid, 0.0).tolist() == [0.0]
    assert partial_grid(grid, 1e-9).tolist() == pytest.approx([1e-9, 0.0])
    for strength in (-0.1, 1.1):
        with pytest.raises(ValueError, match="strength"):
            partial_grid(grid, strength)


@pytest.mark.parametrize("schedule", [DiscreteVP("linear"), LearnedSchedule()])
def test_partial_grid_keeps_the_schedules_own_points(schedule):
    grid = schedule.grid(10)
    cut = partial_grid(grid, 0.5)
    assert cut[0] == pytest.approx(0.5 * grid[0].item())
    assert set(cut[1:].tolist()) <= set(grid.tolist()) and cut[-1] == 0


def test_samplers_start_from_the_image_noised_to_the_first_grid_time():
    """Euler on the constant field v = noise - target carries y_t = (1 - t) x0 + t noise to
    target + (1 - t) (x0 - target): exact, so it shows where the sampler started."""
    noise, x0, target = torch.randn(3, 2, 4, 3, 3).unbind(0)
    grid = FlowSchedule().grid(10)
    for strength in (0.3, 0.75):
        out = euler_sample(
            lambda y, t: noise - target, noise, partial_grid(grid, strength), init=x0
        )
        torch.testing.assert_close(out, target + (1 - strength) * (x0 - target))
    # Strength 0 returns the image itself with no evaluation, for every sampler.
    for name, sampler in SAMPLERS.items():
        out = sampler(None, noise, partial_grid(grid, 0.0), RowNoise([0, 1]), init=x0)
        assert torch.equal(out, x0), name


def test_image_to_image_runs_every_sampler_on_every_schedule():
    noise, x0 = torch.randn(2, 2, 4, 3, 3).unbind(0)
    schedules = [FlowSchedule(), DiscreteVP("linear"), DiscreteVP("cosine"), LearnedSchedule()]
    for schedule in schedules:
        grid = partial_grid(schedule.grid(8), 0.5)
        for name, sampler in SAMPLERS.items():
            a = sampler(gaussian_velocity, noise, grid, RowNoise([0, 1]), init=x0)
            b = sampler(gaussian_velocity, noise, grid, RowNoise([0, 1]), init=x0)
            assert torch.isfinite(a).all() and torch.equal(a, b), name


# ------------------------------------------------------------------ guidance interval


class RowCounter:
    """Wraps a model and counts the image rows it evaluates (a doubled batch counts twice)."""

    def __init__(self, model):
        self.model, self.rows, self.times = model, 0, []

    def __call__(self, x, t, cond):
        self.rows += len(x)
        self.times.append(float(t[0]))
        return self.model(x, t, cond)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_an_interval_covering_every_step_gives_the_same_images(sampler):
    model = CountingModel()
    cond, null = condition(2, fill=2.0), condition(1, fill=-1.0)
    noise, grid = torch.randn(2, 2, 4, 4), FlowSchedule().grid(5, shift=3.0)
    eta = 0.5 if sampler == "ddim" else 0.0

    def classic(y, tau):  # guidance at every evaluation, written out
        v_cond, v_uncond = model(y, tau, cond), model(y, tau, null.expand(2))
        return v_uncond + 5.0 * (v_cond - v_uncond)

    def sample(velocity):
        return SAMPLERS[sampler](velocity, noise, grid, RowNoise([3, 4]), eta)

    counter = RowCounter(model)
    reference = sample(cfg_velocity(counter, cond, null, 5.0))
    torch.testing.assert_close(reference, sample(classic))
    # (0, 1) and the exact span of the times this sampler evaluates both cover every step.
    span = (min(counter.times), max(counter.times))
    for interval in ((0.0, 1.0), span):
        assert torch.equal(sample(cfg_velocity(model, cond, null, 5.0, interval)), reference)
    # Narrowing it changes the images (guidance matters for this model).
    assert not torch.allclose(sample(cfg_velocity(model, cond, null, 5.0, (0.3, 0.7))), reference)


def test_outside_the_interval_only_the_conditional_branch_runs():
    counter = RowCounter(CountingModel())
    cond, null = condition(3, fill=2.0), condition(1, fill=-1.0)
    x = torch.randn(3, 2, 4, 4)
    grid = FlowSchedule().grid(10)  # evaluations at 1.0, 0.9, ..., 0.1
    euler_sample(cfg_velocity(counter, cond, null, 5.0), x, grid)
    assert counter.rows == 10 * 2 * 3  # every step guided: the doubled batch
    counter.rows = 0
    euler_sample(cfg_velocity(counter, cond, null, 5.0, (0.25, 0.75)), x, grid)
    # 0.7, 0.6, 0.5, 0.4, 0.3 are guided (2B rows), the other five steps run B rows.
    assert counter.rows == 5 * 2 * 3 + 5 * 3
    # Outside the interval the velocity is the conditional one (scale 1 there).
    t_out, t_in = torch.full((3,), 0.9), torch.full((3,), 0.5)
    model = CountingModel()
    limited = cfg_velocity(model, cond, null, 5.0, (0.25, 0.75))
    torch.testing.assert_close(limited(x, t_out), model(x, t_out, cond))
    torch.testing.assert_close(limited(x, t_in), cfg_velocity(model, cond, null, 5.0)(x, t_in))


@pytest.mark.parametrize("interval", [(-0.1, 0.5), (0.2, 1.5), (0.8, 0.2), (0.5,)])
def test_bad_intervals_are_refused_with_the_reason(interval):
    with pytest.raises(ValueError, match="cfg_interval"):
        cfg_velocity(CountingModel(), condition(1), condition(1), 5.0, interval)
    with pytest.raises(ValueError, match="cfg_interval"):
        check_sampling("euler", 20, 0.0, interval)
    assert check_cfg_interval((0.2, 0.2)) == (0.2, 0.2)


def test_evaluation_times_and_guided_rows_count_what_the_wrapper_runs():
    grid = FlowSchedule().grid(10)
    assert evaluation_times("euler", grid) == pytest.approx([1.0 - i / 10 for i in range(10)])
    assert len(evaluation_times("heun", grid)) == 20
    for sampler in ("euler", "heun"):
        counter = RowCounter(CountingModel())
        x = torch.randn(1, 2, 4, 4)
        interval = (0.25, 0.75)
        SAMPLERS[sampler](cfg_velocity(counter, condition(1), condition(1), 5.0, interval), x, grid)
        times = evaluation_times(sampler, grid)
        assert counter.rows == guided_rows(times, interval) < guided_rows(times, (0, 1))
        assert guided_rows(times, interval, guided=False) == len(times)
