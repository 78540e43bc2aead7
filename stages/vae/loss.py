"""The VAE objective: L1 + LPIPS + annealed, free-bits KL + optional PatchGAN (CompVis recipe).

All terms are per-pixel means, so the weights keep their CompVis meaning (whose losses are
sums over pixels divided by the batch): ``kl`` is divided by the 3*H*W pixel values, hence
``kl_weight = 1e-6`` is the SD kl-f8 setting.

- Pixel terms: L1 and/or MSE of ``recon - x``, measured in the data's whitened colour basis
  when ``colour_whitening`` is on (``stages/vae/colour.py``: every colour direction weighs
  alike instead of lightness first; the logged ``l1`` is then in that basis too).

- Cyclical KL annealing (Fu et al. 2019, eq. 3): ``kl_anneal_steps`` are split into
  ``kl_cycles`` cycles; in each, beta ramps linearly 0 -> 1 over the first
  ``kl_ramp_fraction`` of the cycle and stays 1; after ``kl_anneal_steps`` beta = 1.
- Free bits (Kingma et al. 2016, "Improved variational inference with inverse autoregressive
  flow", eq. 15) with one group per latent channel: the channel's KL is averaged over the
  batch (and spatial positions) first, then max(KL_c, lambda): a channel below lambda nats
  per element is not penalised. lambda = 0 gives the plain KL exactly.
- PatchGAN with hinge loss and the adaptive weight of Esser et al. 2021 (eq. 7):
  ||grad_L nll|| / (||grad_L g_loss|| + 1e-4) at the decoder's last layer L, clamped.
  The trainer has one optimizer and one backward, so the two GAN terms are made disjoint:
  the generator term runs the discriminator with detached parameters (no gradient to it),
  the discriminator term sees detached reconstructions (no gradient to the VAE).
"""

from __future__ import annotations

import inspect
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lpips
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn
from torch.func import functional_call

from stages.common.config import ConfigError
from stages.common.files import sha256_file
from stages.common.probe import to_lab
from stages.common.trainer import unwrap

from .colour import in_basis
from .model import DiagonalGaussian


@dataclass(frozen=True)
class VAELossConfig:
    l1_weight: float = 1.0
    mse_weight: float = 0.0
    colour_whitening: bool = False  # pixel terms in the data's whitened colour basis (colour.py)
    chroma_weight: float = 0.0  # L1 of the CIELAB a*, b* difference / 100 (colour, not lightness)
    lpips_weight: float = 1.0  # 0 disables LPIPS: it is then not even built
    lpips_net: Literal["vgg", "alex", "squeeze"] = "vgg"
    lpips_backbone: Literal["pretrained", "random"] = "pretrained"  # random: tests only
    kl_weight: float = 1e-6
    kl_cycles: int = 0  # 0: no annealing, beta = 1 throughout
    kl_anneal_steps: int = 0  # steps over which the cycles are spread
    kl_ramp_fraction: float = 0.5  # R in Fu et al.: share of each cycle spent ramping
    free_bits: float = 0.0  # lambda, nats per latent element of each channel
    discriminator: bool = True
    disc_start: int = 50001  # step at which the GAN terms switch on
    disc_weight: float = 0.5  # multiplies the adaptive weight
    disc_factor: float = 1.0  # scales both GAN terms once started
    disc_channels: int = 64
    disc_layers: int = 3
    adaptive_weight_max: float = 1e4


def kl_beta(step: int, cfg: VAELossConfig) -> float:
    """Cyclical annealing factor in [0, 1]: a pure function of the step."""
    if cfg.kl_cycles <= 0 or cfg.kl_anneal_steps <= 0 or step >= cfg.kl_anneal_steps:
        return 1.0
    period = cfg.kl_anneal_steps / cfg.kl_cycles
    tau = (step % period) / period
    return min(1.0, tau / cfg.kl_ramp_fraction)


def free_bits_kl(posterior: DiagonalGaussian, free_bits: float) -> torch.Tensor:
    """sum_c max(KL_c, lambda) * h * w, KL_c = mean over batch and positions of channel c.

    Scalar, in nats per image; equals the batch mean of ``posterior.kl()`` when lambda = 0.
    """
    kl = posterior.kl_elements()  # (B,C,h,w)
    per_channel = kl.mean(dim=(0, 2, 3))  # (C,) batch-averaged before the threshold
    return per_channel.clamp_min(free_bits).sum() * kl.shape[2] * kl.shape[3]


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


_BACKBONES = {
    "vgg": tvm.VGG16_Weights.IMAGENET1K_V1,
    "alex": tvm.AlexNet_Weights.IMAGENET1K_V1,
    "squeeze": tvm.SqueezeNet1_1_Weights.IMAGENET1K_V1,
}


class LPIPSUnavailable(ConfigError):
    """The LPIPS backbone's ImageNet weights cannot be loaded (no internet, no cached file).

    A ConfigError, so the CLI prints the message (with its fix) and exits 2, no traceback."""


def backbone_path(net: str) -> Path:
    """Where torchvision looks for the backbone's weights: torch hub's cache ($TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _BACKBONES[net].url.rsplit("/", 1)[-1]


def backbone_state(net: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights of an LPIPS backbone, from the torch.hub cache
    (downloaded there once). The sha256 prefix in the file name is checked on every load,
    not only on download as torch.hub does, and nothing is unpickled (weights_only)."""
    path = backbone_path(net)
    prefix = torch.hub.HASH_REGEX.search(path.name).group(1)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(_BACKBONES[net].url, str(path), prefix, progress=False)
    if not sha256_file(path).startswith(prefix):
        raise LPIPSUnavailable(
            f"{path} does not match the sha256 prefix {prefix} in its name: delete it "
            "(it is downloaded again) or put torchvision's file there"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_backbone(backbone: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """lpips slices torchvision's ``features`` into ``slice<k>`` modules named by index."""
    own = {
        f"{name}.{key}": state[f"features.{key}"]
        for name, part in backbone.named_children()
        for key in part.state_dict()
    }
    backbone.load_state_dict(own, strict=True)


def build_lpips(cfg: VAELossConfig, without: Sequence[str] = ("loss.lpips_weight=0",)) -> nn.Module:
    """Frozen LPIPS (Zhang et al. 2018) on images in [-1, 1]; downloads the backbone once.

    Offline, the error names both ways out at once: the file and the exact path to put it
    at, or ``without``, every override that trains without LPIPS (the stage adds its own).
    lpips' own loading unpickles in full (``torch.load`` of its linear layers, torchvision's
    download of the backbone): both are loaded here instead, weights only, the backbone
    against its hash."""
    random_backbone = cfg.lpips_backbone == "random"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lpips passes torchvision's deprecated `pretrained`
            net = lpips.LPIPS(net=cfg.lpips_net, pretrained=False, pnet_rand=True, verbose=False)
        linear = Path(inspect.getfile(lpips.LPIPS)).parent / "weights" / "v0.1"
        state = torch.load(linear / f"{cfg.lpips_net}.pth", map_location="cpu", weights_only=True)
        missing, unexpected = net.load_state_dict(state, strict=False)
        # "lins.<k>" alias "lin<k>" (a ModuleList of the same layers); the rest is the backbone
        if unexpected or any(k.startswith("lin") and not k.startswith("lins.") for k in missing):
            raise RuntimeError(f"lpips' linear layers do not fit: {missing} {unexpected}")
        if not random_backbone:
            _load_backbone(net.net, backbone_state(cfg.lpips_net))
    except (OSError, RuntimeError, pickle.UnpicklingError) as err:
        overrides = " ".join(without)
        raise LPIPSUnavailable(
            f"LPIPS ({cfg.lpips_net}) needs torchvision's ImageNet backbone, which could not "
            f"be loaded ({err}). Either download {_BACKBONES[cfg.lpips_net].url} to "
            f"{backbone_path(cfg.lpips_net)} (torch hub's cache: $TORCH_HOME/hub/checkpoints/, "
            f"by default ~/.cache/torch/hub/checkpoints/), or train without LPIPS with all of "
            f'these overrides: {overrides} (make: ARGS="{overrides}")'
        ) from err
    return net.eval().requires_grad_(False)


class VAELoss:
    """Computes every term from a batch and the VAE's outputs; holds the frozen LPIPS."""

    def __init__(
        self,
        cfg: VAELossConfig,
        lpips_net: nn.Module | None = None,
        colour_basis: torch.Tensor | None = None,
    ) -> None:
        if cfg.colour_whitening and colour_basis is None:
            raise ValueError("loss.colour_whitening needs the data's colour basis (colour.py)")
        self.cfg = cfg
        self.colour_basis = colour_basis if cfg.colour_whitening else None  # (3, 3)
        self.lpips = None
        if cfg.lpips_weight > 0:
            self.lpips = lpips_net if lpips_net is not None else build_lpips(cfg)

    def perceptual(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """LPIPS per image (B,); gradients flow to ``recon`` through the frozen network."""
        if self.lpips is None:
            raise RuntimeError("LPIPS is disabled (loss.lpips_weight = 0)")
        device = x.device
        if next(self.lpips.parameters()).device != device:
            self.lpips.to(device)
        return self.lpips(recon.float(), x.float()).flatten()

    def _adaptive_weight(
        self, nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor
    ) -> torch.Tensor:
        """Esser et al. 2021, eq. 7: balances the GAN gradient against the reconstruction's."""
        if not torch.is_grad_enabled():
            return torch.tensor(self.cfg.disc_weight, device=nll.device)
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
        return weight.clamp(0.0, self.cfg.adaptive_weight_max).detach() * self.cfg.disc_weight

    def __call__(
        self,
        x: torch.Tensor,
        recon: torch.Tensor,
        posterior: DiagonalGaussian,
        step: int,
        disc: nn.Module | None = None,
        last_layer: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """x, recon (B,3,H,W); ``disc`` and ``last_layer`` (decoder.conv_out.weight) when the
        discriminator is on. Returns {"loss": scalar to backprop, other terms detached}."""
        cfg = self.cfg
        pixels = x.shape[1] * x.shape[2] * x.shape[3]
        error = recon.float() - x.float()  # (B,3,H,W)
        if self.colour_basis is not None:
            error = in_basis(self.colour_basis, error)
        l1 = error.abs().mean()
        nll = cfg.l1_weight * l1
        out: dict[str, torch.Tensor] = {"l1": l1.detach()}
        if cfg.mse_weight > 0:
            mse = error.square().mean()
            nll = nll + cfg.mse_weight * mse
            out["mse"] = mse.detach()
        if cfg.chroma_weight > 0:
            # L1 of CIELAB (a*, b*) / 100: the colour, apart from lightness. RGB L1 learns the
            # data's rare colour directions last (green-magenta in emoji: docs/measurements.md).
            chroma = (to_lab(recon)[:, 1:] - to_lab(x)[:, 1:]).abs().mean() / 100
            nll = nll + cfg.chroma_weight * chroma
            out["chroma"] = chroma.detach()
        if self.lpips is not None:
            p_loss = self.perceptual(x, recon).mean()
            nll = nll + cfg.lpips_weight * p_loss
            out["lpips"] = p_loss.detach()
        beta = kl_beta(step, cfg)
        kl_term = free_bits_kl(posterior, cfg.free_bits) / pixels
        loss = nll + cfg.kl_weight * beta * kl_term
        out |= {
            "nll": nll.detach(),
            "kl": posterior.kl().mean().detach(),  # nats per image, before free bits
            "kl_beta": torch.tensor(beta),
        }
        if disc is not None and step >= cfg.disc_start and cfg.disc_factor > 0:
            if last_layer is None:
                raise ValueError("the adaptive weight needs the decoder's last layer")
            g_loss = self.generator_loss(recon, disc)
            d_weight = self._adaptive_weight(nll, g_loss, last_layer)
            d_loss, logits_real, logits_fake = self.discriminator_loss(x, recon, disc)
            loss = loss + cfg.disc_factor * (d_weight * g_loss + d_loss)
            out |= {
                "g_loss": g_loss.detach(),
                "d_loss": d_loss.detach(),
                "d_weight": d_weight.detach(),
                "logits_real": logits_real.detach().mean(),
                "logits_fake": logits_fake.detach().mean(),
            }
        out["loss"] = loss
        return out

    @staticmethod
    def generator_loss(recon: torch.Tensor, disc: nn.Module) -> torch.Tensor:
        """-E[D(recon)], with D's parameters detached: the gradient reaches the VAE only."""
        bare = unwrap(disc)  # parameter names without the DDP prefix
        frozen = {name: p.detach() for name, p in bare.named_parameters()}
        return -functional_call(bare, frozen, (recon,)).mean()

    @staticmethod
    def discriminator_loss(
        x: torch.Tensor, recon: torch.Tensor, disc: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hinge loss on real x and detached recon: the gradient reaches D only.

        -> (d_loss, logits_real (B,1,h',w'), logits_fake (B,1,h',w'))."""
        logits_real = disc(x.detach())
        logits_fake = disc(recon.detach())
        return hinge_d_loss(logits_real, logits_fake), logits_real, logits_fake
