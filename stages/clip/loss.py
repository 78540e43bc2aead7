"""Symmetric InfoNCE with a learned temperature, negatives gathered across ranks.

For L2-normalised image features ``u`` and text features ``v`` of a global batch of ``N``
pairs, ``logits = s * u v^T`` with ``s = exp(log_scale)`` clamped at 100 (Radford et al.
2021: initialised at 1/0.07) and the loss is the mean of the image->text and text->image
cross-entropies with the diagonal as targets.

Across ``W`` ranks each rank scores its local rows against the gathered columns of all
ranks, targets offset by ``rank * local_batch``. ``torch.distributed.nn.functional.all_gather``
sums the gradients of every rank's loss into each rank's own features, so after the data-
parallel average of parameter gradients the update is exactly that of the global loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LossConfig:
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0


class LogitScale(nn.Module):
    """The learned inverse temperature, stored as its log."""

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_scale)

    def forward(self) -> torch.Tensor:
        return self.log_scale.clamp(max=self.max_log_scale).exp()


def gather_features(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, E) local -> ((W*B, E) from all ranks with gradients, offset of the local rows)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, 0
    from torch.distributed.nn.functional import all_gather

    gathered = torch.cat(all_gather(features), dim=0)
    return gathered, dist.get_rank() * features.shape[0]


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE over normalised (B, E) features.

    Returns the loss and, detached, the fraction of local images whose top-1 text is their
    own caption (a training-time signal; validation measures retrieval properly).
    """
    all_images, offset = gather_features(image_features)
    all_texts, _ = gather_features(text_features)
    logits_per_image = logit_scale * image_features @ all_texts.T  # (B, W*B)
    logits_per_text = logit_scale * text_features @ all_images.T  # (B, W*B)
    targets = torch.arange(image_features.shape[0], device=image_features.device) + offset
    loss = 0.5 * (
        F.cross_entropy(logits_per_image.float(), targets)
        + F.cross_entropy(logits_per_text.float(), targets)
    )
    accuracy = (logits_per_image.detach().argmax(dim=1) == targets).float().mean()
    return loss, accuracy
