"""Prompt to images: encode, integrate the flow in latent space with CFG, decode.

    cond   = clip.encode_text(prompts)                    tokens (B, L, D), mask, pooled
    uncond = clip.null repeated B times, or the encoded negative prompt (it replaces null)
    x_1    = noise (B, C, h, w); image i draws it from a CPU torch.Generator seeded seed + i,
             so a seed fixes the starting noise whatever the batch, device or precision
             (bitwise-equal images on one device; close ones across devices)
    x_0    = sampler(cfg_velocity(unet.velocity(), cond, uncond, s, [lo, hi]), x_1, grid,
                     rng, eta)
             v = v_u + s (v_c - v_u), both branches in one batched forward, at flow times in
             the guidance interval [lo, hi] (elsewhere v_c alone, half the batch); the grid
             is the objective's schedule's (flow matching, DDPM, VDM), rng seeded per image
    image  = vae.decode(vae.denormalize(x_0))             undo (z - mean) / std, then decode

Image-to-image (``init_image``, ``strength``): the image is resized as training data is,
encoded to its normalised posterior mean x_img, and the sampler starts at flow time
t = strength (times the grid's noise end, 1 for flow matching) from
(1 - t) x_img + t x_1, on the part of the same grid below t (``samplers.partial_grid``):
strength 0 gives the image back through the VAE, strength 1 is text-to-image with the
same seed (the image is not used), and each seed fixes the result in between.

An unconditional UNet takes no prompt (give "" or None per image) and no guidance; a
pixel-space one has no VAE (the identity autoencoder).

Sampling runs under autocast (bf16/fp16) on a GPU when asked; the sampler state and the VAE
decode stay fp32 (fp16 VAE decoders overflow).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from PIL import Image

from stages.clip.export import TextCondition
from stages.common.data import image_tensor
from stages.unet.samplers import (
    SAMPLERS,
    RowNoise,
    SamplerConfig,
    SamplerName,
    cfg_velocity,
    check_cfg_interval,
    check_sampling,
    partial_grid,
    seeded_noise,
)

from .load import ExportFolders, Models, load_models
from .png import encode_png

Precision = Literal["auto", "fp32", "bf16", "fp16"]
DEFAULT_STRENGTH = 0.6  # image-to-image: how much of the path is re-generated


class Cancelled(RuntimeError):
    """``generate``'s ``should_stop`` said stop: no image (the caller gave up)."""


class SettingsError(ValueError):
    """``generate`` refused its arguments (a caller's mistake, unlike a ValueError from deep
    inside torch): the server answers 422 for these only."""


@dataclass(frozen=True)
class PipelineConfig:
    """Pipeline settings; ``configs/<preset>/sample.toml`` holds a preset's differences.

    Sampling fields left at None take the defaults the UNet export recorded at training
    time (its ``sample`` section), so `make sample` matches the training previews.
    """

    steps: int | None = None
    cfg_scale: float | None = None
    sampler: SamplerName | None = None
    shift: float | None = None  # timestep shift t' = s t / (1 + (s - 1) t); > 1 for big images
    eta: float | None = None  # DDIM's noise (sampler "ddim" only)
    cfg_interval: tuple[float, float] | None = None  # flow times [lo, hi] that get guidance
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Precision = "auto"
    # CPU intra-op threads, 0 = torch's default (one per core). 1 suits tiny models on a busy
    # machine: OpenMP threads waiting for a core make every small op cost a time slice.
    threads: int = 0
    compile: bool = False  # torch.compile the UNet and VAE decoder (pipeline/compiled.py)

    def sampling(self, recorded: SamplerConfig) -> SamplerConfig:
        """``recorded`` (the export's defaults) with this config's set fields on top."""
        fields = ("steps", "cfg_scale", "sampler", "shift", "eta", "cfg_interval")
        return replace(
            recorded, **{k: getattr(self, k) for k in fields if getattr(self, k) is not None}
        )


@dataclass(frozen=True)
class Generated:
    """One image and the settings that reproduce it (strings, as stored in the PNG)."""

    image: Image.Image
    metadata: dict[str, str]

    def png(self) -> bytes:
        return encode_png(self.image, self.metadata)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA GPU is available")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls and convolutions run natively (oneDNN), not emulated."""
    cpu = torch.cpu
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in probes)


def resolve_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    """The sampling autocast dtype. ``auto``: bf16 on a GPU that has it, else fp16; on a CPU
    bf16 where it is native (1.9x fp32 per 512 px sampling step, the same CLIP score and FD
    on a trained export: bench/RESULTS.md), else fp32. fp16 on a CPU is refused (few kernels,
    slower than fp32)."""
    if device.type != "cuda":
        if precision == "fp16":
            raise ValueError(f"precision fp16 needs a GPU; use bf16 or fp32 on {device}")
        if precision == "auto":
            return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
        return torch.bfloat16 if precision == "bf16" else torch.float32
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB PIL images."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = pixels.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a), mode="RGB") for a in array]


def _pixels_hash(pixels: torch.Tensor) -> str:
    """sha256 of the 8-bit RGB pixels the model was given (after the resize)."""
    rgb = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    return hashlib.sha256(rgb.numpy().tobytes()).hexdigest()


def _stoppable(velocity: Callable, should_stop: Callable[[], bool]) -> Callable:
    def checked(y: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        if should_stop():
            raise Cancelled("generation cancelled between sampler steps")
        return velocity(y, tau)

    return checked


class Text2Image:
    """The pipeline object: three loaded exports on one device, prompts in, images out."""

    def __init__(self, models: Models, dtype: torch.dtype = torch.float32) -> None:
        self.models = models
        self.dtype = dtype
        self.device = next(models.unet.model.parameters()).device
        if dtype == torch.float16 and self.device.type != "cuda":
            raise ValueError(f"fp16 autocast needs a GPU; the models are on {self.device}")

    @classmethod
    def from_exports(
        cls, folders: ExportFolders, device: str = "auto", precision: Precision = "auto"
    ) -> Text2Image:
        target = resolve_device(device)
        return cls(load_models(folders, target), resolve_dtype(precision, target))

    @property
    def hashes(self) -> dict[str, str]:
        return self.models.hashes

    @property
    def resolution(self) -> int:
        """Output image side in pixels (the UNet's latent side times the VAE factor)."""
        return self.models.unet.resolution

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.models.unet.latent_shape

    @property
    def defaults(self) -> SamplerConfig:
        """Sampling settings recorded in the UNet export (used where generate gets None)."""
        return self.models.unet.sampling

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def conditional(self) -> bool:
        return self.models.clip is not None

    def _conditions(
        self, prompts: list[str], negatives: list[str]
    ) -> tuple[TextCondition | None, TextCondition | None]:
        clip = self.models.clip
        if clip is None:
            return None, None
        cond = clip.encode_text(prompts)
        if any(negatives):
            # A negative prompt replaces the null condition; "" encodes to the null itself.
            uncond = clip.encode_text(negatives)
        else:
            uncond = clip.null  # batch 1: cfg_velocity repeats it
        return cond, uncond

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        seed: int = 42,
        steps: int | None = None,
        cfg_scale: float | None = None,
        sampler: str | None = None,
        shift: float | None = None,
        eta: float | None = None,
        cfg_interval: Sequence[float] | None = None,
        init_image: Image.Image | None = None,
        strength: float | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[Generated]:
        """One image per prompt; image i uses seed ``seed + i``; None: the export's default.

        ``cfg_interval`` [lo, hi]: the flow times at which guidance applies (0 <= lo <= hi
        <= 1; (0, 1): every step); outside it the unconditional pass is skipped.

        An unconditional model takes empty prompts (one per image) and no negative prompt.
        ``init_image`` (any size; shared by all prompts) turns on image-to-image at
        ``strength`` in [0, 1] (None: ``DEFAULT_STRENGTH``). ``should_stop`` is asked before
        every UNet evaluation; when it says True, ``Cancelled`` is raised (the server's way to
        drop the work of a client that left or whose deadline passed).
        """
        defaults = self.defaults
        steps = defaults.steps if steps is None else steps
        cfg_scale = defaults.cfg_scale if cfg_scale is None else cfg_scale
        sampler = defaults.sampler if sampler is None else sampler
        shift = defaults.shift if shift is None else shift
        eta = (defaults.eta if sampler == defaults.sampler else 0.0) if eta is None else eta
        cfg_interval = defaults.cfg_interval if cfg_interval is None else cfg_interval
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise SettingsError("generate needs at least one prompt")
        try:
            check_sampling(sampler, steps, eta, cfg_interval)
            cfg_interval = check_cfg_interval(cfg_interval)
        except ValueError as err:
            raise SettingsError(str(err)) from err
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = [negative_prompt or ""] * len(prompts)
        else:
            negatives = [n or "" for n in negative_prompt]
            if len(negatives) != len(prompts):
                raise SettingsError(
                    f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one "
                    "or one per prompt"
                )
        if not self.conditional and (any(prompts) or any(negatives)):
            raise SettingsError(
                "this UNet is unconditional (trained without a text encoder): give empty "
                "prompts and no negative prompt"
            )
        if init_image is None and strength is not None:
            raise SettingsError("strength applies to image-to-image only: give an init image")
        seeds = [seed + i for i in range(len(prompts))]
        cond, uncond = self._conditions(prompts, negatives)
        noise = seeded_noise(self.latent_shape, seeds).to(self.device)
        unet = self.models.unet
        vae = self.models.vae
        velocity = cfg_velocity(unet.velocity(), cond, uncond, cfg_scale, cfg_interval)
        if should_stop is not None:
            velocity = _stoppable(velocity, should_stop)
        grid = unet.objective.schedule.grid(steps, shift, self.device)
        init, extra = None, {}
        if init_image is not None:
            strength = DEFAULT_STRENGTH if strength is None else float(strength)
            grid = partial_grid(grid, strength)
            pixels = image_tensor(init_image, self.resolution)
            extra = {"strength": str(strength), "init_image_sha256": _pixels_hash(pixels)}
            if strength < 1.0:  # at 1 the path starts from pure noise: text-to-image
                latents, _ = vae.encode(pixels[None].to(self.device))
                init = vae.normalize(latents).expand(len(prompts), -1, -1, -1)
        with self._autocast():
            latents = SAMPLERS[sampler](velocity, noise, grid, RowNoise(seeds), eta, init=init)
        images = vae.decode(vae.denormalize(latents.float()))
        hashes = self.hashes
        return [
            Generated(
                image=image,
                metadata={
                    "prompt": prompt,
                    "negative_prompt": negative,
                    "seed": str(image_seed),
                    "steps": str(steps),
                    "cfg_scale": str(cfg_scale),
                    "sampler": sampler,
                    "shift": str(shift),
                    "eta": str(eta),
                    "cfg_interval": f"{cfg_interval[0]:g},{cfg_interval[1]:g}",
                    "objective": unet.objective.config.kind,
                    "vae_hash": hashes["vae"],
                    "clip_hash": hashes["clip"],
                    "unet_hash": hashes["unet"],
                    **extra,
                },
            )
            for image, prompt, negative, image_seed in zip(
                to_pil(images), prompts, negatives, seeds
            )
        ]
