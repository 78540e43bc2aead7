"""The data's colour basis, so that a pixel loss hears every colour direction alike.

RGB pixel losses learn a data set's colour directions in order of their variance, like any
regression (Saxe et al. 2014: a deep linear network learns each mode in a time inversely
proportional to its strength). In emoji the three principal directions of the RGB
covariance carry variance 0.96 (lightness), 0.10 (yellow-blue) and 0.022 (green-magenta, the
CIELAB a* axis): a 500-step VAE with an L1 or MSE loss had not learned the last one at all,
so greens came back yellow and purples grey (docs/measurements.md, "Images that follow the prompt").

``whitening(cov)`` is ``W = U diag(sqrt(lambda_max / lambda_i)) U^T`` for the covariance's
eigen-decomposition ``U diag(lambda) U^T``: it keeps the strongest direction's scale and
stretches every other one to the same standard deviation. A pixel loss on ``W (recon - x)``
(``loss.colour_whitening``) then weighs a green-magenta error as much as a lightness one of
the same number of standard deviations. The matrix is measured once on images spread over
the training split (the same on every rank and on resume) and only the loss uses it: the
network and its export are unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stages.common.data import CorruptSample, ShardDataset, load_index

MEASURED_IMAGES = 2048  # training images the covariance is measured on


@torch.no_grad()
def colour_covariance(images: torch.Tensor) -> torch.Tensor:
    """(3, 3) covariance of the RGB pixel values of (N, 3, H, W) ``images`` in [-1, 1]."""
    pixels = images.double().permute(1, 0, 2, 3).reshape(3, -1)  # (3, N*H*W)
    return torch.cov(pixels).float()


def spread_images(split_dir: Path, resolution: int, count: int = MEASURED_IMAGES) -> torch.Tensor:
    """(N, 3, H, W): ``count`` images evenly spaced over the split, so that a split written
    group by group (line art first, say) is measured whole; unreadable samples are skipped."""
    dataset = ShardDataset(load_index(split_dir), resolution=resolution)
    stride = max(1, len(dataset) // count)
    images = []
    for i in range(0, len(dataset), stride):
        try:
            sample = dataset[i]
        except (CorruptSample, OSError, ValueError):
            continue
        if "image" in sample:
            images.append(sample["image"])
    if not images:
        raise ValueError(f"no readable training image in {split_dir} to measure colours on")
    return torch.stack(images)


def whitening(cov: torch.Tensor, floor: float = 1e-2) -> torch.Tensor:
    """(3, 3) symmetric ``W`` with ``W cov W^T`` = lambda_max * I (directions with variance
    under ``floor`` * lambda_max, as in grey-only data, are stretched 1/sqrt(floor) = 10x, no
    more)."""
    eigenvalues, basis = torch.linalg.eigh(cov.double())
    top = eigenvalues.max()
    gains = (top / eigenvalues.clamp_min(floor * top)).sqrt()
    return (basis @ torch.diag(gains) @ basis.T).float()


def in_basis(matrix: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Apply the (3, 3) ``matrix`` to every pixel of (B, 3, H, W) ``images``."""
    return torch.einsum("ij,bjhw->bihw", matrix.to(images), images)


def fold_into_conv(weight: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """The (out, 3, k, k) weight of a zero-padded conv on ``x`` that equals the conv of
    ``weight`` on ``matrix x``: ``weight'[o, c] = sum_j weight[o, j] matrix[j, c]``."""
    return torch.einsum("ojhw,jc->ochw", weight, matrix.to(weight))
