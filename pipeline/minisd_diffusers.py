"""The diffusers pipeline shipped in every ``export-diffusers`` folder as ``pipeline_minisd.py``.

A self-contained file (diffusers loads it as a custom pipeline: it imports only torch,
numpy, PIL and diffusers) that samples as ``pipeline.text2image`` does:

    cond   = text_encoder(prompt): token states (B, L, D) zeroed at pads, mask, pooled
    uncond = the encoding of "" (our null condition) or of the negative prompt
    x_1    = latents, or noise drawn per image from ``generator`` (a list of CPU generators
             seeded seed + i gives exactly our pipeline's noise)
    grid   = linspace(1, 0, steps + 1) shifted by the scheduler's ``shift`` (ours)
    x_0    = Euler steps of v = v_u + s (v_c - v_u), both branches in one forward, at the
             grid points sigma inside ``cfg_interval`` [lo, hi]; v = v_c alone outside it
             (the guidance interval, Kynkaanniemi et al. 2024)
    image  = vae.decode(x_0 * latents_std + latents_mean)  (our per-channel statistics,
             stored in the VAE config; its scaling_factor is 1)

The export writes its preset's sampling defaults over ``DEFAULT_STEPS``,
``DEFAULT_GUIDANCE`` and ``DEFAULT_CFG_INTERVAL``; the scheduler's config holds the shift.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0
DEFAULT_CFG_INTERVAL = (0.0, 1.0)


class MinisdPipeline(DiffusionPipeline):
    """Text-to-image with minisd's conditioning: pooled text into the UNet, CFG against the
    encoding of the empty caption, flow-matching Euler steps."""

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
        )

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]):
        """-> token states (B, L, D) zero at pads, mask (B, L) long, pooled (B, D)."""
        # Special-token strings typed in a prompt are removed, as our tokenizer does: a
        # prompt cannot end itself early or inject padding.
        for special in self.tokenizer.all_special_tokens:
            prompts = [p.replace(special, " ") for p in prompts]
        batch = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids = batch.input_ids.to(self.text_encoder.device)
        mask = batch.attention_mask.to(self.text_encoder.device)
        out = self.text_encoder(ids, attention_mask=mask)
        tokens = out.last_hidden_state * mask[..., None].to(out.last_hidden_state.dtype)
        return tokens, mask, out.pooler_output

    def _noise(self, batch: int, generator) -> torch.Tensor:
        shape = (
            self.unet.config.in_channels,
            self.unet.config.sample_size,
            self.unet.config.sample_size,
        )
        if isinstance(generator, list):
            if len(generator) != batch:
                raise ValueError(f"{len(generator)} generators for {batch} images")
            return torch.cat([torch.randn((1, *shape), generator=g) for g in generator])
        return torch.randn((batch, *shape), generator=generator)

    def _velocity(self, y, t, cond, uncond, guidance_scale: float) -> torch.Tensor:
        dtype = self.unet.dtype
        if guidance_scale == 1.0:
            tokens, mask, pooled = cond
        else:
            tokens, mask, pooled = (torch.cat([c, u]) for c, u in zip(cond, uncond))
            y = torch.cat([y, y])
        v = self.unet(
            y.to(dtype),
            t,
            encoder_hidden_states=tokens.to(dtype),
            encoder_attention_mask=mask,
            class_labels=pooled.to(dtype),
        ).sample.float()
        if guidance_scale == 1.0:
            return v
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        cfg_interval: tuple[float, float] = DEFAULT_CFG_INTERVAL,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompt or ""
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        device = self._execution_device
        cond = self.encode_prompt(prompts)
        uncond = self.encode_prompt(negatives)
        noise = self._noise(len(prompts), generator) if latents is None else latents
        # Our grid: linspace(1, 0, steps + 1) without the final 0, which the scheduler shifts
        # and ends with 0 itself.
        sigmas = torch.linspace(1.0, 0.0, num_inference_steps + 1)[:-1].numpy()
        self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        y = noise.to(device, torch.float32) * self.scheduler.sigmas[0]
        lo, hi = cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"cfg_interval {cfg_interval}: need 0 <= lo <= hi <= 1")
        for sigma, t in zip(self.scheduler.sigmas, self.progress_bar(self.scheduler.timesteps)):
            scale = guidance_scale if lo <= float(sigma) <= hi else 1.0  # 1: conditional only
            v = self._velocity(y, t, cond, uncond, scale)
            y = self.scheduler.step(v, t, y).prev_sample
        if output_type == "latent":
            images = y
        else:
            config = self.vae.config
            mean = torch.tensor(config.latents_mean, device=device).view(1, -1, 1, 1)
            std = torch.tensor(config.latents_std, device=device).view(1, -1, 1, 1)
            decoded = self.vae.decode((y * std + mean).to(self.vae.dtype)).sample.float()
            images = self._postprocess(decoded, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    @staticmethod
    def _postprocess(images: torch.Tensor, output_type: str):
        """(B, 3, H, W) in [-1, 1] -> PIL (rounded 8-bit, as our PNGs), numpy or torch in [0, 1]."""
        if output_type == "pil":
            pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            array = pixels.permute(0, 2, 3, 1).cpu().numpy()
            return [PIL.Image.fromarray(np.ascontiguousarray(a), mode="RGB") for a in array]
        unit = (images / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return unit
        if output_type == "np":
            return unit.permute(0, 2, 3, 1).cpu().numpy()
        raise ValueError(f"output_type must be pil, np, pt or latent, got {output_type!r}")
