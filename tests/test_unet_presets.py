"""The UNet presets (configs/<preset>/unet.toml and sample.toml): each loads strictly,
sample.toml agrees with the stage's [sample] section, and the networks have their sizes."""

from __future__ import annotations

import tomllib

import pytest
import torch

from pipeline.text2image import PipelineConfig
from stages.common.config import CONFIGS_DIR, load_config
from stages.unet.model import UNet, count_parameters
from stages.unet.samplers import check_sampling
from stages.unet.stage import InputsConfig, UNetStageConfig, resolve_model

ALL_PRESETS = ("tiny", "small", "base", "pokepixels-9m", "cifar-ddpm-17m", "ddpm-58m", "vdm")
# Pixel-space, unconditional presets: (parameters, objective kind).
NEW_PRESETS = {
    "pokepixels-9m": (9.9e6, "eps"),
    "cifar-ddpm-17m": (17.3e6, "eps"),
    "ddpm-58m": (59.1e6, "eps"),
    "vdm": (9.9e6, "vdm"),
}


def test_base_preset_is_about_230m_parameters():
    cfg = load_config(UNetStageConfig, "base", "unet")
    model_cfg = resolve_model(cfg.model, channels=4, context_dim=512, side=64)
    with torch.device("meta"):
        count = count_parameters(UNet(model_cfg))
    assert 220e6 < count < 240e6, count


def test_sample_toml_agrees_with_the_stage_sample_section():
    for preset in ("tiny", "small", "base"):
        recorded = load_config(PipelineConfig, preset, "sample")
        stage = load_config(UNetStageConfig, preset, "unet").sample
        fields = ("steps", "cfg_scale", "sampler", "shift", "cfg_interval")
        assert recorded.sampling(stage) == stage, preset  # every field sample.toml sets agrees
        assert all(getattr(recorded, k) is not None for k in fields), preset


@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_preset_loads_strictly(preset):
    cfg = load_config(UNetStageConfig, preset, "unet")
    sample = load_config(PipelineConfig, preset, "sample")
    check_sampling(cfg.sample.sampler, cfg.sample.steps, cfg.sample.eta)
    # What sample.toml sets agrees with the defaults the UNet export will record.
    assert sample.sampling(cfg.sample) == cfg.sample


@pytest.mark.parametrize("preset", sorted(NEW_PRESETS))
def test_new_pixel_presets_size_and_sampling(preset):
    expected, kind = NEW_PRESETS[preset]
    cfg = load_config(UNetStageConfig, preset, "unet")
    assert cfg.inputs == InputsConfig(autoencoder="identity", text=False)
    assert cfg.objective.kind == kind
    assert cfg.sample.clip_x0  # pixel space: x0 clamped to [-1, 1] while sampling
    model = resolve_model(cfg.model, channels=3, context_dim=-1, side=cfg.data.resolution)
    with torch.device("meta"):
        count = count_parameters(UNet(model))
    assert abs(count - expected) <= 0.05 * expected, count
    recorded = tomllib.loads((CONFIGS_DIR / preset / "sample.toml").read_text())
    assert recorded["sampler"] == cfg.sample.sampler
    assert recorded["steps"] == cfg.sample.steps
    sample = load_config(PipelineConfig, preset, "sample")
    assert sample.sampling(cfg.sample) == cfg.sample  # the pipeline samples as the previews


def test_vdm_preset_is_pixel_space_and_ddpm_58m_uses_cosine_betas():
    assert load_config(UNetStageConfig, "ddpm-58m", "unet").objective.beta_schedule == "cosine"
    for preset in ("pokepixels-9m", "cifar-ddpm-17m"):
        assert load_config(UNetStageConfig, preset, "unet").objective.beta_schedule == "linear"
    # The vdm preset's UNet is the pokepixels-9m network.
    vdm, poke = (load_config(UNetStageConfig, p, "unet") for p in ("vdm", "pokepixels-9m"))
    assert vdm.model == poke.model and vdm.data.resolution == poke.data.resolution
