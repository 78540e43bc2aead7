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
        num_res_blocks, latent_channels, quant convs as ours (none in the presets).

The configs are ``stages/{unet,vae}/interop.py``'s, which the diffusers export uses too.
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
from stages.unet.interop import diffusers_unet_kwargs
from stages.unet.model import UNet, UNetModelConfig
from stages.vae.interop import diffusers_vae_kwargs
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


def unet_config(latent_side: int, preset: str = PRESET) -> UNetModelConfig:
    """Our preset UNet resolved as the stage does, for latents of side ``latent_side``."""
    model = preset_model(UNetModelConfig, "unet", preset)
    return replace(
        model,
        in_channels=vae_config(preset).latent_channels,
        context_dim=clip_config(preset).text.width,
        sample_size=latent_side,
    )


def our_unet(cfg: UNetModelConfig) -> UNet:
    return UNet(cfg)


def peer_unet(cfg: UNetModelConfig) -> nn.Module:
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
