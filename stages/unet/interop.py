"""Our UNet -> diffusers' ``UNet2DConditionModel``: config and weights.

The network is Stable Diffusion's layout, so most of the conversion is names:

    time_mlp.0 / .2            time_embedding.linear_1 / .linear_2   (sinusoid [cos, sin], no shift)
    pooled_proj                class_embedding   (class_embed_type "simple_projection": one Linear
                               of the pooled text state added to the time embedding, as ours)
    down.<k>                   down_blocks.<k // n>.{resnets, attentions}.<k % n>,  n = num_res_blocks
    downsample.<i>             down_blocks.<i>.downsamplers.0
    mid_res1, mid_attn, mid_res2   mid_block.resnets.0, attentions.0, resnets.1
    up.<k>                     up_blocks.<k // (n + 1)>.{resnets, attentions}.<k % (n + 1)>
    ResBlock temb / skip       time_emb_proj / conv_shortcut   (scale_shift -> "scale_shift")
    SpatialTransformer blocks  transformer_blocks; self_attn / cross_attn -> attn1 / attn2,
                               to_out -> to_out.0, ff.proj / ff.out -> ff.net.0.proj / ff.net.2

diffusers fixes the GEGLU feed-forward at 4x the width. A narrower one (``ff_mult`` < 4, or 0:
none) is padded with zeros: the extra value rows, gate rows and output columns are 0, so each
extra unit computes 0 * GELU(0) = 0 and adds exactly nothing. Wider than 4x is refused, as is
anything else the config cannot express, naming our key. Nothing here imports diffusers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stages.common.config import ConfigError

from .export import InputsConfig
from .model import UNet, UNetModelConfig
from .objectives import ObjectiveConfig

DIFFUSERS_FF_MULT = 4  # BasicTransformerBlock's FeedForward: inner width = 4 x dim
_RESBLOCK = {"temb": "time_emb_proj", "skip": "conv_shortcut"}
_TRANSFORMER_BLOCK = {
    "self_attn": "attn1",
    "cross_attn": "attn2",
    "to_out": "to_out.0",
    "proj": "net.0.proj",
    "out": "net.2",
}


def diffusers_unet_kwargs(cfg: UNetModelConfig) -> dict[str, Any]:
    """UNet2DConditionModel arguments equal to our ``cfg`` (its feed-forward is 4x wide)."""
    channels = tuple(cfg.base_channels * m for m in cfg.channel_mult)
    sides = [cfg.sample_size // 2**i for i in range(len(channels))]
    attention = [side in cfg.attention_resolutions for side in sides]
    return {
        "sample_size": cfg.sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels,
        "down_block_types": tuple(
            "CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention
        ),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": tuple(
            "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)
        ),
        "block_out_channels": channels,
        "layers_per_block": cfg.num_res_blocks,
        "norm_num_groups": cfg.groups,
        "norm_eps": 1e-6,
        "cross_attention_dim": cfg.context_dim,
        # diffusers' ``attention_head_dim`` is a head *count* per level
        "attention_head_dim": tuple(max(1, c // cfg.head_dim) for c in channels),
        "transformer_layers_per_block": cfg.transformer_depth,
        "use_linear_projection": True,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "class_embed_type": "simple_projection",
        "projection_class_embeddings_input_dim": cfg.context_dim,
        "dropout": cfg.dropout,
        # ours: norm2(h) * (1 + scale) + shift, as diffusers' ResnetBlock2D "scale_shift"
        "resnet_time_scale_shift": "scale_shift" if cfg.scale_shift else "default",
    }


def check_exportable(
    cfg: UNetModelConfig, inputs: InputsConfig, objective: ObjectiveConfig
) -> None:
    """Refuse, naming our key, a UNet that UNet2DConditionModel + the flow-matching pipeline
    cannot reproduce."""
    if not inputs.text:
        raise ConfigError(
            "inputs.text = false: the diffusers export is the text-to-image pipeline; an "
            "unconditional UNet has no text encoder to export"
        )
    if inputs.autoencoder != "vae":
        raise ConfigError(
            f"inputs.autoencoder = {inputs.autoencoder!r}: the diffusers export is a latent "
            "pipeline (UNet + VAE); a pixel-space UNet is not exported"
        )
    if objective.kind != "flow":
        raise ConfigError(
            f"objective.kind = {objective.kind!r}: the export ships FlowMatchEulerDiscreteScheduler; "
            "only flow-matching UNets are exported"
        )
    if not 0 <= cfg.ff_mult <= DIFFUSERS_FF_MULT:
        raise ConfigError(
            f"model.ff_mult = {cfg.ff_mult}: diffusers' transformer blocks have a fixed "
            f"{DIFFUSERS_FF_MULT}x feed-forward; a narrower one is padded with zeros, a wider "
            "one cannot be expressed"
        )
    if cfg.time_scale != round(cfg.time_scale) or cfg.time_scale < 1:
        raise ConfigError(
            f"model.time_scale = {cfg.time_scale}: diffusers feeds the UNet sigma x "
            "num_train_timesteps, an integer"
        )
    with torch.device("meta"):
        norms = [m for m in UNet(cfg).modules() if isinstance(m, nn.GroupNorm)]
    odd = sorted({m.num_channels for m in norms if m.num_groups != cfg.groups})
    if odd:
        raise ConfigError(
            f"model.groups = {cfg.groups} does not divide the widths {odd}: ours then uses "
            "fewer groups there, diffusers one group count everywhere"
        )


def _rename(key: str, cfg: UNetModelConfig) -> str:
    """One of our state-dict keys -> diffusers' name for it (feed-forward shapes aside)."""
    parts = key.split(".")
    head, rest = parts[0], parts[1:]
    if head == "time_mlp":
        return ".".join(["time_embedding", {"0": "linear_1", "2": "linear_2"}[rest[0]], *rest[1:]])
    if head == "pooled_proj":
        return ".".join(["class_embedding", *rest])
    if head in ("conv_in", "conv_out"):
        return key
    if head == "norm_out":
        return ".".join(["conv_norm_out", *rest])
    if head in ("downsample", "upsample"):
        block = "down_blocks" if head == "downsample" else "up_blocks"
        return ".".join([block, rest[0], f"{head}rs", "0", *rest[1:]])
    if head in ("down", "up"):
        per = cfg.num_res_blocks + (head == "up")
        k = int(rest[0])
        kind = {"res": "resnets", "attn": "attentions"}[rest[1]]
        prefix = [f"{head}_blocks", str(k // per), kind, str(k % per)]
        inner = rest[2:]
    elif head.startswith("mid_"):
        kind, index = {"mid_res1": ("resnets", "0"), "mid_attn": ("attentions", "0"),
                       "mid_res2": ("resnets", "1")}[head]  # fmt: skip
        prefix, inner = ["mid_block", kind, index], rest
    else:
        raise ValueError(f"unexpected UNet weight {key}")
    if kind == "resnets":
        inner = [_RESBLOCK.get(inner[0], inner[0]), *inner[1:]]
    elif inner[0] == "blocks":
        inner = ["transformer_blocks", *(_TRANSFORMER_BLOCK.get(p, p) for p in inner[1:])]
    return ".".join(prefix + inner)


def _pad_ff(name: str, value: torch.Tensor, mult: int) -> torch.Tensor:
    """Zero-pad a GEGLU of ``mult`` x its width to diffusers' 4x (see the module docstring)."""
    if ".net.0.proj." in name:
        # rows [value (mult*dim); gate (mult*dim)] -> [value, 0 ...; gate, 0 ...] of 2 * full
        dim = value.shape[0] // (2 * mult)
        full = DIFFUSERS_FF_MULT * dim
        value_rows, gate_rows = value.chunk(2)
        out = value.new_zeros((2 * full, *value.shape[1:]))
        out[: mult * dim] = value_rows
        out[full : full + mult * dim] = gate_rows
        return out
    dim = value.shape[0]
    out = value.new_zeros((dim, DIFFUSERS_FF_MULT * dim))  # net.2.weight: (dim, mult*dim) ->
    out[:, : mult * dim] = value
    return out


def to_diffusers(state: dict[str, torch.Tensor], cfg: UNetModelConfig) -> dict[str, torch.Tensor]:
    """Our UNet state dict -> a UNet2DConditionModel state dict (``check_exportable`` first)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = _rename(key, cfg)
        if ".ff.net." in name and not name.endswith("net.2.bias") and cfg.ff_mult != 4:
            value = _pad_ff(name, value, cfg.ff_mult)
        out[name] = value
    if cfg.ff_mult == 0:  # no feed-forward: a zero one (and an identity norm) adds nothing
        for key in [k for k in out if k.endswith(".attn1.to_out.0.bias")]:
            block = key[: -len(".attn1.to_out.0.bias")]
            dim = out[key].shape[0]
            full = DIFFUSERS_FF_MULT * dim
            out[f"{block}.norm3.weight"] = torch.ones(dim)
            out[f"{block}.norm3.bias"] = torch.zeros(dim)
            out[f"{block}.ff.net.0.proj.weight"] = torch.zeros(2 * full, dim)
            out[f"{block}.ff.net.0.proj.bias"] = torch.zeros(2 * full)
            out[f"{block}.ff.net.2.weight"] = torch.zeros(dim, full)
            out[f"{block}.ff.net.2.bias"] = torch.zeros(dim)
    return out
