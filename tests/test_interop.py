"""Interop with diffusers and transformers: the export is proven against them, not assumed.

Everything is built here from random weights (nothing can be downloaded): the pipeline's
test exports go through ``python -m pipeline export-diffusers`` and are loaded back with
``DiffusionPipeline.from_pretrained`` (the shipped custom pipeline class), diffusers'
``AutoencoderKL`` and transformers' ``CLIPTextModel`` + ``PreTrainedTokenizerFast``; a random
AutoencoderKL saved by diffusers is imported as a VAE export and the CLIP and UNet stages
train on it. Tolerances (measured on CPU, fp32): images 0 of 255 levels (asserted <= 1),
VAE encode / decode ~2e-7 / ~2e-6 (asserted 1e-5), text states ~1e-6 (asserted 1e-5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import dynamic_modules_utils
from exports import one_torch_thread
from transformers import CLIPTextModel, PreTrainedTokenizerFast

from pipeline.__main__ import main as pipeline_main
from pipeline.load import load_models
from pipeline.text2image import PipelineConfig, Text2Image
from stages.clip.export import load_clip
from stages.clip.model import CLIPModelConfig
from stages.common.config import ConfigError, from_dict, load_config, merge, to_dict
from stages.common.export import ExportError, read_export
from stages.common.interop import MissingExtra, read_safetensors_model, require
from stages.unet.export import InputsConfig
from stages.unet.interop import check_exportable as check_unet
from stages.unet.stage import UNetStageConfig
from stages.vae.export import load_vae
from stages.vae.importer import main as import_main
from stages.vae.interop import config_from_diffusers, from_diffusers
from stages.vae.model import VAEModelConfig

PROMPTS = ["red apple; flat colour emoji", "blue heart", "a " + "long " * 30 + "caption"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def hermetic_hub(tmp_path, monkeypatch):
    """No hub access, and the custom pipeline's module copy goes to a temporary folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))


@pytest.fixture(scope="module")
def exported(tiny_exports, tmp_path_factory):
    """The pipeline test exports and their diffusers folder, written by the command."""
    out = tmp_path_factory.mktemp("diffusers") / "minisd"
    runs = tiny_exports.unet.parents[2]
    with one_torch_thread():
        assert (
            pipeline_main(["export-diffusers", "--runs", str(runs), "--preset", "tiny", str(out)])
            == 0
        )
    return tiny_exports, out


def _max_pixel_diff(ours, theirs) -> int:
    a, b = (np.asarray(image, dtype=np.int16) for image in (ours, theirs))
    return int(np.abs(a - b).max())


def test_the_folder_is_safetensors_json_and_the_pipeline_source(exported):
    _, out = exported
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".safetensors", ".py", ".md"}
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_minisd", "MinisdPipeline"]
    preset = load_config(PipelineConfig, "tiny", "sample")  # the export takes the preset's
    sampling = json.loads((out / "minisd.json").read_text())["sampling"]
    assert sampling["steps"] == preset.steps
    source = (out / "pipeline_minisd.py").read_text()
    assert f"DEFAULT_STEPS = {preset.steps}" in source
    lo, hi = preset.cfg_interval
    assert f"DEFAULT_CFG_INTERVAL = ({float(lo)!r}, {float(hi)!r})" in source
    with pytest.raises(ExportError, match="exists"):  # never written over
        from pipeline.export_diffusers import export_diffusers

        export_diffusers(exported[0], out)


def test_diffusers_draws_our_images_from_the_same_prompt_seed_and_noise(exported, tmp_path):
    folders, out = exported
    with one_torch_thread():
        pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        assert type(pipe).__name__ == "MinisdPipeline"
        ours = Text2Image.from_exports(folders, device="cpu", precision="fp32")
        cases = [
            dict(cfg_scale=5.0, shift=1.0, negative=None),
            dict(cfg_scale=3.0, shift=2.0, negative="green"),  # a negative prompt, SD3's shift
            dict(cfg_scale=1.0, shift=1.0, negative=None),  # one forward, no guidance
            dict(cfg_scale=5.0, shift=0.5, negative=None, interval=(0.2, 0.8)),  # issue 20
        ]
        for case in cases:
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
                pipe.scheduler.config, shift=case["shift"]
            )
            mine = ours.generate(
                PROMPTS, case["negative"], seed=7, steps=5, cfg_scale=case["cfg_scale"],
                shift=case["shift"], cfg_interval=case.get("interval", (0.0, 1.0)),
            )  # fmt: skip
            # A CPU generator per image seeded seed + i is exactly our noise.
            generators = [torch.Generator().manual_seed(7 + i) for i in range(len(PROMPTS))]
            theirs = pipe(
                PROMPTS, case["negative"], num_inference_steps=5,
                guidance_scale=case["cfg_scale"], generator=generators,
                cfg_interval=case.get("interval", (0.0, 1.0)),
            ).images  # fmt: skip
            for a, b in zip(mine, theirs):
                assert _max_pixel_diff(a.image, b) <= 1, case
        # Not a constant image: the prompts draw different pictures.
        assert _max_pixel_diff(mine[0].image, mine[1].image) > 10


def test_the_vae_alone_encodes_and_decodes_as_ours(exported):
    folders, out = exported
    ours = load_vae(folders.vae)
    theirs = DiffusersVAE.from_pretrained(out / "vae").eval()
    assert theirs.config.latents_mean == pytest.approx(ours.mean.tolist())
    assert theirs.config.latents_std == pytest.approx(ours.std.tolist())
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad(), one_torch_thread():
        mean, std = ours.encode(x)
        posterior = theirs.encode(x).latent_dist
        assert (posterior.mean - mean).abs().max() < 1e-5
        assert (posterior.std - std).abs().max() < 1e-5
        assert (theirs.decode(mean).sample - ours.decode(mean)).abs().max() < 1e-5


def test_the_text_encoder_alone_gives_our_token_states_and_pooled_state(exported):
    folders, out = exported
    clip = load_clip(folders.clip)
    model = CLIPTextModel.from_pretrained(out / "text_encoder").eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out / "tokenizer")
    captions = [*PROMPTS, "", "RED   Apple"]
    ids, mask = clip.tokenizer.encode(captions)
    batch = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    )  # fmt: skip
    assert torch.equal(batch.input_ids, ids) and torch.equal(batch.attention_mask.bool(), mask)
    with torch.no_grad(), one_torch_thread():
        ours = clip.encode_text(captions)
        theirs = model(batch.input_ids, attention_mask=batch.attention_mask)
    states = theirs.last_hidden_state * mask[..., None]  # ours are zero at pads
    assert (states - ours.tokens).abs().max() < 1e-5
    assert (theirs.pooler_output - ours.pooled).abs().max() < 1e-5


# ---------------------------------------------------------------------------- refusals


def test_a_pickle_only_folder_is_refused_naming_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not read")
    with pytest.raises(ExportError, match=r"diffusion_pytorch_model\.bin.*pickle"):
        read_safetensors_model(tmp_path)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"act_fn": "gelu"}, "act_fn"),
        ({"block_out_channels": [64, 96]}, "block_out_channels"),
        (
            {"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]},
            "down_block_types",
        ),
        ({"use_post_quant_conv": False}, "use_post_quant_conv"),
        ({"norm_type": "spatial"}, "norm_type"),
    ],
)
def test_an_autoencoder_we_cannot_express_is_refused_naming_the_key(change, key):
    levels = {
        "block_out_channels": (64, 128),
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
    }
    config = {**dict(DiffusersVAE(**levels).config), **change}
    with pytest.raises(ConfigError, match=f"'{key}'"):
        config_from_diffusers(config)


def test_sd_files_legacy_attention_names_convert_to_the_same_weights():
    """Stable Diffusion's own VAE files name the mid attention query/key/value/proj_attn."""
    kwargs = {"block_out_channels": (8, 16), "norm_num_groups": 4, "layers_per_block": 1}
    levels = {"down_block_types": ("DownEncoderBlock2D",) * 2}
    levels["up_block_types"] = ("UpDecoderBlock2D",) * 2
    state = DiffusersVAE(**kwargs, **levels).state_dict()
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = dict(state)
    for key in list(old):
        for new, name in legacy.items():
            if f".attentions.0.{new}." in key:
                old[key.replace(new, name)] = old.pop(key)
    cfg = config_from_diffusers(dict(DiffusersVAE(**kwargs, **levels).config))
    converted, reference = from_diffusers(old, cfg), from_diffusers(state, cfg)
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[k], reference[k]) for k in reference)


def _resolved_unet(preset: str) -> tuple[UNetStageConfig, object]:
    """A preset's UNet config resolved as the stage does (latent channels, text width, side)."""
    cfg = load_config(UNetStageConfig, preset, "unet")
    vae = VAEModelConfig()
    clip = CLIPModelConfig()
    if (REPO / "configs" / preset / "vae.toml").exists():
        vae = from_dict(VAEModelConfig, merge(to_dict(vae), _toml(preset, "vae").get("model", {})))
        clip = from_dict(
            CLIPModelConfig, merge(to_dict(clip), _toml(preset, "clip").get("model", {}))
        )
    model = replace(
        cfg.model,
        in_channels=vae.latent_channels,
        context_dim=clip.text.width if cfg.inputs.text else -1,
        sample_size=cfg.data.resolution // (vae.factor if cfg.inputs.autoencoder == "vae" else 1),
    )
    return cfg, model


def _toml(preset: str, stage: str) -> dict:
    import tomllib

    return tomllib.loads((REPO / "configs" / preset / f"{stage}.toml").read_text())


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_the_latent_text_presets_are_exportable(preset):
    cfg, model = _resolved_unet(preset)
    check_unet(model, cfg.inputs, cfg.objective)  # small and base: 3x GEGLU, zero-padded


@pytest.mark.parametrize(
    "preset, key",
    [
        ("cifar-ddpm-17m", "inputs.text"),
        ("ddpm-58m", "inputs.text"),
        ("pokepixels-9m", "inputs.text"),
        ("vdm", "inputs.text"),
    ],
)
def test_unconditional_pixel_presets_are_refused_naming_the_key(preset, key):
    cfg, model = _resolved_unet(preset)
    with pytest.raises(ConfigError, match=key):
        check_unet(model, cfg.inputs, cfg.objective)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"ff_mult": 8}, "model.ff_mult"),
        ({"groups": 32}, "model.groups"),  # 48 channels: ours falls back to 16 groups
        ({"time_scale": 999.5}, "model.time_scale"),
    ],
)
def test_a_unet_we_cannot_express_is_refused_naming_the_key(change, key):
    cfg, model = _resolved_unet("tiny")
    with pytest.raises(ConfigError, match=key):
        check_unet(replace(model, **change), cfg.inputs, cfg.objective)
    with pytest.raises(ConfigError, match="objective.kind"):
        check_unet(model, cfg.inputs, replace(cfg.objective, kind="eps"))
    with pytest.raises(ConfigError, match="inputs.autoencoder"):
        check_unet(model, InputsConfig(autoencoder="identity"), cfg.objective)


def test_a_missing_extra_names_it_and_the_project_still_imports():
    """Without diffusers and transformers: the project imports, the commands say what to
    install (exit 2, one line)."""
    code = (
        "import sys; sys.modules['diffusers'] = None; sys.modules['transformers'] = None\n"
        "import pipeline.__main__ as m, stages.vae.importer, pipeline.export_diffusers\n"
        "raise SystemExit(m.main(['export-diffusers', '--runs', 'no-runs', 'out']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 2, done.stderr
    assert "'interop' extra" in done.stderr and "pip install -e '.[interop]'" in done.stderr
    with pytest.raises(MissingExtra, match="interop"):
        require("no_such_module_here", "a test")


# ---------------------------------------------------------------------------- import


def test_an_imported_diffusers_vae_round_trips_and_the_chain_goes_on(tiny_shards, tmp_path):
    """A random AutoencoderKL saved by diffusers (with SD's quant convs) becomes a VAE
    export: equal encode and decode, statistics measured on the data; CLIP and UNet train
    on it; and the chain goes back out to diffusers drawing our images."""
    torch.manual_seed(0)
    source = DiffusersVAE(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()  # fmt: skip
    source.save_pretrained(tmp_path / "sd-vae")
    runs = tmp_path / "runs"
    data = ["--data", str(tiny_shards), "--runs", str(runs)]
    small = ["data.resolution=16", "data.batch_size=16", "stats.batches=3"]
    with one_torch_thread():
        assert import_main([str(tmp_path / "sd-vae"), *data, *small]) == 0
        assert import_main([str(tmp_path / "sd-vae"), *data, *small]) == 1  # never over a run
    manifest = read_export(runs / "tiny" / "vae" / "export", "vae")
    assert manifest["info"]["init"]["format"] == "diffusers AutoencoderKL"
    assert manifest["info"]["model"]["quant_conv"] is True
    vae = load_vae(runs / "tiny" / "vae" / "export")
    assert not torch.allclose(vae.mean, torch.zeros(4)) and (vae.std > 0).all()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mean, std = vae.encode(x)
        posterior = source.encode(x).latent_dist
        assert (mean - posterior.mean).abs().max() < 1e-5
        assert (std - posterior.std).abs().max() < 1e-5
        assert (vae.decode(mean) - source.decode(mean).sample).abs().max() < 1e-5

    _train_clip_and_unet(tiny_shards, runs)
    models = load_models(_folders(runs))
    assert models.unet.upstream["vae"] == vae.hash

    out = tmp_path / "exported"
    with one_torch_thread():
        assert pipeline_main(["export-diffusers", "--runs", str(runs), str(out)]) == 0
        pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        mine = Text2Image(models).generate(PROMPTS[:2], seed=3, steps=4)
        generators = [torch.Generator().manual_seed(3 + i) for i in range(2)]
        theirs = pipe(PROMPTS[:2], num_inference_steps=4, generator=generators).images
    for a, b in zip(mine, theirs):
        assert _max_pixel_diff(a.image, b) <= 1


def _folders(runs: Path):
    from pipeline.load import ExportFolders

    return ExportFolders.from_runs(runs, "tiny")


def _train_clip_and_unet(shards: Path, runs: Path) -> None:
    """Two steps of each stage on the imported VAE, through their command lines."""
    from stages.clip.stage import CLIPStage, CLIPStageConfig
    from stages.common.cli import run_stage
    from stages.unet.stage import UNetStage

    common = ["data.resolution=16", "data.batch_size=16", "train.max_steps=2", "train.val_every=0"]
    common += ["train.preview_every=0", "train.trackers=[]", "ckpt.every_steps=0"]
    clip = ["model.embed_dim=32", "model.text.context_length=8", "model.text.width=32"]
    clip += ["model.text.layers=1", "model.text.heads=2", "model.image.width=32"]
    clip += ["model.image.layers=1", "model.image.heads=2", "tokenizer.vocab_size=300"]
    clip += ["tokenizer.min_frequency=1", "cache.enabled=false"]
    unet = ["model.base_channels=16", "model.channel_mult=[1, 2]", "model.head_dim=8"]
    unet += ["model.groups=8", "model.attention_resolutions=[4]", "cache.shard_size=40"]
    argv = ["--preset", "tiny", "--data", str(shards), "--runs", str(runs), *common]
    with one_torch_thread():
        assert run_stage("clip", CLIPStageConfig, CLIPStage, [*argv, *clip]) == 0
        assert run_stage("unet", UNetStageConfig, UNetStage, [*argv, *unet]) == 0
