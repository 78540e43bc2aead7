"""Rectified flow matching: the training objective, the samplers and classifier-free guidance.

One time direction everywhere (DESIGN.md; diffusers' ``FlowMatchEulerDiscreteScheduler``):

    x_t = (1 - t) x0 + t noise,   t = 1 is pure noise,   target v = dx_t/dt = noise - x0

Training draws a continuous ``t`` from a logit-normal(mean, std) (Esser et al. 2024, SD3:
``t = sigmoid(n)``, n ~ N(mean, std)) or uniformly, and replaces each sample's condition
by the CLIP export's null condition with probability ``cond_dropout`` (Ho & Salimans 2022).
Randomness comes from torch's global generator (or one passed in), whose state the shared
trainer saves, so a resumed run draws the same numbers.

Samplers share one signature, ``sampler(velocity_fn, noise, steps, shift=1.0) -> x0``, and
integrate dx/dt = v from t = 1 to t = 0 over one grid t_0 = 1 > t_1 > ... > t_N = 0, which
is also where the velocity is evaluated. ``shift`` > 1 spends more steps at high noise:
t' = s t / (1 + (s - 1) t) (SD3, eq. 23), which keeps 0 -> 0 and 1 -> 1 and is monotone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from stages.clip.export import TextCondition

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FlowConfig:
    timesteps: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    cond_dropout: float = 0.1  # probability of training a sample on the null condition


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling defaults recorded in the export (the pipeline's ``sample.toml`` mirrors them)."""

    sampler: Literal["euler", "heun"] = "euler"
    steps: int = 20
    cfg_scale: float = 5.0
    shift: float = 1.0


class FlowMatching:
    """The maths of training: timesteps, interpolation, target, condition dropout, loss."""

    def __init__(self, config: FlowConfig):
        if not 0.0 <= config.cond_dropout <= 1.0:
            raise ValueError(f"flow.cond_dropout must be in [0, 1], got {config.cond_dropout}")
        if config.logit_std <= 0:
            raise ValueError(f"flow.logit_std must be positive, got {config.logit_std}")
        self.config = config

    def sample_t(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B,) continuous times in (0, 1)."""
        if self.config.timesteps == "uniform":
            return torch.rand(batch, device=device, generator=generator)
        n = torch.randn(batch, device=device, generator=generator)
        return torch.sigmoid(self.config.logit_mean + self.config.logit_std * n)

    @staticmethod
    def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x0 + t noise, with t (B,) broadcast over (B, C, h, w)."""
        t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return (1 - t) * x0 + t * noise

    @staticmethod
    def target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def drop_condition(
        self,
        cond: TextCondition,
        null: TextCondition,
        generator: torch.Generator | None = None,
    ) -> tuple[TextCondition, torch.Tensor]:
        """Per sample, the null condition with probability ``cond_dropout``; (cond, dropped)."""
        device = cond.tokens.device
        dropped = torch.rand(len(cond), device=device, generator=generator)
        dropped = dropped < self.config.cond_dropout
        null = null.to(device, cond.tokens.dtype)
        return cond.where(dropped, null), dropped

    def loss(
        self,
        model: Callable[[torch.Tensor, torch.Tensor, TextCondition], torch.Tensor],
        x0: torch.Tensor,
        cond: TextCondition,
        null: TextCondition,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """MSE between the predicted and the true velocity at a random t."""
        cond, dropped = self.drop_condition(cond, null, generator)
        t = self.sample_t(x0.shape[0], x0.device, generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        prediction = model(self.interpolate(x0, noise, t), t, cond)
        loss = F.mse_loss(prediction.float(), self.target(x0, noise).float())
        return {"loss": loss, "dropped": dropped.float().mean().detach()}


# ----------------------------------------------------------------------------- sampling


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift t' = s t / (1 + (s - 1) t): 0 -> 0, 1 -> 1, monotone for s > 0."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def time_grid(steps: int, shift: float = 1.0, device: Any = None) -> torch.Tensor:
    """(steps + 1,) from 1 down to 0: where the velocity is evaluated and the state updated."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


def euler_sample(
    velocity_fn: VelocityFn, noise: torch.Tensor, steps: int, shift: float = 1.0
) -> torch.Tensor:
    """x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i); exact for a constant field."""
    grid = time_grid(steps, shift, noise.device)
    x = noise.float()
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t) * velocity_fn(x, t.expand(x.shape[0])).float()
    return x


def heun_sample(
    velocity_fn: VelocityFn, noise: torch.Tensor, steps: int, shift: float = 1.0
) -> torch.Tensor:
    """Heun (trapezoid) steps: exact for a field linear in t; two evaluations per step."""
    grid = time_grid(steps, shift, noise.device)
    x = noise.float()
    batch = x.shape[0]
    for t, t_next in zip(grid[:-1], grid[1:]):
        dt = t_next - t
        v = velocity_fn(x, t.expand(batch)).float()
        v_next = velocity_fn(x + dt * v, t_next.expand(batch)).float()
        x = x + dt * 0.5 * (v + v_next)
    return x


SAMPLERS: dict[str, Callable[[VelocityFn, torch.Tensor, int, float], torch.Tensor]] = {
    "euler": euler_sample,
    "heun": heun_sample,
}


def cfg_velocity(
    model: Callable[[torch.Tensor, torch.Tensor, TextCondition], torch.Tensor],
    cond: TextCondition,
    uncond: TextCondition,
    scale: float,
) -> VelocityFn:
    """v = v_u + s (v_c - v_u), both branches in one forward over the doubled batch.

    ``uncond`` is batch B or 1 (the null condition, repeated).
    """
    batch = len(cond)
    if len(uncond) == 1 and batch != 1:
        uncond = uncond.expand(batch)
    if len(uncond) != batch:
        raise ValueError(f"uncond has batch {len(uncond)}, cond {batch}")
    both = TextCondition.cat([cond, uncond.to(cond.tokens.device, cond.tokens.dtype)])

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = model(torch.cat([x, x]), torch.cat([t, t]), both)
        v_cond, v_uncond = v.float().chunk(2)
        return v_uncond + scale * (v_cond - v_uncond)

    return velocity


def seeded_noise(shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """(B, *shape) standard normal noise, row i from a CPU generator seeded ``seeds[i]``,
    so an image depends on its seed only, not on the batch or device (as the pipeline)."""
    return torch.cat(
        [torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)) for s in seeds]
    )
