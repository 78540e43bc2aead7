"""Our autoencoder <-> diffusers' ``AutoencoderKL``: config and weights, both ways.

The two are the same network (the CompVis / Stable Diffusion design), so the conversion is
names only, except for the mid-block attention: our one 1x1 conv ``qkv`` (3C, C, 1, 1) is
diffusers' three Linear ``to_q``, ``to_k``, ``to_v`` (C, C) and our 1x1 ``proj`` its
``to_out.0``. Block lists are walked in the same order on both sides:

    encoder.down.blocks  [ResnetBlock x num_res_blocks, Downsample]  per level, first level first
        <-> encoder.down_blocks.<level>.{resnets.<j>, downsamplers.0}
    decoder.up.blocks    [ResnetBlock x (num_res_blocks + 1), Upsample] per level, deepest first
        <-> decoder.up_blocks.<i>.{resnets.<j>, upsamplers.0}       (i = 0 is the deepest)
    *.mid.blocks         [ResnetBlock, SelfAttention?, ResnetBlock]
        <-> *.mid_block.{resnets.0, attentions.0, resnets.1}

Nothing here imports diffusers: these are plain dicts of tensors and of config values.
A diffusers config this network cannot express is refused with its key named.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from stages.common.config import ConfigError

from .model import VAEModelConfig

# AutoencoderKL config keys that carry no architecture (or are re-measured on import).
# (Keys starting with "_" are diffusers' bookkeeping: versions, names.)
_IGNORED = {
    "sample_size",
    "scaling_factor",
    "shift_factor",
    "latents_mean",
    "latents_std",
    "force_upcast",
}
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2"}


def diffusers_vae_kwargs(cfg: VAEModelConfig) -> dict[str, Any]:
    """AutoencoderKL arguments that build the network ``cfg`` describes."""
    levels = len(cfg.channel_mult)
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels,
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": tuple(cfg.base_channels * m for m in cfg.channel_mult),
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_groups,
        "use_quant_conv": cfg.quant_conv,
        "use_post_quant_conv": cfg.quant_conv,
        "mid_block_add_attention": cfg.mid_attention,
    }


def _refuse(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"AutoencoderKL config key '{key}' = {value!r}: {why}")


def config_from_diffusers(config: dict[str, Any]) -> VAEModelConfig:
    """Our VAEModelConfig for a diffusers AutoencoderKL ``config.json``; refuses, naming
    the key, what our network cannot express."""
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise _refuse("_class_name", config["_class_name"], "only AutoencoderKL is imported")
    known = set(diffusers_vae_kwargs(VAEModelConfig())) | _IGNORED
    unknown = sorted(k for k in set(config) - known if not k.startswith("_"))
    if unknown:
        raise _refuse(unknown[0], config[unknown[0]], "not a key this importer knows")
    channels = [int(c) for c in config.get("block_out_channels", (64,))]
    base = channels[0]
    if any(c % base for c in channels):
        raise _refuse("block_out_channels", channels, "every width must be a multiple of the first")
    levels = len(channels)
    for key, want in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        types = list(config.get(key, [want] * levels))
        if types != [want] * levels:
            raise _refuse(key, types, f"only {want} blocks, one per width, are expressible")
    if config.get("act_fn", "silu") != "silu":
        raise _refuse("act_fn", config["act_fn"], "our blocks use SiLU")
    in_channels = int(config.get("in_channels", 3))
    if int(config.get("out_channels", 3)) != in_channels:
        raise _refuse(
            "out_channels", config["out_channels"], f"must equal in_channels {in_channels}"
        )
    quant = bool(config.get("use_quant_conv", True))
    if bool(config.get("use_post_quant_conv", True)) != quant:
        raise _refuse(
            "use_post_quant_conv", config["use_post_quant_conv"], "must equal use_quant_conv"
        )
    try:
        return VAEModelConfig(
            in_channels=in_channels,
            base_channels=base,
            channel_mult=tuple(c // base for c in channels),
            num_res_blocks=int(config.get("layers_per_block", 1)),
            latent_channels=int(config.get("latent_channels", 4)),
            norm_groups=int(config.get("norm_num_groups", 32)),
            mid_attention=bool(config.get("mid_block_add_attention", True)),
            quant_conv=quant,
        )
    except ConfigError as err:
        raise ConfigError(f"AutoencoderKL config: {err}") from err


def _encoder_pairs(cfg: VAEModelConfig) -> list[tuple[str, str]]:
    """(our module, diffusers module) for every module of the encoder but the attention."""
    pairs = [("encoder.conv_in", "encoder.conv_in")]
    k = 0
    for level in range(len(cfg.channel_mult)):
        for j in range(cfg.num_res_blocks):
            pairs.append((f"encoder.down.blocks.{k}", f"encoder.down_blocks.{level}.resnets.{j}"))
            k += 1
        if level < len(cfg.channel_mult) - 1:
            ours = f"encoder.down.blocks.{k}.conv"
            pairs.append((ours, f"encoder.down_blocks.{level}.downsamplers.0.conv"))
            k += 1
    pairs += [
        ("encoder.norm_out", "encoder.conv_norm_out"),
        ("encoder.conv_out", "encoder.conv_out"),
    ]
    return pairs


def _decoder_pairs(cfg: VAEModelConfig) -> list[tuple[str, str]]:
    pairs = [("decoder.conv_in", "decoder.conv_in")]
    k = 0
    levels = len(cfg.channel_mult)
    for i in range(levels):  # i = 0 is the deepest level, as our decoder runs them
        for j in range(cfg.num_res_blocks + 1):
            pairs.append((f"decoder.up.blocks.{k}", f"decoder.up_blocks.{i}.resnets.{j}"))
            k += 1
        if i < levels - 1:
            pairs.append(
                (f"decoder.up.blocks.{k}.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
            )
            k += 1
    pairs += [
        ("decoder.norm_out", "decoder.conv_norm_out"),
        ("decoder.conv_out", "decoder.conv_out"),
    ]
    return pairs


def _module_pairs(cfg: VAEModelConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(plain module pairs, attention pairs); ResnetBlocks expand to their layers."""
    plain, attention = _encoder_pairs(cfg) + _decoder_pairs(cfg), []
    for side in ("encoder", "decoder"):
        plain.append((f"{side}.mid.blocks.0", f"{side}.mid_block.resnets.0"))
        last = 2 if cfg.mid_attention else 1
        plain.append((f"{side}.mid.blocks.{last}", f"{side}.mid_block.resnets.1"))
        if cfg.mid_attention:
            attention.append((f"{side}.mid.blocks.1", f"{side}.mid_block.attentions.0"))
    if cfg.quant_conv:
        plain += [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    return plain, attention


def _renames(keys: Iterable[str], cfg: VAEModelConfig) -> dict[str, str]:
    """Our key -> diffusers key, for every tensor converted by renaming alone (all but the
    mid-block attentions)."""
    renames = dict(_module_pairs(cfg)[0])
    out = {}
    for key in keys:
        module, _, param = key.rpartition(".")
        parent, _, layer = module.rpartition(".")
        if module in renames:
            out[key] = f"{renames[module]}.{param}"
        elif parent in renames and layer in _RESNET:
            out[key] = f"{renames[parent]}.{_RESNET[layer]}.{param}"
        elif parent in renames and layer == "skip":
            out[key] = f"{renames[parent]}.conv_shortcut.{param}"
    return out


def _our_keys(cfg: VAEModelConfig) -> list[str]:
    from .model import AutoencoderKL

    with torch.device("meta"):  # names only: no memory, no initialisation cost
        return list(AutoencoderKL(cfg).state_dict())


def to_diffusers(state: dict[str, torch.Tensor], cfg: VAEModelConfig) -> dict[str, torch.Tensor]:
    """Our AutoencoderKL state dict -> diffusers' AutoencoderKL state dict."""
    out = {theirs: state[ours] for ours, theirs in _renames(state, cfg).items()}
    for ours, theirs in _module_pairs(cfg)[1]:
        out[f"{theirs}.group_norm.weight"] = state[f"{ours}.norm.weight"]
        out[f"{theirs}.group_norm.bias"] = state[f"{ours}.norm.bias"]
        # qkv (3C, C, 1, 1) -> to_q, to_k, to_v (C, C) each; proj (C, C, 1, 1) -> to_out.0
        weights = state[f"{ours}.qkv.weight"].flatten(1).chunk(3)
        biases = state[f"{ours}.qkv.bias"].chunk(3)
        for name, w, b in zip(("to_q", "to_k", "to_v"), weights, biases):
            out[f"{theirs}.{name}.weight"], out[f"{theirs}.{name}.bias"] = w.clone(), b.clone()
        out[f"{theirs}.to_out.0.weight"] = state[f"{ours}.proj.weight"].flatten(1)
        out[f"{theirs}.to_out.0.bias"] = state[f"{ours}.proj.bias"]
    return out


# diffusers' attention blocks before v0.14 named their layers differently (SD's own files).
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def from_diffusers(state: dict[str, torch.Tensor], cfg: VAEModelConfig) -> dict[str, torch.Tensor]:
    """diffusers' AutoencoderKL state dict -> ours (the inverse of ``to_diffusers``)."""
    state = dict(state)
    for key in list(state):
        for old, new in _LEGACY_ATTENTION.items():
            if f".attentions.0.{old}." in key:
                state[key.replace(f".attentions.0.{old}.", f".attentions.0.{new}.")] = state.pop(
                    key
                )

    def get(key: str) -> torch.Tensor:
        if key not in state:
            raise ValueError(
                f"the AutoencoderKL weights lack {key}: not the architecture its config says"
            )
        return state[key]

    out = {ours: get(theirs) for ours, theirs in _renames(_our_keys(cfg), cfg).items()}
    for ours, theirs in _module_pairs(cfg)[1]:
        # to_q, to_k, to_v (C, C), or legacy (C, C, 1, 1) -> qkv (3C, C, 1, 1)
        names = ("to_q", "to_k", "to_v")
        out[f"{ours}.qkv.weight"] = torch.cat(
            [get(f"{theirs}.{n}.weight").flatten(1) for n in names]
        )[..., None, None]
        out[f"{ours}.qkv.bias"] = torch.cat([get(f"{theirs}.{n}.bias") for n in names])
        out[f"{ours}.proj.weight"] = get(f"{theirs}.to_out.0.weight").flatten(1)[..., None, None]
        out[f"{ours}.proj.bias"] = get(f"{theirs}.to_out.0.bias")
        out[f"{ours}.norm.weight"] = get(f"{theirs}.group_norm.weight")
        out[f"{ours}.norm.bias"] = get(f"{theirs}.group_norm.bias")
    return out


def check_exportable(cfg: VAEModelConfig) -> None:
    """Refuse, naming our key, what AutoencoderKL cannot express (it clamps the posterior
    log-variance to [-30, 20] and has no gradient-checkpointing switch in its config)."""
    defaults = VAEModelConfig()
    for key in ("logvar_min", "logvar_max"):
        if getattr(cfg, key) != getattr(defaults, key):
            raise ConfigError(
                f"model.{key} = {getattr(cfg, key)}: diffusers' AutoencoderKL clamps the "
                f"log-variance at {getattr(defaults, key)}, so this VAE cannot be exported"
            )
