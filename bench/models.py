"""Our base-preset networks and diffusers peers built from equal configs (random weights).

Ours come from the presets (``configs/base/{unet,vae,clip}.toml`` over the defaults), with
the UNet's upstream-resolved fields filled as the stage would: latent channels of the VAE,
width of the CLIP text encoder, latent side = image side / VAE factor.

The peers mirror them layer for layer:

    UNet2DConditionModel  block_out_channels = base * channel_mult, layers_per_block =
        num_res_blocks, CrossAttnDownBlock2D / CrossAttnUpBlock2D at the levels whose latent
        side is in attention_resolutions (Down/UpBlock2D elsewhere), cross_attention_dim =
        context width, heads per level = channels // head_dim (diffusers' ``attention_head_dim``
        is a head *count*), linear proj_in/out, GroupNorm eps 1e-6, and the pooled text state
        projected into the time embedding by ``class_embed_type="simple_projection"`` (one
        Linear, exactly our ``pooled_proj``). The sinusoid is [cos, sin] with no shift in both.
        diffusers fixes the GEGLU width at 4x: its FeedForward modules are rebuilt at ff_mult.
    AutoencoderKL  block_out_channels = base * channel_mult, layers_per_block =
        num_res_blocks, latent_channels, no quant convs (ours has none).

``equal_parameters`` is what tests/test_bench.py checks: the counts agree within 1%.
"""

from __future__ import annotations

import tomllib
from dataclasses import replace
from typing import Any, TypeVar

import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from torch import nn

from stages.clip.model import CLIPModelConfig, TextEncoder
from stages.common.config import CONFIGS_DIR, ConfigError, from_dict, merge, to_dict
from stages.unet.model import UNet, UNetConfig
from stages.vae.model import AutoencoderKL, VAEModelConfig

T = TypeVar("T")

PRESET = "base"
VOCAB_SIZE = 32768  # the base tokenizer's size: only the embedding table depends on it


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def preset_model(cls: type[T], stage: str, preset: str = PRESET) -> T:
    """The ``[model]`` table of ``configs/<preset>/<stage>.toml`` over ``cls``'s defaults.

    Only the model section is read (the strict loader checks it the same way): the bench
    needs no data, optimiser or stage imports.
    """
    path = CONFIGS_DIR / preset / f"{stage}.toml"
    if not path.exists():
        raise ConfigError(f"{path} is missing: the bench measures the {preset} preset")
    diff = tomllib.loads(path.read_text()).get("model", {})
    try:
        return from_dict(cls, merge(to_dict(cls()), diff), prefix="model.")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def vae_config(preset: str = PRESET) -> VAEModelConfig:
    return preset_model(VAEModelConfig, "vae", preset)


def clip_config(preset: str = PRESET) -> CLIPModelConfig:
    return preset_model(CLIPModelConfig, "clip", preset)


def unet_config(latent_side: int, preset: str = PRESET) -> UNetConfig:
    """Our preset UNet resolved as the stage does, for latents of side ``latent_side``."""
    model = preset_model(UNetConfig, "unet", preset)
    return replace(
        model,
        in_channels=vae_config(preset).latent_channels,
        context_dim=clip_config(preset).text.width,
        sample_size=latent_side,
    )


def diffusers_unet_kwargs(cfg: UNetConfig) -> dict[str, Any]:
    """UNet2DConditionModel arguments equal to our ``cfg`` (see the module docstring)."""
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


def diffusers_vae_kwargs(cfg: VAEModelConfig) -> dict[str, Any]:
    levels = len(cfg.channel_mult)
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels,
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": tuple(cfg.base_channels * m for m in cfg.channel_mult),
        "layers_per_block": cfg.num_res_blocks,
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_groups,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": cfg.mid_attention,
    }


def our_unet(cfg: UNetConfig) -> UNet:
    return UNet(cfg)


def peer_unet(cfg: UNetConfig) -> nn.Module:
    """UNet2DConditionModel; its feed-forwards re-sized to ``ff_mult`` (it fixes 4)."""
    model = UNet2DConditionModel(**diffusers_unet_kwargs(cfg))
    for block in model.modules():
        if isinstance(block, BasicTransformerBlock) and cfg.ff_mult != 4:
            dim = block.norm3.normalized_shape[0]
            block.ff = FeedForward(
                dim, mult=cfg.ff_mult, dropout=cfg.dropout, activation_fn="geglu"
            )
    return model


def our_vae(cfg: VAEModelConfig) -> AutoencoderKL:
    return AutoencoderKL(cfg)


def peer_vae(cfg: VAEModelConfig) -> nn.Module:
    return DiffusersAutoencoderKL(**diffusers_vae_kwargs(cfg))


def text_encoder(cfg: CLIPModelConfig, vocab_size: int = VOCAB_SIZE) -> TextEncoder:
    """Ours, for both sides: transformers' CLIPTextModel is not installed here."""
    return TextEncoder(cfg.text, vocab_size, cfg.embed_dim)


def equal_parameters(ours: nn.Module, peer: nn.Module, tolerance: float = 0.01) -> bool:
    a, b = count(ours), count(peer)
    return abs(a - b) <= tolerance * max(a, b)


def random_condition(batch: int, length: int, width: int, seed: int = 0) -> Any:
    """A TextCondition of random states with varied lengths (masks True on a prefix)."""
    from stages.clip.export import TextCondition

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, length, width, generator=g)
    mask = torch.arange(length)[None] < torch.randint(2, length + 1, (batch, 1), generator=g)
    return TextCondition(tokens * mask[..., None], mask, torch.randn(batch, width, generator=g))


def random_ids(
    encoder: TextEncoder, batch: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, L) and a prefix mask (B, L) for ``encoder`` (tokenisation is not timed)."""
    g = torch.Generator().manual_seed(seed)
    length = encoder.context_length
    ids = torch.randint(0, encoder.token_embedding.num_embeddings, (batch, length), generator=g)
    mask = torch.arange(length)[None] < torch.randint(2, length + 1, (batch, 1), generator=g)
    return ids, mask
