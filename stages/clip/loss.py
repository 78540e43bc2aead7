"""Symmetric InfoNCE with a learned temperature, negatives gathered across ranks.

For L2-normalised image features ``u`` and text features ``v`` of a global batch of ``N``
pairs, ``logits = s * u v^T`` with ``s = exp(log_scale)`` clamped at 100 (Radford et al.
2021: initialised at 1/0.07) and the loss is the mean of the image->text and text->image
cross-entropies with the diagonal as targets (every pair with an identical caption counts as
a positive, see ``contrastive_loss``).

Across ``W`` ranks each rank scores its local rows against the gathered columns of all
ranks, targets offset by ``rank * local_batch``. ``torch.distributed.nn.functional.all_gather``
sums the gradients of every rank's loss into each rank's own features, so after the data-
parallel average of parameter gradients the update is exactly that of the global loss.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class CLIPLossConfig:
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


def caption_groups(captions: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """(B,) int64 ids, equal for equal captions, the same on every rank (sha256-based)."""
    ids = [int.from_bytes(hashlib.sha256(c.encode()).digest()[:7], "big") for c in captions]
    return torch.tensor(ids, dtype=torch.int64, device=device)


def gather_groups(groups: torch.Tensor) -> torch.Tensor:
    """(B,) local -> (W*B,) from all ranks (ids carry no gradient)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return groups
    parts = [torch.empty_like(groups) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, groups)
    return torch.cat(parts)


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE over normalised (B, E) features.

    ``groups`` (B,) marks pairs whose captions are identical (``caption_groups``): those
    columns are all positives, with the target mass spread evenly over them. Without it,
    two images that both carry the caption "red heart" (the same emoji in two styles, or a
    caption shortened by augmentation) would each be pushed away from the other's identical
    text. With all groups distinct this is the one-hot loss exactly.

    Returns the loss and, detached, the fraction of local images whose top-1 text is their
    own caption (a training-time signal; validation measures retrieval properly).
    """
    all_images, offset = gather_features(image_features)
    all_texts, _ = gather_features(text_features)
    logits_per_image = logit_scale * image_features @ all_texts.T  # (B, W*B)
    logits_per_text = logit_scale * text_features @ all_images.T  # (B, W*B)
    targets = torch.arange(image_features.shape[0], device=image_features.device) + offset
    soft: torch.Tensor | None = None
    if groups is not None:
        same = (groups[:, None] == gather_groups(groups)[None, :]).float()  # (B, W*B)
        counts = same.sum(dim=1, keepdim=True)
        if bool((counts > 1).any()):  # else the one-hot targets, computed as before
            soft = same / counts
    goal = targets if soft is None else soft
    loss = 0.5 * (
        F.cross_entropy(logits_per_image.float(), goal)
        + F.cross_entropy(logits_per_text.float(), goal)
    )
    top1 = logits_per_image.detach().argmax(dim=1)
    if soft is None:
        accuracy = (top1 == targets).float().mean()
    else:
        accuracy = (soft.gather(1, top1[:, None]) > 0).float().mean()
    return loss, accuracy
