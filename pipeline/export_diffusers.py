"""Write the three exports as one diffusers pipeline folder (``export-diffusers``).

    OUT/model_index.json      components, and the custom pipeline class to build them into
    OUT/pipeline_minisd.py    that class (pipeline/minisd_diffusers.py with the preset's defaults)
    OUT/unet/                 UNet2DConditionModel (feed-forward zero-padded to 4x if narrower)
    OUT/vae/                  AutoencoderKL; latents_mean / latents_std = our per-channel statistics
    OUT/text_encoder/         transformers CLIPTextModel
    OUT/tokenizer/            PreTrainedTokenizerFast over our tokenizer.json
    OUT/scheduler/            FlowMatchEulerDiscreteScheduler (num_train_timesteps = time_scale, shift)
    OUT/minisd.json, README.md   the source export hashes and sampling defaults; the model card

Every file is safetensors or JSON (or the pipeline's source). The folder is written under a
temporary name and renamed into place; an existing OUT is refused. What the diffusers
classes cannot express is refused before anything is written, naming the config key.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from stages.clip.export import TOKENIZER_FILE
from stages.clip.interop import clip_text_config_kwargs, to_transformers
from stages.clip.tokenizer import END, PAD, START
from stages.common.export import ExportError, read_file
from stages.common.interop import require
from stages.unet.interop import check_exportable as check_unet
from stages.unet.interop import diffusers_unet_kwargs
from stages.unet.interop import to_diffusers as unet_to_diffusers
from stages.unet.samplers import SamplerConfig
from stages.vae.interop import check_exportable as check_vae
from stages.vae.interop import diffusers_vae_kwargs
from stages.vae.interop import to_diffusers as vae_to_diffusers

from .load import ExportFolders, Models, load_models
from .text2image import PipelineConfig

PIPELINE_SOURCE = Path(__file__).with_name("minisd_diffusers.py")
PIPELINE_MODULE = "pipeline_minisd"
PIPELINE_CLASS = "MinisdPipeline"
WHAT = "export-diffusers"


def _check(models: Models) -> None:
    unet = models.unet
    # First: a pixel-space or unconditional UNet is refused here, naming its inputs key.
    check_unet(unet.model.config, unet.inputs, unet.objective.config)
    check_vae(models.vae.model.config)


def _unet(models: Models, folder: Path) -> None:
    diffusers = require("diffusers", WHAT)
    cfg = models.unet.model.config
    model = diffusers.UNet2DConditionModel(**diffusers_unet_kwargs(cfg))
    model.load_state_dict(unet_to_diffusers(models.unet.model.state_dict(), cfg), strict=True)
    model.save_pretrained(folder, safe_serialization=True)


def _vae(models: Models, folder: Path) -> None:
    diffusers = require("diffusers", WHAT)
    vae = models.vae
    cfg = vae.model.config
    model = diffusers.AutoencoderKL(
        **diffusers_vae_kwargs(cfg),
        sample_size=vae.resolution,
        # The UNet sees (z - mean) / std per channel: diffusers' own per-channel fields
        # (SDXL-style pipelines read them); the scalar scaling is then the identity.
        scaling_factor=1.0,
        latents_mean=[float(v) for v in vae.mean.cpu()],
        latents_std=[float(v) for v in vae.std.cpu()],
    )
    model.load_state_dict(vae_to_diffusers(vae.model.state_dict(), cfg), strict=True)
    model.save_pretrained(folder, safe_serialization=True)


def _text(models: Models, folders: ExportFolders, out: Path) -> None:
    transformers = require("transformers", WHAT)
    clip = models.clip
    config = transformers.CLIPTextConfig(**clip_text_config_kwargs(clip.text, clip.tokenizer))
    model = transformers.CLIPTextModel(config)
    # transformers 4.x nests the model under "text_model.", 5.x does not.
    prefix = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    model.load_state_dict(to_transformers(clip.text.state_dict(), prefix), strict=True)
    model.save_pretrained(out / "text_encoder", safe_serialization=True)
    tokenizers = require("tokenizers", WHAT)
    text = read_file(folders.clip, TOKENIZER_FILE).decode()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(text),
        bos_token=START,
        eos_token=END,
        pad_token=PAD,
        model_max_length=clip.context_length,
        padding_side="right",
    )
    tokenizer.save_pretrained(out / "tokenizer")


def _scheduler(models: Models, sampling: SamplerConfig, folder: Path) -> None:
    diffusers = require("diffusers", WHAT)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=round(models.unet.model.config.time_scale), shift=sampling.shift
    )
    scheduler.save_pretrained(folder)


def _pipeline_source(sampling: SamplerConfig) -> str:
    source = PIPELINE_SOURCE.read_text()
    for line, value in (
        ("DEFAULT_STEPS = ", sampling.steps),
        ("DEFAULT_GUIDANCE = ", sampling.cfg_scale),
        ("DEFAULT_CFG_INTERVAL = ", tuple(float(x) for x in sampling.cfg_interval)),
    ):
        old = next(s for s in source.splitlines() if s.startswith(line))
        source = source.replace(old, f"{line}{value!r}", 1)
    return source


def _model_card(models: Models, sampling: SamplerConfig, record: dict[str, Any]) -> str:
    side = models.unet.resolution
    return f"""# minisd text-to-image model ({side} px), exported for diffusers

Trained with minisd (flow matching: the UNet predicts v = noise - x0, t = 1 is noise).

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("path/to/this/folder", trust_remote_code=True)
image = pipe("a red apple", generator=[torch.Generator().manual_seed(42)]).images[0]
```

- Sampling defaults: {sampling.steps} Euler steps, guidance {sampling.cfg_scale}, shift
  {sampling.shift} (the scheduler's). Unconditional branch: the encoding of "" (or the
  negative prompt). A list of CPU generators seeded seed + i gives minisd's own noise.
  The pipeline hands the scheduler minisd's grid, `sigmas = linspace(1, 0, steps + 1)[:-1]`
  (it shifts them and ends at 0); a bare `set_timesteps(steps)` spaces them slightly
  differently (down to 1/1000, then 0).
- Latents: the UNet works on `(z - latents_mean) / latents_std`, per channel, from
  `vae.config`; decode with `vae.decode(x * latents_std + latents_mean)`
  (`scaling_factor` is 1). Encode an image with `vae.encode(x).latent_dist.mean`, then
  normalise the same way.
- Text: `CLIPTextModel` token states (zero them at padding, as the pipeline does), the
  attention mask as `encoder_attention_mask`, and `pooler_output` as the UNet's
  `class_labels` (`class_embed_type = "simple_projection"`).
- UNet feed-forward: {models.unet.model.config.ff_mult}x wide in training; diffusers' blocks are
  4x, the extra units are zeros and change nothing.

Source exports (sha256 identities): {json.dumps(record["exports"])}
"""


def export_diffusers(
    folders: ExportFolders, out: Path, sample: PipelineConfig | None = None
) -> Path:
    """Write ``out`` from the three exports; returns it. Refuses an existing ``out``.

    ``sample`` (a preset's ``sample.toml``) overrides the sampling defaults the UNet export
    recorded, as for ``generate``; the pipeline file and scheduler get the result.
    """
    out = Path(out)
    if out.exists():
        raise ExportError(f"{out} exists; remove it or choose another folder")
    require("diffusers", WHAT)
    require("transformers", WHAT)
    models = load_models(folders, "cpu")
    _check(models)
    sampling = (sample or PipelineConfig()).sampling(models.unet.sampling)
    record = {
        "exports": models.hashes,
        "sampling": {
            "steps": sampling.steps,
            "cfg_scale": sampling.cfg_scale,
            "shift": sampling.shift,
        },
    }
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with torch.no_grad():
            _unet(models, tmp / "unet")
            _vae(models, tmp / "vae")
            _text(models, folders, tmp)
            _scheduler(models, sampling, tmp / "scheduler")
        (tmp / f"{PIPELINE_MODULE}.py").write_text(_pipeline_source(sampling))
        index = {
            "_class_name": [PIPELINE_MODULE, PIPELINE_CLASS],
            "_diffusers_version": require("diffusers", WHAT).__version__,
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "minisd.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.md").write_text(_model_card(models, sampling, record))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, out)
    return out
