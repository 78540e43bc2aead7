"""Samplers, classifier-free guidance and seeded noise, for every objective.

All samplers share one signature and one coordinate system:

    sampler(velocity_fn, noise, grid, rng=None, eta=0.0, init=None) -> x0

``velocity_fn(y, tau) -> v`` is the flow velocity v = noise - x0 of the state
y = (1 - tau) x0 + tau noise (``objectives.Objective.velocity`` turns any trained network
into one; for flow matching it is the network itself). ``grid`` (steps + 1,) is the
schedule's flow-time grid from the noise end down to exactly 0 (``Schedule.grid``); the
sampler starts from y = grid[0] * noise, or, given ``init`` (image-to-image: the latents of
an image, on a grid cut by ``partial_grid``), from y = (1 - grid[0]) init + grid[0] noise,
the path's own state at that time. In this coordinate (x0_hat, eps_hat) =
(y - tau v, y + (1 - tau) v), and the classic updates read:

- Euler: y' = y + (tau' - tau) v. For any Gaussian schedule this *is* DDIM with eta = 0
  (Song et al. 2021, eq. 12, rewritten in y), which is why flow matching needs no other.
- Heun: the trapezoid rule, two evaluations per step.
- DDIM (eq. 12 with sigma_eta = eta * sqrt(posterior variance), eq. 16):
  y' = (1 - tau') x0_hat + sqrt(tau'^2 - c^2) eps_hat + c z,   c = eta * sqrt(var)
- Ancestral (DDPM, Ho et al. eq. 6-7): y' ~ q(y' | y, x0_hat), the Gaussian posterior of
  the path, mean (a tau'^2 / tau^2) y + ((1 - tau') v_ts / tau^2) x0_hat, variance
  v_ts tau'^2 / tau^2, where a = (1 - tau) / (1 - tau') and v_ts = tau^2 - a^2 tau'^2.
  The path in y is the DDPM chain rescaled per step, so on DDPM's own grid this is
  exactly DDPM's update, and it equals DDIM with eta = 1.

Classifier-free guidance is a wrapper around the velocity (``cfg_velocity``, k-diffusion
style), so every sampler and objective gets it, and so does its **guidance interval**
(Kynkäänniemi et al. 2024): guidance only where the flow time tau of an evaluation lies in
``[lo, hi]``; elsewhere the conditional branch alone runs, on half the batch. ``(0, 1)``
guides every evaluation (the classic sampler, bit for bit).

Stochastic samplers draw z from ``rng`` (a ``RowNoise``: one CPU generator per image, so an
image depends on its seed only, never on the batch it was drawn in).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SamplerName = Literal["euler", "heun", "ddim", "ancestral"]
SAMPLER_NAMES: tuple[SamplerName, ...] = get_args(
    SamplerName
)  # what configs, CLI and server accept


@dataclass(frozen=True)
class SamplerConfig:
    """Sampling defaults recorded in the export (the pipeline's ``sample.toml`` mirrors them)."""

    sampler: SamplerName = "euler"
    steps: int = 20
    cfg_scale: float = 5.0
    shift: float = 1.0
    eta: float = 0.0  # DDIM's noise: 0 deterministic, 1 = ancestral; only for "ddim"
    clip_x0: bool = False  # clamp x0_hat to [-1, 1] at every step (pixel space, as DDPM)
    # Flow times [lo, hi] at which guidance applies; (0, 1): every evaluation.
    cfg_interval: tuple[float, float] = (0.0, 1.0)


FULL_INTERVAL = (0.0, 1.0)


def check_cfg_interval(interval: Sequence[float]) -> tuple[float, float]:
    """``interval`` as a (lo, hi) tuple of floats; a clear error unless 0 <= lo <= hi <= 1."""
    values = tuple(interval)
    if len(values) != 2:
        raise ValueError(f"cfg_interval must be two flow times [lo, hi], got {list(values)}")
    lo, hi = (float(v) for v in values)
    if not (0.0 <= lo <= 1.0 and 0.0 <= hi <= 1.0):
        raise ValueError(f"cfg_interval [{lo:g}, {hi:g}]: both ends must be in [0, 1]")
    if lo > hi:
        raise ValueError(f"cfg_interval [{lo:g}, {hi:g}]: lo must not exceed hi")
    return lo, hi


def check_sampling(
    sampler: str, steps: int, eta: float, cfg_interval: Sequence[float] = FULL_INTERVAL
) -> None:
    """Clear errors for settings no sampler accepts."""
    check_cfg_interval(cfg_interval)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (known: {', '.join(SAMPLERS)})")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if eta and sampler != "ddim":
        raise ValueError(f"eta = {eta} applies to the ddim sampler only, not {sampler!r}")


class RowNoise:
    """Standard normal draws whose row i comes from its own generator seeded ``seeds[i]``."""

    def __init__(self, seeds: Sequence[int], offset: int = 1):
        # offset: the initial noise uses the seed itself; later draws use other streams.
        self.generators = [torch.Generator().manual_seed(s + offset * 7919) for s in seeds]

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        rows = [torch.randn(like.shape[1:], generator=g) for g in self.generators]
        return torch.stack(rows).to(like.device, like.dtype)


def seeded_noise(shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """(B, *shape) standard normal noise, row i from a CPU generator seeded ``seeds[i]``,
    so an image depends on its seed only, not on the batch or device (as the pipeline)."""
    return torch.cat(
        [torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)) for s in seeds]
    )


def partial_grid(grid: torch.Tensor, strength: float) -> torch.Tensor:
    """Image-to-image's part of a sampling grid: from flow time t = strength * grid[0] down.

    For flow matching grid[0] = 1, so t = strength (DDPM's and VDM's grids start just below
    1). The points of ``grid`` below t are kept as they are (DDPM's network times stay on its
    table), so about strength * steps steps run. Strength 1 gives ``grid`` itself, strength 0
    the single point 0 (no step: the sampler returns ``init``).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if strength == 1.0:
        return grid
    if strength == 0.0:
        return grid[-1:]
    start = grid[:1] * strength
    # A grid point within float32 rounding of the start would make a zero-length step; the
    # final 0 always stays.
    below = grid[grid < start - 1e-6]
    return torch.cat([start, below if below.numel() else grid[-1:]])


def _start(noise: torch.Tensor, grid: torch.Tensor, init: torch.Tensor | None) -> torch.Tensor:
    if init is None:
        return grid[0] * noise.float()
    return (1 - grid[0]) * init.float() + grid[0] * noise.float()


def _draw(rng: RowNoise | None, like: torch.Tensor) -> torch.Tensor:
    return torch.randn_like(like) if rng is None else rng(like)


def euler_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    grid: torch.Tensor,
    rng: RowNoise | None = None,
    eta: float = 0.0,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """y_{i+1} = y_i + (tau_{i+1} - tau_i) v(y_i, tau_i); exact for a constant field."""
    y = _start(noise, grid, init)
    for tau, tau_next in zip(grid[:-1], grid[1:]):
        y = y + (tau_next - tau) * velocity_fn(y, tau.expand(y.shape[0])).float()
    return y


def heun_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    grid: torch.Tensor,
    rng: RowNoise | None = None,
    eta: float = 0.0,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Heun (trapezoid) steps: exact for a field linear in tau; two evaluations per step."""
    y = _start(noise, grid, init)
    batch = y.shape[0]
    for tau, tau_next in zip(grid[:-1], grid[1:]):
        dt = tau_next - tau
        v = velocity_fn(y, tau.expand(batch)).float()
        v_next = velocity_fn(y + dt * v, tau_next.expand(batch)).float()
        y = y + dt * 0.5 * (v + v_next)
    return y


def _posterior(tau: torch.Tensor, tau_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, v_ts) of the path y: alpha_{t|s} = (1 - tau) / (1 - tau'), and
    sigma_{t|s}^2 = tau^2 - alpha_{t|s}^2 tau'^2 (VDM eq. 3 with alpha = 1 - tau, sigma = tau)."""
    a = (1 - tau) / (1 - tau_next)
    return a, (tau**2 - a**2 * tau_next**2).clamp(min=0)


def ddim_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    grid: torch.Tensor,
    rng: RowNoise | None = None,
    eta: float = 0.0,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): deterministic at eta = 0, DDPM-like at eta = 1."""
    y = _start(noise, grid, init)
    for tau, tau_next in zip(grid[:-1], grid[1:]):
        v = velocity_fn(y, tau.expand(y.shape[0])).float()
        x0, eps = y - tau * v, y + (1 - tau) * v
        _, v_ts = _posterior(tau, tau_next)
        c = eta * (v_ts * tau_next**2 / tau**2).sqrt()
        y = (1 - tau_next) * x0 + (tau_next**2 - c**2).clamp(min=0).sqrt() * eps
        if eta > 0 and tau_next > 0:
            y = y + c * _draw(rng, y)
    return y


def ancestral_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    grid: torch.Tensor,
    rng: RowNoise | None = None,
    eta: float = 0.0,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDPM's ancestral sampling: y' ~ q(y' | y, x0_hat) over the grid (full or strided)."""
    y = _start(noise, grid, init)
    for tau, tau_next in zip(grid[:-1], grid[1:]):
        v = velocity_fn(y, tau.expand(y.shape[0])).float()
        x0 = y - tau * v
        a, v_ts = _posterior(tau, tau_next)
        mean = (a * tau_next**2 / tau**2) * y + ((1 - tau_next) * v_ts / tau**2) * x0
        y = mean
        if tau_next > 0:
            y = y + (v_ts * tau_next**2 / tau**2).sqrt() * _draw(rng, y)
    return y


SAMPLERS: dict[SamplerName, Callable[..., torch.Tensor]] = {
    "euler": euler_sample,
    "heun": heun_sample,
    "ddim": ddim_sample,
    "ancestral": ancestral_sample,
}
assert tuple(SAMPLERS) == SAMPLER_NAMES


def evaluation_times(sampler: str, grid: torch.Tensor) -> list[float]:
    """The flow times at which ``sampler`` evaluates the velocity on ``grid``, in order
    (found by running it on a zero field: the samplers' time points do not depend on it)."""
    times: list[float] = []

    def record(y: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        times.append(float(tau[0]))
        return torch.zeros_like(y)

    SAMPLERS[sampler](record, torch.zeros(1, 1, 1, 1), grid.cpu())
    return times


def guided_rows(times: Sequence[float], interval: Sequence[float], guided: bool = True) -> int:
    """UNet rows per image over ``times``: 2 inside the guidance interval, 1 outside (and
    everywhere when nothing is guided: scale 1 or no text)."""
    lo, hi = check_cfg_interval(interval)
    return sum(2 if guided and lo <= t <= hi else 1 for t in times)


def cfg_velocity(
    model: Callable[..., torch.Tensor],
    cond: Any,
    uncond: Any,
    scale: float,
    interval: Sequence[float] = FULL_INTERVAL,
):
    """v = v_u + s (v_c - v_u), both branches in one forward over the doubled batch.

    ``model(y, tau, cond) -> v`` (an ``Objective.velocity``); ``cond`` a ``TextCondition``
    of batch B, ``uncond`` batch B or 1 (the null condition, repeated). With ``cond`` None
    (an unconditional model) or ``scale`` 1 a single forward is exact and is what runs.
    ``interval`` = [lo, hi] in flow time: an evaluation at tau outside it runs the
    conditional branch alone (batch B instead of 2B), i.e. guidance scale 1 there.
    """
    lo, hi = check_cfg_interval(interval)
    if cond is None:
        return lambda y, tau: model(y, tau, None)
    if scale == 1.0:
        return lambda y, tau: model(y, tau, cond)
    batch = len(cond)
    if len(uncond) == 1 and batch != 1:
        uncond = uncond.expand(batch)
    if len(uncond) != batch:
        raise ValueError(f"uncond has batch {len(uncond)}, cond {batch}")
    both = type(cond).cat([cond, uncond.to(cond.tokens.device, cond.tokens.dtype)])

    def velocity(y: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        # tau (B,): the samplers evaluate the whole batch at one time, so row 0 decides.
        if not lo <= float(tau[0]) <= hi:
            return model(y, tau, cond).float()
        v = model(torch.cat([y, y]), torch.cat([tau, tau]), both)
        v_cond, v_uncond = v.float().chunk(2)
        return v_uncond + scale * (v_cond - v_uncond)

    return velocity
