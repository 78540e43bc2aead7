"""The cross-attention UNet: a velocity network ``v = f(x_t, t, text)``; it knows nothing of noise.

Layout (as in Stable Diffusion's UNet, sized by ``UNetModelConfig``):

    conv_in -> down levels [ResBlock (+ SpatialTransformer)] x num_res_blocks, Downsample
            -> mid ResBlock, SpatialTransformer, ResBlock
            -> up levels [concat skip, ResBlock (+ SpatialTransformer)] x (num_res_blocks + 1),
               Upsample
            -> GroupNorm, SiLU, conv_out (zero-initialised: the untrained net predicts v = 0)

Conditioning: ``t`` in [0, 1] goes through a sinusoidal embedding of ``t * time_scale`` and an
MLP; the pooled text state (B, D) is projected and added to that embedding, which every
ResBlock adds to its features (or, with ``scale_shift``, uses to scale and shift them). Transformer blocks attend to themselves and, through
cross-attention, to the text token states (B, L, D) with the padding mask (True = real token)
passed to SDPA as a boolean ``attn_mask`` of shape (B, 1, 1, L). Attention is placed at the
latent resolutions listed in ``attention_resolutions`` (relative to ``sample_size``).
Convolutions run channels-last on CUDA (tensor-core NHWC kernels) and NCHW on CPU, where
oneDNN trains this UNet ~8% faster that way (bench/RESULTS.md, finding 3): ``place(device)``
moves the weights in that layout and ``forward`` follows the input's device. Gradient
checkpointing is optional.

``context_dim = -1`` builds an unconditional network (no cross-attention, no pooled
projection; ``cond`` is None), and ``ff_mult = 0`` drops the feed-forward, so an attention
block is the classic DDPM self-attention block (Ho et al. 2020).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class UNetModelConfig:
    # 0 = taken from the upstream exports / data by the stage (latent channels of the VAE,
    # width of the CLIP text encoder, latent side = data.resolution // VAE factor);
    # context_dim -1 after resolution means unconditional (no text encoder).
    in_channels: int = 0
    context_dim: int = 0
    sample_size: int = 0
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (8, 4)  # latent sides with (cross-)attention
    head_dim: int = 32  # heads = channels // head_dim
    transformer_depth: int = 1
    ff_mult: int = 4  # GEGLU feed-forward inner width = ff_mult * channels; 0: none
    scale_shift: bool = False  # the embedding scales and shifts normalised activations
    groups: int = 32  # GroupNorm groups (capped by channels)
    dropout: float = 0.0
    time_scale: float = 1000.0  # sinusoid of t * time_scale, t in [0, 1]
    channels_last: bool = True  # on CUDA; CPU always runs NCHW (see the module docstring)
    gradient_checkpointing: bool = False


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) -> (B, dim): [cos(t w_k), sin(t w_k)], w_k = max_period^(-k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def layout_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format of a (B, C, H, W) tensor: channels-last or NCHW."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the embedding in between, a skip projection.

    The embedding (time + pooled text) enters either added before ``norm2`` (Stable
    Diffusion) or, with ``scale_shift``, as a per-channel scale and shift of the normalised
    activations, ``norm2(h) * (1 + s) + b`` (Dhariwal & Nichol 2021, "AdaGN"): an offset added
    before a GroupNorm is partly removed again by the group mean, a scale after it is not.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        temb_dim: int,
        groups: int,
        dropout: float,
        scale_shift: bool = False,
    ):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = group_norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, 2 * cout if scale_shift else cout)
        self.norm2 = group_norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        emb = self.temb(F.silu(temb))[:, :, None, None]  # (B, C or 2C, 1, 1)
        if self.scale_shift:
            scale, shift = emb.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + emb)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention through SDPA; ``context=None`` makes it self-attention."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x (B, N, C); context (B, L, Dc); mask (B, L) bool, True = attend.
        context = x if context is None else context
        q, k, v = (
            rearrange(p, "b n (h d) -> b h n d", h=self.heads)
            for p in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    """Gated GELU feed-forward (Shazeer 2020): W2 (GELU(x W_g) * x W_v)."""

    def __init__(self, dim: int, mult: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(self.dropout(value * F.gelu(gate)))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text (if any), feed-forward (if any)."""

    def __init__(self, dim: int, context_dim: int, heads: int, ff_mult: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, dim, heads)
        self.cross_attn = self.ff = None
        if context_dim > 0:
            self.norm2 = nn.LayerNorm(dim)
            self.cross_attn = Attention(dim, context_dim, heads)
        if ff_mult > 0:
            self.norm3 = nn.LayerNorm(dim)
            self.ff = GEGLU(dim, ff_mult, dropout)

    def forward(
        self, x: torch.Tensor, tokens: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm2(x), tokens, mask)
        return x if self.ff is None else x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """(B, C, H, W) -> tokens (B, HW, C) -> transformer blocks -> back, as a residual."""

    def __init__(self, channels: int, cfg: UNetModelConfig):
        super().__init__()
        heads = max(1, channels // cfg.head_dim)
        self.norm = group_norm(channels, cfg.groups)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(
            TransformerBlock(channels, cfg.context_dim, heads, cfg.ff_mult, cfg.dropout)
            for _ in range(cfg.transformer_depth)
        )
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)  # starts as the identity map
        nn.init.zeros_(self.proj_out.bias)

    def forward(
        self, x: torch.Tensor, tokens: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        _, _, height, width = x.shape
        h = self.proj_in(rearrange(self.norm(x), "b c h w -> b (h w) c"))
        for block in self.blocks:
            h = block(h, tokens, mask)
        h = rearrange(self.proj_out(h), "b (h w) c -> b c h w", h=height, w=width)
        # The rearranged view has channels-last strides; match the residual's layout.
        return x + h.contiguous(memory_format=layout_of(x))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One ResBlock and, at attention resolutions, one SpatialTransformer."""

    def __init__(self, cin: int, cout: int, temb_dim: int, attention: bool, cfg: UNetModelConfig):
        super().__init__()
        self.res = ResBlock(cin, cout, temb_dim, cfg.groups, cfg.dropout, cfg.scale_shift)
        self.attn = SpatialTransformer(cout, cfg) if attention else None

    def forward(self, x, temb, tokens, mask):
        x = self.res(x, temb)
        return x if self.attn is None else self.attn(x, tokens, mask)


class UNet(nn.Module):
    """``forward(x_t (B,C,h,w), t (B,) in [0,1], cond) -> prediction (B,C,h,w)``.

    ``cond`` is any object with ``tokens`` (B, L, D), ``mask`` (B, L) bool and ``pooled``
    (B, D): the CLIP export's ``TextCondition``; None for an unconditional network
    (``context_dim = -1``). What the output means (velocity, noise, v) is the objective's.
    """

    def __init__(self, cfg: UNetModelConfig):
        super().__init__()
        for name in ("in_channels", "sample_size"):
            if getattr(cfg, name) <= 0:
                raise ValueError(f"UNetModelConfig.{name} must be resolved (> 0), got 0")
        if cfg.context_dim == 0:
            raise ValueError("UNetModelConfig.context_dim must be resolved (> 0, or -1: no text)")
        if cfg.sample_size % 2 ** (len(cfg.channel_mult) - 1):
            raise ValueError(
                f"UNetModelConfig.sample_size {cfg.sample_size} is not divisible by "
                f"2^{len(cfg.channel_mult) - 1} (one halving per level)"
            )
        self.config = cfg
        base = cfg.base_channels
        temb_dim = 4 * base
        self.time_mlp = nn.Sequential(
            nn.Linear(base, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim)
        )
        self.conditional = cfg.context_dim > 0
        self.pooled_proj = nn.Linear(cfg.context_dim, temb_dim) if self.conditional else None
        self.conv_in = nn.Conv2d(cfg.in_channels, base, 3, padding=1)

        channels = [base * m for m in cfg.channel_mult]
        size = cfg.sample_size
        skips = [base]
        cin = base
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, cout in enumerate(channels):
            attention = size in cfg.attention_resolutions
            for _ in range(cfg.num_res_blocks):
                self.down.append(Level(cin, cout, temb_dim, attention, cfg))
                skips.append(cout)
                cin = cout
            if i < len(channels) - 1:
                self.downsample.append(Downsample(cout))
                skips.append(cout)
                size //= 2
        self.mid_res1 = ResBlock(cin, cin, temb_dim, cfg.groups, cfg.dropout, cfg.scale_shift)
        self.mid_attn = SpatialTransformer(cin, cfg)
        self.mid_res2 = ResBlock(cin, cin, temb_dim, cfg.groups, cfg.dropout, cfg.scale_shift)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, cout in reversed(list(enumerate(channels))):
            attention = size in cfg.attention_resolutions
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(Level(cin + skips.pop(), cout, temb_dim, attention, cfg))
                cin = cout
            if i > 0:
                self.upsample.append(Upsample(cout))
                size *= 2
        self.norm_out = group_norm(cin, cfg.groups)
        self.conv_out = nn.Conv2d(cin, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def layout(self, device: torch.device | str) -> torch.memory_format:
        """Channels-last on CUDA (when configured), NCHW elsewhere."""
        cuda = torch.device(device).type == "cuda"
        return (
            torch.channels_last if cuda and self.config.channels_last else torch.contiguous_format
        )

    def place(self, device: torch.device | str) -> UNet:
        """Move to ``device`` with the 4-D weights in that device's layout (before an
        optimizer or DDP sees the parameters: both keep the strides they first saw)."""
        return self.to(device, memory_format=self.layout(device))

    def _run(self, module: nn.Module, *args: Any) -> torch.Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        cfg = self.config
        if (cond is None) == self.conditional:
            need = "a text condition" if self.conditional else "cond=None (unconditional)"
            raise ValueError(f"this UNet needs {need}")
        x = x.contiguous(memory_format=self.layout(x.device))
        temb = self.time_mlp(sinusoidal_embedding(t * cfg.time_scale, cfg.base_channels))
        tokens = mask = None
        if self.conditional:
            tokens, mask = cond.tokens.to(x.dtype), cond.mask.to(x.device, torch.bool)
            temb = temb + self.pooled_proj(cond.pooled.to(temb.dtype))

        h = self.conv_in(x)
        skips = [h]
        per_level = cfg.num_res_blocks
        for i, level in enumerate(self.down):
            h = self._run(level, h, temb, tokens, mask)
            skips.append(h)
            if (i + 1) % per_level == 0 and (i + 1) // per_level <= len(self.downsample):
                h = self.downsample[(i + 1) // per_level - 1](h)
                skips.append(h)
        h = self._run(self.mid_res1, h, temb)
        h = self._run(self.mid_attn, h, tokens, mask)
        h = self._run(self.mid_res2, h, temb)
        per_level = cfg.num_res_blocks + 1
        for i, level in enumerate(self.up):
            h = self._run(level, torch.cat([h, skips.pop()], dim=1), temb, tokens, mask)
            if (i + 1) % per_level == 0 and (i + 1) // per_level <= len(self.upsample):
                h = self.upsample[(i + 1) // per_level - 1](h)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
