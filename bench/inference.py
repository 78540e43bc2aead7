"""20-step Euler sampling with classifier-free guidance: UNet only, and end to end.

UNet only. Ours: ``euler_sample(cfg_velocity(unet, cond, null, s), noise,
FlowSchedule().grid(steps))``, the pipeline's call (one forward over the doubled batch per
step). Peer: the diffusers pipeline loop, ``FlowMatchEulerDiscreteScheduler`` (shift 1)
with ``torch.cat([latents] * 2)`` into ``UNet2DConditionModel`` and ``scheduler.step`` per
step.

End to end: text encoder -> sampling -> VAE decode (the pipeline's maths, without PNG
writing). Both sides use *our* text encoder (transformers' CLIPTextModel is not installed
here); ours decodes with our ``AutoencoderKL`` after undoing the latent normalisation, the
peer with diffusers' ``AutoencoderKL`` after dividing by its scaling factor. Token ids are
made up front: tokenisation is not timed.

On a CPU a 512 px step costs 15-30 s on 2 busy cores, so unless ``--full`` the samplers run
one step (the same work as each of the 20) and the reported time is the 20-step figure:
total + 19 x the sampling loop's own time; end to end runs at batch 1 only (a 512 px VAE
decode per image takes over a minute). On a GPU and with ``--full`` the 20 steps run as they
are, at batch 1 and 4. UNet sampling runs under bf16 autocast on a GPU and the VAE decode in
fp32, as in the pipeline; on a CPU with native bf16 (where the pipeline's ``auto`` picks it)
UNet-only batch 1 is also timed under bf16 autocast, both impls alike.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from pipeline.text2image import cpu_has_native_bf16
from stages.unet.samplers import SAMPLERS, SamplerConfig, cfg_velocity, seeded_noise
from stages.unet.schedules import FlowSchedule

from . import models
from .harness import Case, Settings, Workload
from .unet_train import autocast

STEPS = 20
CFG_SCALE = 5.0


def peer_sample(unet, scheduler, cond, null, noise, steps: int, scale: float) -> torch.Tensor:
    """The diffusers pipeline loop (as StableDiffusion3Pipeline, with UNet keywords)."""
    batch = noise.shape[0]
    tokens = torch.cat([null.tokens.expand(batch, -1, -1), cond.tokens])
    mask = torch.cat([null.mask.expand(batch, -1), cond.mask])
    pooled = torch.cat([null.pooled.expand(batch, -1), cond.pooled])
    scheduler.set_timesteps(steps, device=noise.device)
    latents = noise
    for t in scheduler.timesteps:
        both = torch.cat([latents] * 2)
        v = unet(
            both,
            t.expand(2 * batch),
            encoder_hidden_states=tokens,
            class_labels=pooled,
            encoder_attention_mask=mask,
        ).sample
        v_uncond, v_cond = v.float().chunk(2)
        latents = scheduler.step(v_uncond + scale * (v_cond - v_uncond), t, latents).prev_sample
    return latents


class Sampling:
    """Builds the UNet and the sampling call of one impl; ``run(cond, noise) -> latents``."""

    def __init__(self, impl: str, params: dict[str, Any], device: str):
        self.cfg = models.unet_config(params["side"], params["preset"])
        self.impl, self.device, self.params = impl, device, params
        torch.manual_seed(0)
        if impl == "ours":
            self.unet = models.our_unet(self.cfg).place(device).eval()
        else:
            self.unet = models.peer_unet(self.cfg).to(device).eval()
        if impl == "peer":
            self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)

    def noise(self) -> torch.Tensor:
        shape = (self.cfg.in_channels, self.cfg.sample_size, self.cfg.sample_size)
        return seeded_noise(shape, range(self.params["batch"])).to(self.device)

    def run(self, cond: Any, null: Any, noise: torch.Tensor) -> torch.Tensor:
        """Ours samples with ``params["ours"]`` (a ``SamplerConfig``; default: the peer's
        ``steps`` Euler steps, CFG at every step); the peer always runs its loop."""
        steps, scale = self.params["steps"], CFG_SCALE
        ours = self.params.get("ours") or SamplerConfig(steps=steps, cfg_scale=scale)
        with autocast(self.device, self.params["precision"]):
            if self.impl == "ours":
                grid = FlowSchedule().grid(ours.steps, ours.shift, device=noise.device)
                velocity = cfg_velocity(self.unet, cond, null, ours.cfg_scale, ours.cfg_interval)
                return SAMPLERS[ours.sampler](velocity, noise, grid)
            return peer_sample(self.unet, self.scheduler, cond, null, noise, steps, scale)


def make_unet_only(impl: str, params: dict[str, Any], device: str) -> Workload:
    sampling = Sampling(impl, params, device)
    cfg, batch = sampling.cfg, params["batch"]
    length = models.clip_config(params["preset"]).text.context_length
    cond = models.random_condition(batch, length, cfg.context_dim).to(device)
    null = models.random_condition(1, length, cfg.context_dim, seed=1).to(device)
    noise = sampling.noise()

    @torch.inference_mode()
    def work() -> None:
        sampling.run(cond, null, noise)

    return work


def make_end_to_end(impl: str, params: dict[str, Any], device: str) -> Workload:
    from stages.clip.export import TextCondition

    sampling = Sampling(impl, params, device)
    preset = params["preset"]
    clip_cfg, vae_cfg = models.clip_config(preset), models.vae_config(preset)
    text = models.text_encoder(clip_cfg).to(device).eval()
    vae = (models.our_vae if impl == "ours" else models.peer_vae)(vae_cfg).to(device).eval()
    ids, mask = (t.to(device) for t in models.random_ids(text, params["batch"]))
    empty = mask[:1] & (torch.arange(mask.shape[1], device=device) < 2)  # start + end tokens
    mean = torch.zeros(vae_cfg.latent_channels, 1, 1, device=device)
    std = torch.ones(vae_cfg.latent_channels, 1, 1, device=device)
    noise = sampling.noise()

    def condition(out) -> TextCondition:
        return TextCondition(out.tokens, out.mask, out.pooled)

    with torch.inference_mode():
        null = condition(text(ids[:1], empty))  # the export's stored null condition

    @torch.inference_mode()
    def work() -> float:
        cond = condition(text(ids, mask))
        start = time.perf_counter()
        latents = sampling.run(cond, null, noise)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        sampled = time.perf_counter() - start
        if impl == "ours":
            vae.decode(latents * std + mean)
        else:
            vae.decode(latents / vae.config.scaling_factor)
        return sampled

    return work


def cases(settings: Settings) -> list[Case]:
    preset = "tiny" if settings.quick else models.PRESET
    side = 8 if settings.quick else 64  # 512 px through the f8 VAE
    precision = "bf16" if settings.cuda else "fp32"
    exact = settings.cuda or settings.full
    # On a CPU with native bf16 the pipeline samples in bf16 by default: also time that, both
    # impls under the same autocast (UNet only, batch 1).
    runs = [(batch, precision) for batch in ((1,) if settings.quick else (1, 4))]
    if not settings.cuda and not settings.quick and cpu_has_native_bf16():
        runs.append((1, "bf16"))
    out = []
    for batch, precision in runs:
        # CPU: one step of the grid per run (a 512 px step at batch 4 x 2 takes tens of s).
        steps = 2 if settings.quick else STEPS if exact else 1
        params = {
            "preset": preset,
            "side": side,
            "batch": batch,
            "steps": steps,
            "precision": precision,
        }
        px = side * models.vae_config(preset).factor
        scale = 1.0 if settings.quick else STEPS / steps
        label = f"{STEPS} steps (from {steps})" if scale != 1 else f"{steps} steps"
        label += " bf16" if precision == "bf16" and not settings.cuda else ""
        for key, make, what in (
            ("unet_infer", make_unet_only, "UNet"),
            ("e2e", make_end_to_end, "text+UNet+VAE"),
        ):
            if key == "e2e" and (batch > 1 or precision == "bf16") and not exact:
                continue  # CPU: four 512 px VAE decodes per run do not fit the budget
            out.append(
                Case(
                    key,
                    f"{what} CFG {label} {px} px b{batch}",
                    params,
                    lambda impl, p=params, m=make: m(impl, p, settings.device),
                    **settings.plan(heavy=key == "e2e" or batch > 1, warmup=exact),
                    scale=scale,
                )
            )
    return out
