"""Noise schedules: x_u = alpha(u) x0 + sigma(u) noise, for the network's time u in [0, 1].

Every objective is a Gaussian path; each schedule maps the time the network sees, ``u``
(u = 1 is the noise end), to (alpha, sigma):

- ``FlowSchedule``: alpha = 1 - u, sigma = u (rectified flow; the project's convention,
  docs/contributing.md).
- ``DiscreteVP``: DDPM's T-step variance-preserving chain (Ho et al. 2020), u = k / T for
  k = 1..T, alpha_bar_k = prod_{i<=k} (1 - beta_i), alpha = sqrt(alpha_bar),
  sigma = sqrt(1 - alpha_bar); betas linear (1e-4 .. 0.02) or cosine (Nichol & Dhariwal
  2021, eq. 17, s = 0.008, beta clipped at 0.999).
- ``LearnedSchedule``: VDM's (Kingma et al. 2021) monotone network gamma(u) = -log SNR,
  alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma), trained with the UNet.

Samplers work in one shared coordinate, the **flow time** tau = sigma / (alpha + sigma),
where y = x / (alpha + sigma) = (1 - tau) x0 + tau noise is a rectified-flow path for any
schedule (Gao et al. 2024, "Diffusion meets flow matching"). A schedule therefore gives
``flow_time(u)``, its inverse ``model_time(tau)`` and the sampling ``grid(steps, shift)`` in
tau, from the noise end down to exactly 0.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift t' = s t / (1 + (s - 1) t) (eq. 23): 0 -> 0, 1 -> 1, monotone."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def check_steps(steps: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")


class Schedule(Protocol):
    """What objectives and samplers need from a schedule (u and tau are (B,) tensors)."""

    def alpha_sigma(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def model_time(self, tau: torch.Tensor) -> torch.Tensor: ...

    def grid(self, steps: int, shift: float = 1.0, device=None) -> torch.Tensor: ...


def flow_time(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return sigma / (alpha + sigma)


class FlowSchedule:
    """alpha = 1 - u, sigma = u: the flow time is the model time."""

    def alpha_sigma(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 1 - u, u

    def model_time(self, tau: torch.Tensor) -> torch.Tensor:
        return tau

    def grid(self, steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
        """(steps + 1,) from 1 down to 0: where the velocity is evaluated and x updated."""
        check_steps(steps)
        return shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


def ddpm_betas(kind: Literal["linear", "cosine"], steps: int, start: float, end: float):
    """(T,) float64 betas: DDPM's linear ramp, or the cosine alpha-bar of improved DDPM."""
    if kind == "linear":
        return torch.linspace(start, end, steps, dtype=torch.float64)
    s = 0.008  # improved DDPM: keeps beta_1 from being too small near u = 0
    u = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


class DiscreteVP:
    """DDPM's discrete chain; tables are indexed by k = 0..T (k = 0: the data itself)."""

    def __init__(
        self,
        kind: Literal["linear", "cosine"] = "linear",
        steps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ):
        if steps < 2:
            raise ValueError(f"objective.num_timesteps must be at least 2, got {steps}")
        if not 0 < beta_start < beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
        self.steps = steps
        self.betas = ddpm_betas(kind, steps, beta_start, beta_end)
        abar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - self.betas, 0)])
        self.alpha_bar = abar  # (T + 1,), alpha_bar[0] = 1
        self.tau = flow_time(abar.sqrt(), (1 - abar).sqrt())  # (T + 1,) increasing, tau[0] = 0

    def index(self, u: torch.Tensor) -> torch.Tensor:
        return (u.double() * self.steps).round().long().clamp(0, self.steps)

    def alpha_sigma(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.alpha_bar.to(u.device)[self.index(u)]
        return abar.sqrt().to(u.dtype), (1 - abar).sqrt().to(u.dtype)

    def model_time(self, tau: torch.Tensor) -> torch.Tensor:
        """The step k whose tau_k is nearest (grids are built from the table: exact)."""
        table = self.tau.to(tau.device)
        k = torch.searchsorted(table, tau.double()).clamp(1, self.steps)
        k = torch.where((tau - table[k - 1]).abs() < (table[k] - tau).abs(), k - 1, k)
        return (k.double() / self.steps).to(tau.dtype)

    def sample_u(self, batch: int, device, generator=None) -> torch.Tensor:
        """k uniform in 1..T (DDPM's L_simple), as u = k / T."""
        k = torch.randint(1, self.steps + 1, (batch,), device=device, generator=generator)
        return k.float() / self.steps

    def grid(self, steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
        """Strided ("trailing") steps T = k_0 > k_1 > ... > k_{n-1} >= 1, then tau = 0.

        ``steps = T`` is DDPM's full chain; fewer is DDIM's strided sub-sequence.
        """
        check_steps(steps)
        if steps > self.steps:
            raise ValueError(f"steps {steps} exceeds the schedule's {self.steps} timesteps")
        u = shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1], shift)
        ks = torch.unique((u * self.steps).round().long().clamp(1, self.steps))
        ks = ks.flip(0)
        tau = torch.cat([self.tau[ks], torch.zeros(1, dtype=torch.float64)])
        return tau.float().to(device)


class PositiveLinear(nn.Linear):
    """A linear map with softplus(weight) > 0: a monotone increasing function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.softplus(self.weight), self.bias)


class VarianceGradient:
    """VDM's gradient for the shape of a learned schedule (Kingma et al. 2021, appendix I.2).

    The continuous-time bound depends on gamma only through its endpoints, so the gradient
    of the bound with respect to the shape in between is zero in expectation: pure noise.
    The paper trains the endpoints on the bound and the shape to minimise the variance of
    the diffusion loss estimator instead. Since E[L] does not depend on the shape,
    d Var[L] / d eta = E[2 L dL / d eta]: the per-sample gradient that reaches the
    normalised shape s(u_i) and its derivative s'(u_i) is multiplied by 2 L_i, in the same
    backward pass. ``set(losses)`` gives the (B,) per-sample diffusion losses, in the units
    of the loss that is backpropagated, once they are known (before ``backward``).
    """

    def __init__(self) -> None:
        self.factor: torch.Tensor | None = None

    def set(self, losses: torch.Tensor) -> None:
        self.factor = 2.0 * losses.detach().double()

    def hook(self, grad: torch.Tensor) -> torch.Tensor:
        """(N,) gradient of s(u) or s'(u) -> its first B entries scaled by 2 L_i."""
        if self.factor is None:
            raise RuntimeError("VarianceGradient.set(losses) must be called before backward")
        n = self.factor.numel()
        return torch.cat([grad[:n] * self.factor, grad[n:]])


class LearnedSchedule(nn.Module):
    """VDM's gamma(u) = -log SNR(u), monotone in u, trained with the UNet (Kingma et al.
    2021, appendix H): g(u) = l1(u) + l3(sigmoid(l2(l1(u)))) with positive weights, then

        gamma(u) = gamma_0 + (gamma_1 - gamma_0) (g(u) - g(0)) / (g(1) - g(0))

    with learned endpoints gamma_0 < gamma_1 (gamma_1 = gamma_0 + softplus(raw)). The
    derivative d gamma / du, which the continuous-time loss weighs by, is computed in closed
    form in the same forward, so no double backward is needed. Given a ``VarianceGradient``,
    the shape's parameters (l1, l2, l3) learn to minimise the loss's variance while the
    endpoints still learn from the bound.
    """

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0, hidden: int = 1024):
        super().__init__()
        if gamma_max <= gamma_min:
            raise ValueError(f"need gamma_min < gamma_max, got {gamma_min}, {gamma_max}")
        self.gamma_0 = nn.Parameter(torch.tensor(float(gamma_min)))
        span = gamma_max - gamma_min
        self.span_raw = nn.Parameter(torch.tensor(span + math.log(-math.expm1(-span))))
        self.l1 = PositiveLinear(1, 1)
        self.l2 = PositiveLinear(1, hidden)
        self.l3 = PositiveLinear(hidden, 1)
        nn.init.constant_(self.l1.weight, 0.5413)  # softplus -> 1: g starts near linear

    def _g(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) -> g(u), dg/du in float64; the chain rule written out (weights positive).

        float64 because g carries a large offset (l3 sums ``hidden`` positive terms) that
        the normalisation subtracts: in float32 a flattened schedule would round to steps.
        (l3's bias cancels in that normalisation; it is kept for the export format.)
        """
        w1 = F.softplus(self.l1.weight.double())[0, 0]
        w2 = F.softplus(self.l2.weight.double())[:, 0]  # (H,)
        w3 = F.softplus(self.l3.weight.double())[0]  # (H,)
        h = u.double() * w1 + self.l1.bias.double()  # (N,)
        s = torch.sigmoid(h[:, None] * w2 + self.l2.bias.double())  # (N, H)
        g = h + s @ w3 + self.l3.bias.double()
        dg = w1 + (s * (1 - s) * w2 * w3).sum(-1) * w1
        return g, dg

    def forward(
        self, u: torch.Tensor, variance: VarianceGradient | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) -> gamma(u), d gamma / du, both (B,) float32; one call (DDP-friendly)."""
        ends = torch.tensor([0.0, 1.0], device=u.device, dtype=torch.float64)
        g, dg = self._g(torch.cat([u.double(), ends]))
        g_u, g_0, g_1 = g[:-2], g[-2], g[-1]
        shape = (g_u - g_0) / (g_1 - g_0)  # s(u) in [0, 1], s(0) = 0, s(1) = 1
        dshape = dg[:-2] / (g_1 - g_0)  # s'(u)
        if variance is not None and shape.requires_grad:
            shape.register_hook(variance.hook)
            dshape.register_hook(variance.hook)
        span = F.softplus(self.span_raw.double())
        gamma = self.gamma_0.double() + span * shape
        return gamma.float(), (span * dshape).float()

    def gamma(self, u: torch.Tensor) -> torch.Tensor:
        return self(u)[0]

    def alpha_sigma(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gamma = self.gamma(u)
        return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()

    @torch.no_grad()
    def model_time(self, tau: torch.Tensor) -> torch.Tensor:
        """Invert tau(u) by bisection: tau / (1 - tau) = sigma / alpha = exp(gamma / 2)."""
        target = 2 * torch.log(tau.double().clamp(1e-12, 1 - 1e-12) / (1 - tau.double()))
        lo, hi = torch.zeros_like(target), torch.ones_like(target)
        for _ in range(40):  # 2^-40: far below any step size
            mid = (lo + hi) / 2
            below = self.gamma(mid.float()).double() < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return ((lo + hi) / 2).to(tau.dtype)

    @torch.no_grad()
    def grid(self, steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
        """tau(u) at u = 1, ..., 1/steps (uniform in u, as VDM samples), then exactly 0."""
        check_steps(steps)
        u = shift_time(torch.linspace(1.0, 0.0, steps + 1), shift)[:-1]
        alpha, sigma = self.alpha_sigma(u.to(self.gamma_0.device))
        return torch.cat([flow_time(alpha, sigma).cpu(), torch.zeros(1)]).to(device)
