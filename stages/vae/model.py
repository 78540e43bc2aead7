"""The autoencoder: a KL-regularised convolutional VAE (the Stable Diffusion / CompVis design).

Encoder: conv_in -> per level [ResnetBlock x num_res_blocks, Downsample except the last] ->
mid [ResnetBlock, SelfAttention, ResnetBlock] -> GroupNorm, SiLU, conv_out to 2C channels
(posterior mean and log-variance). The decoder mirrors it with num_res_blocks + 1 blocks per
level and nearest-neighbour upsampling. The downsampling factor is 2 ** (len(channel_mult) - 1).
``quant_conv`` adds Stable Diffusion's two 1x1 convolutions (on the 2C moments after the
encoder, on z before the decoder): off for the VAEs trained here, on for one imported from
diffusers that has them (SD's own), so its weights load unchanged.
The network knows nothing of losses: ``stages.vae.loss`` owns the maths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from stages.common.config import ConfigError

from .colour import fold_into_conv, in_basis


@dataclass(frozen=True)
class VAEModelConfig:
    in_channels: int = 3
    base_channels: int = 128  # width of the first level; level i has base * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # factor = 2 ** (len - 1): 8 here
    num_res_blocks: int = 2  # per encoder level (the decoder has one more)
    latent_channels: int = 4
    norm_groups: int = 32  # GroupNorm groups; must divide every level's width
    mid_attention: bool = True  # one single-head self-attention in each mid block
    dropout: float = 0.0
    logvar_min: float = -30.0  # the posterior log-variance is clamped to this range
    logvar_max: float = 20.0
    gradient_checkpointing: bool = False  # recompute blocks in backward (512 px on small GPUs)
    quant_conv: bool = False  # SD's 1x1 quant_conv / post_quant_conv (imported VAEs only)

    def __post_init__(self) -> None:
        if not self.channel_mult:
            raise ConfigError("model.channel_mult: needs at least one level")
        for mult in self.channel_mult:
            width = self.base_channels * mult
            if mult <= 0 or width % self.norm_groups:
                raise ConfigError(
                    f"model.norm_groups: {self.norm_groups} does not divide the level width "
                    f"{width} (base_channels {self.base_channels} x channel_mult {mult})"
                )
        if self.logvar_min >= self.logvar_max:
            raise ConfigError("model.logvar_min must be below model.logvar_max")

    @property
    def factor(self) -> int:
        """Spatial downsampling from image to latent."""
        return 2 ** (len(self.channel_mult) - 1)


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))) per latent element; mean, logvar (B,C,h,w)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        self.mean = mean
        self.logvar = logvar
        self.std = torch.exp(0.5 * logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I) (the reparameterisation trick)."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl_elements(self) -> torch.Tensor:
        """KL(q || N(0, 1)) per latent element, (B,C,h,w): 0.5 (mu^2 + sigma^2 - 1 - log sigma^2)."""
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per sample in nats, (B,)."""
        return self.kl_elements().sum(dim=(1, 2, 3))


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual (1x1 conv when the width changes)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,in,H,W) -> (B,out,H,W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions, residual; SDPA does the maths."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,C,H,W) -> (B,C,H,W)
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, 1, c, h * w).transpose(-1, -2)
        q, k, v = qkv.unbind(dim=1)  # each (B,1,HW,C)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv with (0,1,0,1) padding, as in the SD VAE: H -> H/2 exactly."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (no checkerboard artefacts of transposed convs)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Blocks(nn.Module):
    """Runs a list of blocks, optionally with activation checkpointing."""

    def __init__(self, blocks: list[nn.Module], checkpointing: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.checkpointing = checkpointing

    def step(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, use_reentrant=False)
        return block(h)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = self.step(block, h)
        return h


def _run(h: torch.Tensor, *stages: _Blocks) -> torch.Tensor:
    """``stages`` one block after another in one frame, each input freed once used.

    A nested module call ``mid(down(h))`` keeps ``h`` alive until ``down`` returns, since
    ``nn.Module.__call__`` holds its arguments in a tuple: for the encoder that was conv_in's
    full-resolution output through the entire down pass, +128 MiB of inference peak at 512 px
    (+9% over diffusers, bench/RESULTS.md). A plain function call hands its argument over
    (CPython >= 3.11 moves it into the callee's frame), so here only ``h`` refers to it.
    """
    for stage in stages:
        for block in stage.blocks:
            h = stage.step(block, h)
    return h


def _mid(channels: int, cfg: VAEModelConfig) -> _Blocks:
    blocks: list[nn.Module] = [ResnetBlock(channels, channels, cfg.norm_groups, cfg.dropout)]
    if cfg.mid_attention:
        blocks.append(SelfAttention(channels, cfg.norm_groups))
    blocks.append(ResnetBlock(channels, channels, cfg.norm_groups, cfg.dropout))
    return _Blocks(blocks, cfg.gradient_checkpointing)


class Encoder(nn.Module):
    """(B,3,H,W) -> (B,2C,H/f,W/f): posterior mean and log-variance stacked on channels."""

    def __init__(self, cfg: VAEModelConfig) -> None:
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        # A fixed (3, 3) colour basis the input is taken to before conv_in (set by the VAE
        # stage under loss.colour_whitening, stages/vae/colour.py). Not saved: the stage
        # measures it again on resume, and the export folds it into conv_in.
        self.register_buffer("input_basis", None, persistent=False)
        blocks: list[nn.Module] = []
        ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(ch, width, cfg.norm_groups, cfg.dropout))
                ch = width
            if level < len(widths) - 1:
                blocks.append(Downsample(ch))
        self.down = _Blocks(blocks, cfg.gradient_checkpointing)
        self.mid = _mid(ch, cfg)
        self.norm_out = _norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_basis is not None:
            x = in_basis(self.input_basis, x)
        h = _run(self.conv_in(x), self.down, self.mid)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B,C,h,w) -> (B,3,h*f,w*f), unbounded (targets are in [-1,1]; no tanh, as in SD)."""

    def __init__(self, cfg: VAEModelConfig) -> None:
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid = _mid(ch, cfg)
        blocks: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, widths[level], cfg.norm_groups, cfg.dropout))
                ch = widths[level]
            if level > 0:
                blocks.append(Upsample(ch))
        self.up = _Blocks(blocks, cfg.gradient_checkpointing)
        self.norm_out = _norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)  # the adaptive-weight layer

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run(self.conv_in(z), self.mid, self.up)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """Image (B,3,H,W) in [-1,1] <-> latent (B,C,H/f,W/f), with a diagonal Gaussian posterior."""

    def __init__(self, config: VAEModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        channels = config.latent_channels
        # Created only when on: the state dict of a VAE without them keeps its keys.
        self.quant_conv = nn.Conv2d(2 * channels, 2 * channels, 1) if config.quant_conv else None
        self.post_quant_conv = nn.Conv2d(channels, channels, 1) if config.quant_conv else None

    @property
    def factor(self) -> int:
        return self.config.factor

    def set_input_basis(self, basis: torch.Tensor | None) -> None:
        """Take every input pixel to the fixed (3, 3) colour ``basis`` before the encoder
        (None: the identity); the EMA copy made afterwards carries it too."""
        weight = self.encoder.conv_in.weight
        self.encoder.input_basis = None if basis is None else basis.to(weight)

    def plain_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict of the same function without an input basis: conv_in is linear and
        zero-padded, so ``conv_in(W x) = conv_in'(x)`` with ``conv_in'.weight[o, c] =
        sum_j weight[o, j] W[j, c]`` (exact up to rounding). Exports save this."""
        state = {k: v.detach() for k, v in self.state_dict().items()}
        basis = self.encoder.input_basis
        if basis is not None:
            weight = state["encoder.conv_in.weight"]  # (out, 3, k, k)
            state["encoder.conv_in.weight"] = fold_into_conv(weight, basis)
        return state

    def _check(self, x: torch.Tensor) -> None:
        f = self.factor
        if (
            x.ndim != 4
            or x.shape[1] != self.config.in_channels
            or x.shape[-1] % f
            or x.shape[-2] % f
        ):
            raise ValueError(
                f"expected images (B,{self.config.in_channels},H,W) with H and W divisible by "
                f"{f}, got {tuple(x.shape)}"
            )

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        self._check(x)
        moments = self.encoder(x)  # (B,2C,h,w)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)  # each (B,C,h,w)
        return DiagonalGaussian(mean, logvar.clamp(self.config.logvar_min, self.config.logvar_max))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (reconstruction (B,3,H,W), posterior mean (B,C,h,w), clamped logvar (B,C,h,w)).

        Plain tensors (not a DiagonalGaussian) so DDP and accelerate's output casting see
        them; rebuild the posterior with ``DiagonalGaussian(mean, logvar)``.
        """
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior.mean, posterior.logvar
