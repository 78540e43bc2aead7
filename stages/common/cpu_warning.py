"""What a GPU preset says when it starts on a machine without one, before its first step.

``small`` and ``base`` ask for 20,000-100,000 steps that take a minute or more each on a CPU:
weeks to years. Started without CUDA they print the measured seconds per step of their stage
on a CPU, what their ``train.max_steps`` would take at that rate and, on Colab, where to
switch the runtime to a GPU; then training goes on (a user may mean it: a smoke run with
``train.max_steps=2``). Presets without a measured figure (``tiny``, the classic ones) say
nothing.

The figures are the table of docs/measurements.md ("What the small and base presets cost on
a CPU", 2026-12-02: each stage's second step at a micro-batch, CPU time scaled to the
preset's batch, one thread); a test holds the two alike.
"""

from __future__ import annotations

import os

# (preset, stage, CLIP latent cache on) -> measured CPU seconds per step at the preset's batch.
# The CLIP step without its cache pays the VAE encode of every image of the batch.
CPU_SECONDS_PER_STEP: dict[tuple[str, str, bool], float] = {
    ("small", "vae", False): 156.0,
    ("small", "clip", True): 69.0,
    ("small", "clip", False): 348.0,
    ("small", "unet", False): 85.0,
    ("base", "vae", False): 1320.0,
    ("base", "clip", True): 156.0,
    ("base", "clip", False): 3900.0,
    ("base", "unet", False): 282.0,
}
MEASURED = "2026-12-02, one thread of a 2-core AMD EPYC"
COLAB_HINT = "Colab: Runtime > Change runtime type > a GPU (e.g. T4), then run the notebook again"


def fmt_step(seconds: float) -> str:
    """As the measurements table writes a step: ``~85 s``, ``~2.6 min``, ``~22 min``."""
    if seconds < 100:
        return f"~{seconds:.0f} s"
    minutes = seconds / 60
    return f"~{minutes:.1f} min" if minutes < 10 else f"~{minutes:.0f} min"


def fmt_duration(seconds: float) -> str:
    hours = seconds / 3600
    if hours < 48:
        return f"~{hours:.0f} hours" if hours >= 2 else f"~{seconds / 60:.0f} min"
    days = hours / 24
    return f"~{days:.0f} days" if days < 730 else f"~{days / 365:.0f} years"


def on_colab() -> bool:
    return "COLAB_RELEASE_TAG" in os.environ or "COLAB_GPU" in os.environ


def cpu_warning(preset: str, stage: str, max_steps: int, cache_enabled: bool = False) -> str | None:
    """The message for ``preset``'s ``stage`` trained on a CPU, or None if nothing to say."""
    key = (preset, stage, cache_enabled if stage == "clip" else False)
    seconds = CPU_SECONDS_PER_STEP.get(key)
    if seconds is None:
        return None
    lines = [
        f"the {preset} preset is meant for a GPU and this machine has none (no CUDA).",
        f"Measured on a CPU ({MEASURED}): {fmt_step(seconds)} per {stage} step; "
        f"train.max_steps={max_steps} would take {fmt_duration(seconds * max_steps)}.",
        "Going on anyway; the tiny preset is the one sized for a CPU "
        "(docs/measurements.md, 'What the small and base presets cost on a CPU').",
    ]
    if on_colab():
        lines.append(COLAB_HINT)
    return "\n".join(lines)
