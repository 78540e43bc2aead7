"""Training objectives: what the network predicts, at which noise levels, with which loss.

One class per objective behind one interface (``Objective``), chosen by ``make_objective``
from ``ObjectiveConfig.kind``; each holds its schedule (``schedules.py``):

- ``Flow`` (the default): rectified flow, as minRF's RF. x_t = (1 - t) x0 + t noise, the
  network predicts v = noise - x0, t logit-normal (SD3) or uniform.
- ``DDPMEps`` / ``DDPMV``: DDPM's discrete chain (Ho et al. 2020), the target the noise
  (L_simple, eq. 14) or v = alpha noise - sigma x0 (Salimans & Ho 2022, eq. 8/9).
- ``VDM``: continuous-time VDM (Kingma et al. 2021), a learned schedule and the variational
  bound itself as the loss, in bits per dimension of 8-bit pixels.

Shared by all: per-sample condition dropout to the null condition (Ho & Salimans 2022), the
order of the random draws (dropout, times, noise: resume replays it), and ``velocity``, which
turns any of these networks into the flow velocity the samplers integrate (``samplers.py``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .schedules import DiscreteVP, FlowSchedule, LearnedSchedule, Schedule, VarianceGradient


@dataclass(frozen=True)
class ObjectiveConfig:
    kind: Literal["flow", "eps", "v", "vdm"] = "flow"
    cond_dropout: float = 0.1  # probability of training a sample on the null condition
    # flow: the distribution of t
    timesteps: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # eps and v: DDPM's discrete chain
    beta_schedule: Literal["linear", "cosine"] = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # vdm: initial endpoints of the learned gamma = -log SNR
    gamma_min: float = -13.3
    gamma_max: float = 5.0
    # vdm: what trains the schedule's shape between its endpoints: "variance" (the paper's:
    # minimise the diffusion loss's variance; the bound's gradient there is only noise) or
    # "bound" (the bound's own gradient, as most reimplementations do)
    shape_gradient: Literal["variance", "bound"] = "variance"


# ``model(x_u, u, cond)`` is the UNet: u in [0, 1] (1 is noise), cond None when unconditional.
Model = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def _bcast(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) in ``like``'s dtype."""
    return value.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


class Objective(ABC):
    """What the stage, the evaluator and the exports use of an objective. A subclass sets
    ``self.schedule`` and gives ``sample_u``, ``loss`` and ``denoised``; the rest is shared."""

    time_convention: str  # one line for the export's manifest: the network's input and output
    schedule: Schedule

    def __init__(self, config: ObjectiveConfig):
        if not 0.0 <= config.cond_dropout <= 1.0:
            raise ValueError(f"objective.cond_dropout must be in [0, 1], got {config.cond_dropout}")
        if config.logit_std <= 0:
            raise ValueError(f"objective.logit_std must be positive, got {config.logit_std}")
        self.config = config

    @property
    def learned_schedule(self) -> LearnedSchedule | None:
        """The trainable schedule module (VDM's), which the stage trains with the UNet."""
        return None

    @abstractmethod
    def sample_u(self, batch: int, device: torch.device, generator=None) -> torch.Tensor:
        """(B,) network times for a training batch."""

    @abstractmethod
    def loss(
        self,
        model: Model,
        x0: torch.Tensor,
        cond: Any,
        null: Any,
        generator: torch.Generator | None = None,
        schedule: LearnedSchedule | None = None,
    ) -> dict[str, torch.Tensor]:
        """x0 (B, C, H, W) -> {"loss": the loss to backpropagate, ...: terms to log}.

        ``schedule``: the learned schedule as the trainer holds it (wrapped for DDP); the
        objective's own one otherwise. Randomness from torch's global generator (saved in
        checkpoints) or ``generator``.
        """

    @abstractmethod
    def denoised(
        self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x0_hat, noise_hat) a prediction at x = alpha x0 + sigma noise stands for."""

    def bits_per_dim(
        self, model: Model, x0: torch.Tensor, cond: Any, schedule=None, generator=None, repeats=1
    ) -> float:
        """The variational bound in bits per dimension (``VDM``'s); the others have none."""
        raise ValueError("bits per dimension is reported by the vdm objective only")

    # ---------------------------------------------------------------- shared

    def draw(
        self, x0: torch.Tensor, cond: Any, null: Any, generator=None
    ) -> tuple[Any, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """A training batch's random draws, in the order resume replays them: condition
        dropout, times, noise. -> (cond, u, noise, terms to log)."""
        cond, dropped = self.drop_condition(cond, null, generator)
        u = self.sample_u(x0.shape[0], x0.device, generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        logged = {"dropped": dropped.float().mean().detach()} if dropped.numel() else {}
        return cond, u, noise, logged

    def drop_condition(self, cond: Any, null: Any, generator=None) -> tuple[Any, torch.Tensor]:
        """Per sample, the null condition with probability ``cond_dropout``; (cond, dropped)."""
        if cond is None:  # unconditional: nothing to drop
            return None, torch.zeros(0)
        device = cond.tokens.device
        dropped = torch.rand(len(cond), device=device, generator=generator)
        dropped = dropped < self.config.cond_dropout
        null = null.to(device, cond.tokens.dtype)
        return cond.where(dropped, null), dropped

    def velocity(
        self, model: Model, schedule: Schedule | None = None, clip_x0: bool = False
    ) -> Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]:
        """The network as a flow velocity ``(y, tau, cond) -> v`` for the samplers:
        x = (alpha + sigma) y, (x0_hat, noise_hat) from the prediction, v = noise_hat - x0_hat;
        ``clip_x0`` clamps x0_hat to [-1, 1] first (pixel space)."""
        schedule = schedule if schedule is not None else self.schedule

        def velocity(y: torch.Tensor, tau: torch.Tensor, cond: Any) -> torch.Tensor:
            if bool((tau == tau[0]).all()):  # samplers pass one time for the whole batch:
                u = schedule.model_time(tau[:1]).expand(tau.shape[0])  # invert it once (VDM)
            else:
                u = schedule.model_time(tau)
            alpha, sigma = schedule.alpha_sigma(u)
            a, s = _bcast(alpha, y).float(), _bcast(sigma, y).float()
            x = (a + s) * y
            prediction = model(x.to(y.dtype), u, cond).float()
            x0, eps = self.denoised(x, a, s, prediction)
            if clip_x0:  # DDPM's clip_denoised: clamp x0_hat, re-derive eps_hat from it
                x0 = x0.clamp(-1, 1)
                eps = torch.where(s > 1e-8, (x - a * x0) / s.clamp(min=1e-8), eps)
            return eps - x0

        return velocity


class Flow(Objective):
    """Rectified flow (minRF's RF, SD3): x_t = (1 - t) x0 + t noise, predict v = noise - x0,
    MSE; t logit-normal or uniform."""

    time_convention = "x_t = (1 - t) x0 + t noise; predicts v = noise - x0; t = 1 is noise"

    def __init__(self, config: ObjectiveConfig):
        super().__init__(config)
        self.schedule = FlowSchedule()

    def sample_u(self, batch: int, device: torch.device, generator=None) -> torch.Tensor:
        cfg = self.config
        if cfg.timesteps == "uniform":
            return torch.rand(batch, device=device, generator=generator)
        n = torch.randn(batch, device=device, generator=generator)
        return torch.sigmoid(cfg.logit_mean + cfg.logit_std * n)

    def loss(self, model, x0, cond, null, generator=None, schedule=None):
        cond, t, noise, logged = self.draw(x0, cond, null, generator)
        x_t = _bcast(1 - t, x0) * x0 + _bcast(t, x0) * noise
        v = model(x_t, t, cond)
        return {"loss": F.mse_loss(v.float(), (noise - x0).float()), **logged}

    def target(self, x0, noise, alpha, sigma):
        return noise - x0  # d x_t / dt

    def denoised(self, x, alpha, sigma, prediction):  # alpha + sigma = 1
        return x - sigma * prediction, x + alpha * prediction

    def velocity(self, model, schedule=None, clip_x0=False):
        if not clip_x0:  # the network already predicts v in flow time
            return model
        return super().velocity(model, schedule, clip_x0)


class DDPM(Objective):
    """DDPM's chain: x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) noise, k uniform in 1..T
    (u = k / T), an MSE to ``target``; linear or cosine betas. Subclasses: what it predicts."""

    schedule: DiscreteVP

    def __init__(self, config: ObjectiveConfig):
        super().__init__(config)
        self.schedule = DiscreteVP(
            config.beta_schedule, config.num_timesteps, config.beta_start, config.beta_end
        )

    def sample_u(self, batch: int, device: torch.device, generator=None) -> torch.Tensor:
        return self.schedule.sample_u(batch, device, generator)

    def loss(self, model, x0, cond, null, generator=None, schedule=None):
        cond, u, noise, logged = self.draw(x0, cond, null, generator)
        alpha, sigma = self.schedule.alpha_sigma(u)
        x_u = _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * noise
        prediction = model(x_u, u, cond)
        target = self.target(x0, noise, alpha, sigma)
        return {"loss": F.mse_loss(prediction.float(), target.float()), **logged}

    @abstractmethod
    def target(
        self, x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor: ...


class DDPMEps(DDPM):
    """DDPM predicting the noise (L_simple)."""

    time_convention = "x_u = alpha x0 + sigma noise (DDPM chain, u = k / T); predicts noise"

    def target(self, x0, noise, alpha, sigma):
        return noise

    def denoised(self, x, alpha, sigma, prediction):
        return (x - sigma * prediction) / alpha, prediction


class DDPMV(DDPM):
    """DDPM predicting v = alpha noise - sigma x0, the angular derivative of x_u."""

    time_convention = (
        "x_u = alpha x0 + sigma noise (DDPM chain, u = k / T); predicts alpha noise - sigma x0"
    )

    def target(self, x0, noise, alpha, sigma):
        return _bcast(alpha, x0) * noise - _bcast(sigma, x0) * x0

    def denoised(self, x, alpha, sigma, prediction):  # alpha^2 + sigma^2 = 1
        return alpha * x - sigma * prediction, sigma * x + alpha * prediction


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """log P(x) per element for x on the 256 levels 2k/255 - 1 under N(mean, scale^2)
    integrated over each level's bin (the end bins extend to +-inf), as DDPM's decoder."""
    centred = x - mean
    upper = _std_normal_cdf((centred + 1 / 255) / scale)
    lower = _std_normal_cdf((centred - 1 / 255) / scale)
    upper = torch.where(x > 0.999, torch.ones_like(upper), upper)
    lower = torch.where(x < -0.999, torch.zeros_like(lower), lower)
    return torch.log((upper - lower).clamp(min=1e-12))


def vdm_diffusion(
    model: Model,
    x0: torch.Tensor,
    cond: Any,
    u: torch.Tensor,
    noise: torch.Tensor,
    gamma: torch.Tensor,
    dgamma: torch.Tensor,
) -> torch.Tensor:
    """VDM's per-sample diffusion term (eq. 17), (B,) nats: 1/2 gamma'(u) ||noise - noise_hat||^2
    at z_u = alpha x0 + sigma noise, alpha^2 = sigmoid(-gamma(u))."""
    alpha, sigma = torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()
    x_u = _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * noise
    noise_hat = model(x_u, u, cond).float()
    return 0.5 * dgamma * (noise - noise_hat).square().flatten(1).sum(1)


class VDM(Objective):
    """Continuous-time VDM: a learned gamma(u) = -log SNR (a ``LearnedSchedule`` module
    trained jointly), noise prediction, and the variational bound as the loss, in bits per
    dimension of 8-bit pixels:

        L = KL(q(z_1|x) || N(0, I))                                   prior, eq. 10
          + E_u [ 1/2 gamma'(u) ||noise - noise_hat(z_u, u)||^2 ]        diffusion, eq. 17
          - log p(x | z_0)                                            reconstruction

    with u drawn by low-discrepancy sampling (u_i = (u0 + i / B) mod 1, VDM appendix) and
    p(x | z_0) the discretised Gaussian of DDPM (Ho et al. section 3.3) over 256 levels.
    The schedule's endpoints learn from L, its shape from the variance of the diffusion term
    (VDM appendix I.2, ``schedules.VarianceGradient``; ``shape_gradient = "bound"``: from L).
    """

    time_convention = "x_u = alpha x0 + sigma noise, alpha^2 = sigmoid(-gamma(u)); predicts noise"
    schedule: LearnedSchedule

    def __init__(self, config: ObjectiveConfig):
        super().__init__(config)
        self.schedule = LearnedSchedule(config.gamma_min, config.gamma_max)

    @property
    def learned_schedule(self) -> LearnedSchedule:
        return self.schedule

    def sample_u(self, batch: int, device: torch.device, generator=None) -> torch.Tensor:
        # low-discrepancy: one uniform offset, B evenly spaced times
        u0 = torch.rand(1, device=device, generator=generator)
        return (u0 + torch.arange(batch, device=device) / batch) % 1.0

    def loss(self, model, x0, cond, null, generator=None, schedule=None):
        cond, u, noise, logged = self.draw(x0, cond, null, generator)
        return {**self.bound(model, x0, cond, u, noise, schedule, generator), **logged}

    denoised = DDPMEps.denoised  # both predict the noise

    def bound(self, model, x0, cond, u, noise, schedule, generator) -> dict[str, torch.Tensor]:
        """L at the drawn (u, noise), its terms in bits per dimension and the endpoints."""
        schedule = schedule if schedule is not None else self.schedule
        ends = torch.tensor([0.0, 1.0], device=x0.device)
        variance = VarianceGradient() if self.config.shape_gradient == "variance" else None
        gamma_all, dgamma_all = schedule(torch.cat([u, ends]), variance)  # one call: DDP
        gamma, dgamma = gamma_all[:-2], dgamma_all[:-2]
        gamma_0, gamma_1 = gamma_all[-2], gamma_all[-1]
        dims = x0[0].numel()
        diffusion = vdm_diffusion(model, x0, cond, u, noise, gamma, dgamma)
        # KL(N(alpha_1 x, sigma_1^2) || N(0, 1)) per element, summed: the prior term.
        var_1 = torch.sigmoid(gamma_1)
        kl = 0.5 * (var_1 + (1 - var_1) * x0.float().square() - torch.log(var_1) - 1)
        prior = kl.flatten(1).sum(1)
        # -log p(x | z_0), z_0 = alpha_0 x + sigma_0 eps: decoder N(z_0 / alpha_0, snr_0^-1).
        eps_0 = torch.randn(x0.shape, device=x0.device, generator=generator)
        scale_0 = torch.exp(0.5 * gamma_0)  # sigma_0 / alpha_0
        mean_0 = x0.float() + scale_0 * eps_0
        recon = -discretized_gaussian_log_likelihood(x0.float(), mean_0, scale_0)
        recon = recon.flatten(1).sum(1)
        to_bpd = 1.0 / (dims * math.log(2))
        if variance is not None:  # per-sample diffusion losses in the units of "loss" below
            variance.set(diffusion * to_bpd)
        total = (diffusion + prior + recon) * to_bpd
        return {
            "loss": total.mean(),
            "bpd": total.mean().detach(),
            "bpd_diffusion": (diffusion * to_bpd).mean().detach(),
            "bpd_prior": (prior * to_bpd).mean().detach(),
            "bpd_recon": (recon * to_bpd).mean().detach(),
            "gamma_0": gamma_0.detach(),
            "gamma_1": gamma_1.detach(),
        }

    @torch.no_grad()
    def bits_per_dim(
        self, model: Model, x0: torch.Tensor, cond: Any, schedule=None, generator=None, repeats=1
    ) -> float:
        """The bound in bits per dimension on a batch of 8-bit images, averaged over
        ``repeats`` draws of (u, noise) (an unbiased estimate of the bound)."""
        values = []
        for _ in range(repeats):
            u = self.sample_u(x0.shape[0], x0.device, generator)
            noise = torch.randn(x0.shape, device=x0.device, generator=generator)
            values.append(self.bound(model, x0, cond, u, noise, schedule, generator)["bpd"])
        return float(torch.stack(values).mean())


OBJECTIVES: dict[str, type[Objective]] = {"flow": Flow, "eps": DDPMEps, "v": DDPMV, "vdm": VDM}


def make_objective(config: ObjectiveConfig) -> Objective:
    """The objective ``config.kind`` names."""
    return OBJECTIVES[config.kind](config)
