"""Training objectives against closed forms, on Gaussian data x0 ~ N(0, c^2) where the ideal
network is known: the forward process q(x_u | x0), the targets (an oracle's loss is the
Bayes error, below a zero predictor's), the network-to-velocity conversion (sampling with the
oracle reproduces the data), VDM's bound term by term, and a few real training steps of a
tiny UNet per objective followed by sampling with every sampler."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from stages.unet.model import UNet, UNetModelConfig
from stages.unet.objectives import (
    OBJECTIVES,
    Objective,
    ObjectiveConfig,
    discretized_gaussian_log_likelihood,
    make_objective,
)
from stages.unet.samplers import SAMPLERS, RowNoise, cfg_velocity, ddim_sample, euler_sample
from stages.unet.schedules import DiscreteVP, FlowSchedule, LearnedSchedule

C = 0.5  # the data's std
CPU = torch.device("cpu")

KINDS = {  # id -> config: every objective, both DDPM beta schedules
    "flow": ObjectiveConfig(cond_dropout=0.0),
    "eps-linear": ObjectiveConfig(kind="eps", cond_dropout=0.0),
    "eps-cosine": ObjectiveConfig(kind="eps", beta_schedule="cosine", cond_dropout=0.0),
    "v-linear": ObjectiveConfig(kind="v", cond_dropout=0.0),
    "v-cosine": ObjectiveConfig(kind="v", beta_schedule="cosine", cond_dropout=0.0),
    "vdm": ObjectiveConfig(kind="vdm", cond_dropout=0.0),
}


def bcast(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, 1, 1, 1)


def posterior(x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
    """E[x0 | x], E[noise | x] for x = alpha x0 + sigma noise, x0 ~ N(0, C^2), noise ~ N(0, 1)."""
    a, s = bcast(alpha).to(x.dtype), bcast(sigma).to(x.dtype)
    den = a**2 * C**2 + s**2
    return a * C**2 * x / den, s * x / den


def target_weights(kind: str, alpha: torch.Tensor, sigma: torch.Tensor):
    """(w_x0, w_noise): the target is w_x0 x0 + w_noise noise."""
    if kind == "flow":
        return -torch.ones_like(alpha), torch.ones_like(alpha)
    if kind == "v":
        return -sigma, alpha
    return torch.zeros_like(alpha), torch.ones_like(alpha)  # eps, vdm


def oracle(objective: Objective, seen: list | None = None):
    """The exact network for Gaussian data: each objective's prediction from the posterior."""
    kind = objective.config.kind

    def model(x, u, cond):
        if seen is not None:
            seen.append((x.detach().clone(), u.detach().clone()))
        with torch.no_grad():
            alpha, sigma = objective.schedule.alpha_sigma(u)
        x0, eps = posterior(x, alpha, sigma)
        w_x0, w_n = target_weights(kind, alpha, sigma)
        return bcast(w_x0).to(x.dtype) * x0 + bcast(w_n).to(x.dtype) * eps

    return model


def zero(x, u, cond):
    return torch.zeros_like(x)


# ------------------------------------------------------------------ the forward process


def test_vp_forward_process_moments_match_alpha_bar():
    """q(x_k | x0) = N(sqrt(abar_k) x0, (1 - abar_k) I), abar_k = prod_{i<=k} (1 - beta_i),
    measured per k over many draws for one fixed x0 through ``Objective.loss``."""
    T = 5
    objective = make_objective(
        ObjectiveConfig(kind="eps", num_timesteps=T, beta_start=0.05, beta_end=0.5)
    )
    x0 = torch.linspace(-1, 1, 12).view(1, 3, 2, 2).expand(6000, -1, -1, -1).contiguous()
    seen = []
    objective.loss(oracle(objective, seen), x0, None, None, torch.Generator().manual_seed(0))
    ((x_u, u),) = seen
    betas = [0.05 + (0.5 - 0.05) * i / (T - 1) for i in range(T)]
    for k in range(1, T + 1):
        abar = math.prod(1 - b for b in betas[:k])
        rows = x_u[(u * T).round() == k]
        assert len(rows) > 1000  # k uniform in 1..T
        torch.testing.assert_close(rows.mean(0), math.sqrt(abar) * x0[0], atol=0.05, rtol=0)
        var = rows.var(0)
        assert (var / (1 - abar) - 1).abs().max() < 0.12, k  # 1200 draws: std ~ 0.04
        assert (var.mean() / (1 - abar) - 1).abs() < 0.04, k


@pytest.mark.parametrize("kind", ["flow", "v-cosine", "vdm"])
def test_forward_process_standardises_to_the_noise(kind):
    """(x_u - alpha(u) x0) / sigma(u) is N(0, 1) and independent of u, with alpha, sigma the
    closed forms: 1 - u, u (flow); alpha^2 + sigma^2 = 1, alpha^2 = sigmoid(-gamma) (vdm)."""
    objective = make_objective(KINDS[kind])
    x0 = torch.linspace(-1, 1, 16).view(1, 1, 4, 4).expand(4096, -1, -1, -1).contiguous()
    seen = []
    objective.loss(oracle(objective, seen), x0, None, None, torch.Generator().manual_seed(1))
    ((x_u, u),) = seen
    if kind == "flow":
        alpha, sigma = 1 - u, u
    elif kind == "vdm":
        with torch.no_grad():
            gamma = objective.schedule.gamma(u)
        alpha, sigma = torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()
    else:
        vp: DiscreteVP = objective.schedule
        abar = vp.alpha_bar[(u.double() * vp.steps).round().long()].float()
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    z = (x_u - bcast(alpha) * x0) / bcast(sigma)
    assert abs(z.mean().item()) < 0.01 and abs(z.var().item() - 1) < 0.02
    # Independent of u: the same moments in the low-noise and the high-noise half.
    low = u < u.median()
    for part in (z[low], z[~low]):
        assert abs(part.mean().item()) < 0.02 and abs(part.var().item() - 1) < 0.03
    # Per element: the mean of z over the batch is 0 (x0 enters through alpha x0 only).
    assert z.mean(0).abs().max() < 0.06


def test_vdm_times_are_low_discrepancy():
    objective = make_objective(KINDS["vdm"])
    u = objective.sample_u(64, CPU, torch.Generator().manual_seed(0))
    gaps = torch.sort(u).values.diff()
    torch.testing.assert_close(gaps, torch.full((63,), 1 / 64))
    assert u.min() >= 0 and u.max() < 1


def test_v_target_is_the_angular_derivative():
    """Salimans & Ho: with phi = atan(sigma / alpha), x_phi = cos(phi) x0 + sin(phi) noise
    and v = d x_phi / d phi = alpha noise - sigma x0."""
    objective = make_objective(KINDS["v-cosine"])
    x0, noise = torch.randn(2, 3, 2, 2, 2, generator=torch.Generator().manual_seed(0)).double()
    alpha, sigma = objective.schedule.alpha_sigma(torch.tensor([0.1, 0.5, 0.9]).double())
    phi = bcast(torch.atan2(sigma, alpha))
    torch.testing.assert_close(
        bcast(alpha) * x0 + bcast(sigma) * noise, torch.cos(phi) * x0 + torch.sin(phi) * noise
    )
    h = 1e-6
    derivative = (
        torch.cos(phi + h) * x0
        + torch.sin(phi + h) * noise
        - torch.cos(phi - h) * x0
        - torch.sin(phi - h) * noise
    ) / (2 * h)
    torch.testing.assert_close(objective.target(x0, noise, alpha, sigma), derivative)


# ------------------------------------------------------------------ targets through the loss


@pytest.mark.parametrize("kind", ["flow", "eps-linear", "v-linear", "v-cosine"])
def test_exact_target_oracle_has_zero_loss(kind):
    """A model that knows x0 recovers the noise from x_u, hence any target: loss 0."""
    objective = make_objective(KINDS[kind])
    x0 = torch.randn(16, 2, 3, 3, generator=torch.Generator().manual_seed(1))

    def knows_x0(x_u, u, cond):
        alpha, sigma = (bcast(v) for v in objective.schedule.alpha_sigma(u))
        noise = (x_u - alpha * x0) / sigma
        return objective.target(x0, noise, alpha.flatten(), sigma.flatten())

    out = objective.loss(knows_x0, x0, None, None, torch.Generator().manual_seed(2))
    assert out["loss"].item() < 1e-8
    assert "dropped" not in out  # unconditional: nothing dropped


@pytest.mark.parametrize("kind", ["flow", "eps-linear", "eps-cosine", "v-linear", "v-cosine"])
def test_gaussian_oracle_loss_is_the_bayes_error(kind):
    """E||target - E[target | x_u]||^2 = w' S w - (w' S h)^2 / (h' S h), S = diag(C^2, 1),
    h = (alpha, sigma), w the target's weights on (x0, noise); a zero predictor pays w' S w."""
    objective = make_objective(KINDS[kind])
    x0 = C * torch.randn(4096, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    seen = []
    out = objective.loss(oracle(objective, seen), x0, None, None, torch.Generator().manual_seed(4))
    u = seen[0][1]
    alpha, sigma = (v.double() for v in objective.schedule.alpha_sigma(u))
    w_x0, w_n = (v.double() for v in target_weights(objective.config.kind, alpha, sigma))
    prior = w_x0**2 * C**2 + w_n**2
    bayes = prior - (w_x0 * alpha * C**2 + w_n * sigma) ** 2 / (alpha**2 * C**2 + sigma**2)
    assert out["loss"].item() == pytest.approx(bayes.mean().item(), rel=0.03)
    zero_loss = objective.loss(zero, x0, None, None, torch.Generator().manual_seed(4))["loss"]
    assert zero_loss.item() == pytest.approx(prior.mean().item(), rel=0.03)
    assert out["loss"] < 0.9 * zero_loss


# ------------------------------------------------------------------ velocity and sampling


@pytest.mark.parametrize("kind", list(KINDS))
def test_sampling_the_gaussian_oracle_reproduces_the_data(kind):
    """Network -> flow velocity (``Objective.velocity``) -> Euler / DDIM on the schedule's
    grid: the samples have the data's std."""
    objective = make_objective(KINDS[kind])
    batch = 64 if kind == "vdm" else 512  # the learned schedule inverts tau by bisection
    noise = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    velocity = cfg_velocity(objective.velocity(oracle(objective)), None, None, 1.0)
    grid = objective.schedule.grid(100)
    with torch.no_grad():
        outs = {sampler: sampler(velocity, noise, grid) for sampler in (euler_sample, ddim_sample)}
    for sampler, out in outs.items():
        assert out.std().item() == pytest.approx(C, rel=0.05), sampler.__name__
        assert abs(out.mean().item()) < 0.03
    torch.testing.assert_close(outs[euler_sample], outs[ddim_sample])


@pytest.mark.parametrize("kind", ["eps-linear", "v-cosine"])
def test_ddpm_ancestral_on_the_full_chain_reproduces_the_data(kind):
    objective = make_objective(KINDS[kind])
    noise = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(6))
    velocity = cfg_velocity(objective.velocity(oracle(objective)), None, None, 1.0)
    out = SAMPLERS["ancestral"](velocity, noise, objective.schedule.grid(1000))
    assert out.std().item() == pytest.approx(C, rel=0.05)


@pytest.mark.parametrize("kind", list(KINDS))
def test_velocity_converts_predictions_to_noise_minus_x0(kind):
    """At any (y, tau): x = (alpha + sigma) y and v = eps_hat - x0_hat, with (x0_hat, eps_hat)
    the posterior means the oracle's prediction encodes."""
    objective = make_objective(KINDS[kind])
    schedule = objective.schedule
    y = torch.randn(3, 1, 2, 2)
    grid = schedule.grid(10)
    tau = grid[[1, 4, 8]]
    v = objective.velocity(oracle(objective))(y, tau, None)
    with torch.no_grad():
        u = schedule.model_time(tau)
        alpha, sigma = schedule.alpha_sigma(u)
    x0, eps = posterior((bcast(alpha) + bcast(sigma)) * y, alpha, sigma)
    torch.testing.assert_close(v, eps - x0, atol=1e-4, rtol=1e-4)
    # And for Gaussian data that is the closed-form flow velocity in y.
    t = bcast(tau)
    torch.testing.assert_close(
        v, (t - (1 - t) * C**2) * y / ((1 - t) ** 2 * C**2 + t**2), atol=1e-4, rtol=1e-3
    )


@pytest.mark.parametrize("kind", ["flow", "eps-linear", "v-cosine", "vdm"])
def test_clip_x0_clamps_the_denoised_estimate(kind):
    objective = make_objective(KINDS[kind])

    def wild(x, u, cond):  # a prediction whose x0_hat is far outside [-1, 1]
        return 30 * torch.sign(x) * (1 + x.abs())

    y = torch.randn(4, 1, 3, 3)
    tau = objective.schedule.grid(10)[[2, 2, 5, 5]]
    v = objective.velocity(wild, clip_x0=True)(y, tau, None)
    x0_hat = y - bcast(tau) * v
    eps_hat = y + (1 - bcast(tau)) * v
    assert x0_hat.abs().max() <= 1 + 1e-4
    # eps_hat is re-derived from the clamped x0_hat: y is still on the path between them.
    torch.testing.assert_close((1 - bcast(tau)) * x0_hat + bcast(tau) * eps_hat, y)
    free = objective.velocity(wild)(y, tau, None)
    assert (y - bcast(tau) * free).abs().max() > 1.5


# ------------------------------------------------------------------ VDM's bound


def pixels(batch: int, seed: int = 0) -> torch.Tensor:
    """8-bit images scaled to [-1, 1]: the levels 2k / 255 - 1."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, 4, 4), generator=g).float() * 2 / 255 - 1


def test_discretized_gaussian_is_a_distribution_over_the_256_levels():
    levels = torch.arange(256).float() * 2 / 255 - 1
    for mean, scale in ((0.3, 0.1), (-0.99, 0.02), (0.0, 3.0), (0.5, 1e-3)):
        logp = discretized_gaussian_log_likelihood(
            levels, torch.full((256,), mean), torch.full((256,), scale)
        )
        assert torch.all(logp <= 0)
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-4), (mean, scale)
    # An interior bin is the Gaussian mass of [x - 1/255, x + 1/255].
    normal = torch.distributions.Normal(0.3, 0.1)
    x = levels[150]
    mass = normal.cdf(x + 1 / 255) - normal.cdf(x - 1 / 255)
    logp = discretized_gaussian_log_likelihood(x, torch.tensor(0.3), torch.tensor(0.1))
    assert logp.exp().item() == pytest.approx(mass.item(), rel=1e-4)
    # The end bins take the tails: mean far below -1 puts all the mass on level 0.
    logp = discretized_gaussian_log_likelihood(levels[:1], torch.tensor([-5.0]), torch.tensor(0.1))
    assert logp.item() == pytest.approx(0.0, abs=1e-6)


def test_vdm_loss_terms_sum_and_match_closed_forms():
    objective = make_objective(KINDS["vdm"])
    schedule: LearnedSchedule = objective.schedule
    x0 = pixels(512)
    out = objective.loss(zero, x0, None, None, torch.Generator().manual_seed(7))
    keys = {"loss", "bpd", "bpd_diffusion", "bpd_prior", "bpd_recon", "gamma_0", "gamma_1"}
    assert keys <= out.keys()
    parts = out["bpd_diffusion"] + out["bpd_prior"] + out["bpd_recon"]
    torch.testing.assert_close(out["bpd"], parts)
    torch.testing.assert_close(out["loss"].detach(), out["bpd"])
    assert out["gamma_0"].item() == pytest.approx(-13.3, abs=1e-4)
    assert out["gamma_1"].item() == pytest.approx(5.0, abs=1e-4)
    dims, to_bpd = x0[0].numel(), 1 / (x0[0].numel() * math.log(2))
    # Prior: KL(N(alpha_1 x, sigma_1^2) || N(0, 1)) per element, by torch.distributions.
    var_1 = torch.sigmoid(torch.tensor(5.0))
    q = torch.distributions.Normal((1 - var_1).sqrt() * x0, var_1.sqrt())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0))
    prior = kl.flatten(1).sum(1).mean() * to_bpd
    assert out["bpd_prior"].item() == pytest.approx(prior.item(), rel=1e-4)
    # Diffusion with a zero predictor: 1/2 E[gamma'(u)] E||noise||^2 = 1/2 (gamma_1 - gamma_0) D.
    assert out["bpd_diffusion"].item() == pytest.approx(0.5 * 18.3 * dims * to_bpd, rel=0.02)
    # Reconstruction: the decoder N(x + s eps, s^2), s = sigma_0 / alpha_0 = exp(gamma_0 / 2),
    # gives an interior level P = Phi(h / s - eps) - Phi(-h / s - eps), h = 1/255 the bin's
    # half-width, an end level Phi(h / s -+ eps): integrate -log P against N(0, 1) by hand.
    r = 1 / 255 / math.exp(-13.3 / 2)
    eps = torch.linspace(-8, 8, 20001, dtype=torch.float64)
    weight = torch.exp(-(eps**2) / 2) / math.sqrt(2 * math.pi) * (eps[1] - eps[0])
    phi = torch.distributions.Normal(0.0, 1.0).cdf
    interior = -(weight * torch.log(phi(r - eps) - phi(-r - eps))).sum()
    end = -(weight * torch.log(phi(r - eps))).sum()
    at_end = (x0.abs() > 0.999).double().mean()
    recon = ((1 - at_end) * interior + at_end * end) / math.log(2)
    assert out["bpd_recon"].item() == pytest.approx(recon.item(), rel=0.05)
    assert schedule.gamma_0.grad is None  # nothing backpropagated yet


def test_vdm_loss_backpropagates_into_the_schedule():
    objective = make_objective(KINDS["vdm"])
    schedule: LearnedSchedule = objective.schedule
    assert objective.learned_schedule is schedule
    weight = torch.zeros(1, requires_grad=True)

    def model(x, u, cond):  # a one-parameter noise predictor
        return weight * x

    out = objective.loss(model, pixels(32), None, None, torch.Generator().manual_seed(9))
    out["loss"].backward()
    assert weight.grad is not None and weight.grad.abs() > 0
    grads = {name: p.grad for name, p in schedule.named_parameters()}
    for name in ("gamma_0", "span_raw", "l1.weight", "l1.bias", "l2.weight", "l3.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    # An explicitly passed schedule (the trainer's, wrapped for DDP) is the one used.
    other = LearnedSchedule(gamma_min=-10.0, gamma_max=3.0, hidden=8)
    out = objective.loss(model, pixels(8), None, None, schedule=other)
    assert out["gamma_0"].item() == pytest.approx(-10.0, abs=1e-4)
    assert out["gamma_1"].item() == pytest.approx(3.0, abs=1e-4)


def vdm_diffusion_terms(schedule, model, x0, u, noise) -> torch.Tensor:
    """(B,) VDM's per-sample diffusion loss in bits per dimension, written out (eq. 17)."""
    gamma, dgamma = schedule(u)
    alpha, sigma = torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()
    noise_hat = model(bcast(alpha) * x0 + bcast(sigma) * noise, u, None)
    mse = (noise - noise_hat).square().flatten(1).sum(1)
    return 0.5 * dgamma * mse / (x0[0].numel() * math.log(2))


def test_vdm_schedule_shape_gets_the_variance_gradient_and_the_rest_the_bound():
    """VDM appendix I.2: the shape's parameters get d/d eta mean(L_i^2) of the per-sample
    diffusion losses, the endpoints and the network the bound's gradient, in one backward."""
    weight = torch.full((1,), 0.3, requires_grad=True)

    def model(x, u, cond):  # a one-parameter, imperfect noise predictor
        return weight * x

    x0, u = pixels(16), torch.rand(16, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    schedule = LearnedSchedule(hidden=16)
    shape = [p for n, p in schedule.named_parameters() if n.startswith("l")]
    ends = [schedule.gamma_0, schedule.span_raw]
    grads = {}
    for mode in ("variance", "bound"):
        objective = make_objective(replace(KINDS["vdm"], shape_gradient=mode))
        for p in [weight, *schedule.parameters()]:
            p.grad = None
        eps_0 = torch.Generator().manual_seed(3)  # the reconstruction term's draw
        objective.bound(model, x0, None, u, noise, schedule, eps_0)["loss"].backward()
        grads[mode] = [p.grad.clone() for p in [weight, *ends, *shape]]
    variance, bound = grads["variance"], grads["bound"]
    for got, want in zip(variance[:3], bound[:3]):  # network and endpoints: the bound's
        torch.testing.assert_close(got, want)
    terms = vdm_diffusion_terms(schedule, model, x0, u, noise)
    want = torch.autograd.grad(terms.square().mean(), shape)
    for got, ref, name in zip(variance[3:], want, ("l1.w", "l1.b", "l2.w", "l2.b", "l3.w")):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-9, msg=name)
    flat = [torch.cat([g.flatten() for g in grads[m][3:]]) for m in ("variance", "bound")]
    assert not torch.allclose(*flat, rtol=0.1)  # and it is not the bound's


def test_vdm_variance_gradient_lowers_the_variance_of_the_diffusion_loss():
    """With the Bayes-optimal predictor for Gaussian data the diffusion loss at u is
    1/2 gamma'(u) D SNR c^2 / (SNR c^2 + 1): far from constant on the initial, near-linear
    schedule. Training only the shape on the variance gradient flattens it."""
    torch.manual_seed(0)
    schedule = LearnedSchedule(hidden=32)
    objective = make_objective(KINDS["vdm"])
    objective.schedule = schedule  # the oracle reads the current schedule
    model = oracle(objective)
    shape = [p for n, p in schedule.named_parameters() if n.startswith("l")]
    optimizer = torch.optim.Adam(shape, lr=3e-2)
    g = torch.Generator().manual_seed(0)
    x_eval = C * torch.randn(256, 3, 4, 4, generator=g)
    u_eval, noise_eval = (torch.arange(256) + 0.5) / 256, torch.randn(256, 3, 4, 4, generator=g)

    def spread() -> float:
        with torch.no_grad():
            return vdm_diffusion_terms(schedule, model, x_eval, u_eval, noise_eval).var().item()

    before = spread()
    for _ in range(150):
        x0 = C * torch.randn(64, 3, 4, 4, generator=g)
        out = objective.loss(model, x0, None, None, g, schedule=schedule)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert spread() < 0.5 * before


def test_vdm_oracle_with_known_noise_leaves_prior_and_recon():
    objective = make_objective(KINDS["vdm"])
    x0 = pixels(64)

    def knows_x0(x_u, u, cond):
        with torch.no_grad():
            alpha, sigma = (bcast(v) for v in objective.schedule.alpha_sigma(u))
        return (x_u - alpha * x0) / sigma

    out = objective.loss(knows_x0, x0, None, None, torch.Generator().manual_seed(10))
    assert out["bpd_diffusion"].item() < 1e-4
    torch.testing.assert_close(out["bpd"], out["bpd_prior"] + out["bpd_recon"], atol=1e-4, rtol=0)


def test_bits_per_dim_is_for_vdm_only():
    x0 = pixels(8)
    with pytest.raises(ValueError, match="vdm"):
        make_objective(KINDS["eps-linear"]).bits_per_dim(zero, x0, None)
    objective = make_objective(KINDS["vdm"])
    bpd = objective.bits_per_dim(zero, x0, None, generator=torch.Generator().manual_seed(0))
    assert isinstance(bpd, float) and math.isfinite(bpd) and bpd > 0
    # The zero predictor's bound: ~ 1/2 (gamma_1 - gamma_0) / ln 2 from the diffusion term.
    assert bpd == pytest.approx(0.5 * 18.3 / math.log(2), rel=0.2)


def test_objective_config_validation_and_conventions():
    with pytest.raises(ValueError, match="cond_dropout"):
        make_objective(ObjectiveConfig(cond_dropout=1.5))
    with pytest.raises(ValueError, match="logit_std"):
        make_objective(ObjectiveConfig(logit_std=0.0))
    with pytest.raises(ValueError, match="num_timesteps"):
        make_objective(ObjectiveConfig(kind="eps", num_timesteps=1))
    assert isinstance(make_objective(KINDS["flow"]).schedule, FlowSchedule)
    assert isinstance(make_objective(KINDS["v-linear"]).schedule, DiscreteVP)
    assert make_objective(KINDS["eps-linear"]).learned_schedule is None
    for kind in ("flow", "eps", "v", "vdm"):
        assert "x0" in OBJECTIVES[kind].time_convention


# ------------------------------------------------------------------ a few real training steps


def tiny_unet() -> UNet:
    cfg = UNetModelConfig(
        in_channels=3,
        context_dim=-1,
        sample_size=8,
        base_channels=16,
        channel_mult=(1, 2),
        attention_resolutions=(),
        head_dim=8,
        ff_mult=0,
        groups=4,
        channels_last=False,
    )
    return UNet(cfg)


def mean_loss(objective: Objective, model, x0, schedule=None, seeds=range(4)) -> float:
    with torch.no_grad():
        values = [
            objective.loss(model, x0, None, None, torch.Generator().manual_seed(s), schedule)
            for s in seeds
        ]
    return sum(v["loss"].item() for v in values) / len(values)


def smooth_images() -> torch.Tensor:
    """(4, 3, 8, 8): ramps, a saddle and a flat image, on the 256 pixel levels."""
    ramp = torch.linspace(-1, 1, 8)
    across, down = ramp.view(1, 8).expand(8, 8), ramp.view(8, 1).expand(8, 8)
    x0 = torch.stack(
        [
            torch.stack([across, down, -across]),
            torch.stack([down] * 3),
            (across * down).expand(3, 8, 8),
            torch.full((3, 8, 8), 0.5),
        ]
    )
    return ((x0 + 1) * 127.5).round() / 127.5 - 1


@pytest.mark.parametrize("kind", ["flow", "eps-linear", "v-cosine", "vdm"])
def test_each_objective_trains_a_few_steps_and_samples(kind):
    objective = make_objective(KINDS[kind])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tiny_unet()
    schedule = objective.learned_schedule
    schedule_params = list(schedule.parameters()) if schedule is not None else []
    optimizer = torch.optim.Adam([*model.parameters(), *schedule_params], lr=2e-3)
    x0 = smooth_images()
    before = mean_loss(objective, model, x0)
    schedule_before = [p.detach().clone() for p in schedule_params]
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        loss = objective.loss(model, x0, None, None, gen)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    after = mean_loss(objective, model, x0)
    assert after < 0.9 * before, (before, after)  # measured ratios 0.33-0.76
    if schedule is not None:  # VDM: the schedule trains with the UNet
        assert any(not torch.equal(a, b) for a, b in zip(schedule_before, schedule_params))

    model.eval()
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    grid = objective.schedule.grid(4)
    with torch.no_grad():
        for clip_x0 in (False, True):
            velocity = cfg_velocity(objective.velocity(model, clip_x0=clip_x0), None, None, 1.0)
            for name, sampler in SAMPLERS.items():
                for eta in (0.0, 0.5) if name == "ddim" else (0.0,):
                    out = sampler(velocity, noise, grid, RowNoise([0, 1]), eta)
                    assert out.shape == noise.shape and torch.isfinite(out).all(), name
                    if clip_x0 and name != "heun":  # the last step lands on x0_hat itself
                        assert out.abs().max() <= 1 + 1e-4, name
