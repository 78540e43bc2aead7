"""Seconds per image at equal quality: ours at the swept defaults vs diffusers' pipeline loop.

The equal-work rows (``inference.py``) run the same 20 guided Euler steps on both sides; these
run what each side needs for the same quality. Ours: the pipeline's sampling call with the
tiny preset's recorded defaults (``configs/tiny/sample.toml``: steps, sampler, shift, the
guidance interval), which ``python -m pipeline sweep`` chose on the trained tiny export as
the cheapest setting within the measured noise of the best R-precision, FD and CLIP score.
Peer: diffusers' loop (``FlowMatchEulerDiscreteScheduler``, shift 1, 20 steps, CFG at every
step), the maths of the sweep's reference (our previous defaults), so at its quality.

End to end (text encoder, sampling, VAE decode; ``inference.make_end_to_end``), the
equal-config networks of ``models.py`` with random weights: timing does not depend on the
weights, the quality equivalence was measured with the trained ones (bench/RESULTS.md says
which sweep). The tiny preset's shapes (32 px, the model the sweep measured) at batch 1 and
16 always; the base preset's (512 px) at batch 1 on a GPU or with ``--full`` (on a CPU the
peer's 20 full 512 px steps and two VAE decodes take minutes per repetition).
"""

from __future__ import annotations

from typing import Any

from pipeline.text2image import PipelineConfig
from stages.common.config import load_config
from stages.unet.samplers import SamplerConfig

from . import models
from .harness import Case, Settings
from .inference import CFG_SCALE, STEPS, make_end_to_end

SWEPT_PRESET = "tiny"


def swept_defaults(preset: str = SWEPT_PRESET) -> SamplerConfig:
    """The preset's recorded sampling defaults (``sample.toml`` over the stage defaults)."""
    return load_config(PipelineConfig, preset, "sample").sampling(SamplerConfig())


def describe(s: SamplerConfig) -> str:
    lo, hi = s.cfg_interval
    return f"{s.sampler} {s.steps} shift {s.shift:g} CFG {s.cfg_scale:g} at t in [{lo:g}, {hi:g}]"


def cases(settings: Settings) -> list[Case]:
    ours = swept_defaults()
    if ours.cfg_scale != CFG_SCALE:
        raise ValueError(
            f"the peer loop guides at {CFG_SCALE}; the swept defaults at {ours.cfg_scale}"
        )
    sizes: list[tuple[str, int, int]] = [("tiny", 8, 1)]
    if not settings.quick:
        sizes.append(("tiny", 8, 16))
        if settings.cuda or settings.full:
            sizes.append((models.PRESET, 64, 1))
    precision = "bf16" if settings.cuda else "fp32"
    out = []
    for preset, side, batch in sizes:
        params: dict[str, Any] = {
            "preset": preset,
            "side": side,
            "batch": batch,
            "steps": STEPS,  # the peer's
            "precision": precision,
            "ours": ours,
        }
        px = side * models.vae_config(preset).factor
        out.append(
            Case(
                "quality",
                f"equal quality, text+UNet+VAE {px} px b{batch}",
                params,
                lambda impl, p=params: make_end_to_end(impl, p, settings.device),
                **settings.plan(heavy=preset != "tiny", warmup=True),
                note=f"ours {describe(ours)}; diffusers euler {STEPS}, CFG {CFG_SCALE:g} every step",
            )
        )
    return out
