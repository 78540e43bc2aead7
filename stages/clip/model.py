"""The CLIP towers: a causal text transformer and a small ViT over latents or pixels.

Both are pre-LN transformers (``x + attn(ln(x))``, ``x + mlp(ln(x))``) using PyTorch's
``scaled_dot_product_attention``. The text encoder combines the causal mask with the key
padding mask and pools the final-LayerNorm state at the end-of-text position, found from
the mask (``mask.sum() - 1``) rather than by the argmax of ids, so the pad id or any other id
may be the largest. Networks only map inputs to features: no loss, tokenizer or VAE here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .tokenizer import end_positions


@dataclass(frozen=True)
class TextEncoderConfig:
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class ImageTowerConfig:
    input: Literal["latent", "pixel"] = "latent"  # normalised VAE latents, or images in [-1, 1]
    patch_size: int = 2  # 1-2 on latents; 4-16 on pixels
    width: int = 384
    layers: int = 6
    heads: int = 6
    mlp_ratio: float = 4.0
    pool: Literal["cls", "mean"] = "mean"  # mean pooling learns faster from few samples


@dataclass(frozen=True)
class CLIPModelConfig:
    embed_dim: int = 512  # the joint text-image embedding both towers project to
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        # x (B, N, D); attn_mask (B, 1, N, N) bool, True = may attend.
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(rearrange(y, "b h n d -> b n (h d)"))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), attn_mask)
        return x + self.mlp(self.ln2(x))


def _init_transformer(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class TextOutput(NamedTuple):
    tokens: torch.Tensor  # (B, L, D) final-LayerNorm states, zero at pad positions
    mask: torch.Tensor  # (B, L) bool, True = real token
    pooled: torch.Tensor  # (B, D) state at the end-of-text token
    embedding: torch.Tensor  # (B, E) ``pooled`` projected to the joint space, not normalised


class TextEncoder(nn.Module):
    """ids (B, L) + mask (B, L) bool -> ``TextOutput``."""

    def __init__(self, config: TextEncoderConfig, vocab_size: int, embed_dim: int):
        super().__init__()
        self.config = config
        self.width = config.width
        self.context_length = config.context_length
        self.token_embedding = nn.Embedding(vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.blocks = nn.ModuleList(
            Block(config.width, config.heads, config.mlp_ratio) for _ in range(config.layers)
        )
        self.ln_final = nn.LayerNorm(config.width)
        self.projection = nn.Linear(config.width, embed_dim, bias=False)
        _init_transformer(self)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> TextOutput:
        batch, length = ids.shape
        if length != self.context_length:
            raise ValueError(f"ids have length {length}, the encoder takes {self.context_length}")
        # Pads come last and attention is causal, so no real token sees a column past the
        # longest caption of the batch: run only the first ``used`` positions (short
        # captions in a 77-token context) and pad the states back with zeros.
        used = int(mask.sum(dim=1).max())
        x = self.token_embedding(ids[:, :used]) + self.positional_embedding[:used]
        # (B, 1, U, U): query i sees key j <= i that is a real token. Every row keeps at
        # least the start token, so no row is fully masked. (Built per call, not a buffer:
        # data-parallel wrappers would broadcast a buffer.)
        causal = torch.ones(used, used, dtype=torch.bool, device=ids.device).tril()
        attn_mask = causal & mask[:, None, None, :used]
        for block in self.blocks:
            x = block(x, attn_mask)
        x = self.ln_final(x)
        pooled = x[torch.arange(batch, device=x.device), end_positions(mask)]
        # Pad positions carry no information: zero, so a consumer ignoring the mask sees
        # nothing there. (B, U, D) -> (B, L, D).
        tokens = F.pad(x * mask[:, :used, None].to(x.dtype), (0, 0, 0, length - used))
        return TextOutput(tokens, mask, pooled, self.projection(pooled))


class ImageTower(nn.Module):
    """A ViT: (B, C, H, W) -> (B, E) joint-space embedding, not normalised."""

    def __init__(self, config: ImageTowerConfig, in_channels: int, size: int, embed_dim: int):
        super().__init__()
        if size % config.patch_size:
            raise ValueError(f"image size {size} is not divisible by patch {config.patch_size}")
        self.config = config
        self.in_channels = in_channels
        self.size = size
        grid = size // config.patch_size
        self.patch = nn.Conv2d(in_channels, config.width, config.patch_size, config.patch_size)
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, config.width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, config.width))
        self.ln_pre = nn.LayerNorm(config.width)
        self.blocks = nn.ModuleList(
            Block(config.width, config.heads, config.mlp_ratio) for _ in range(config.layers)
        )
        self.ln_final = nn.LayerNorm(config.width)
        self.projection = nn.Linear(config.width, embed_dim, bias=False)
        _init_transformer(self)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.class_embedding, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (self.in_channels, self.size, self.size):
            raise ValueError(
                f"image tower takes (B, {self.in_channels}, {self.size}, {self.size}), "
                f"got {tuple(x.shape)}"
            )
        patches = rearrange(self.patch(x), "b d h w -> b (h w) d")
        cls = self.class_embedding.expand(patches.shape[0], -1, -1)
        h = self.ln_pre(torch.cat([cls, patches], dim=1) + self.positional_embedding)
        for block in self.blocks:
            h = block(h)
        h = self.ln_final(h)
        pooled = h[:, 0] if self.config.pool == "cls" else h[:, 1:].mean(dim=1)
        return self.projection(pooled)
