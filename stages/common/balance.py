"""Concept-balanced sampling: show the model more of what is rare *and looks alike*.

Caption sets are long-tailed: in the bundled emoji data "heart" names ~200 couples and ~60
heart shapes, "circle" 39 images, "woman" 1386. MetaCLIP (Xu et al. 2023) balances a concept
list matched in the captions by capping each concept at ``t`` samples. Which concepts:

- **words of the caption's name** (``captions.short_name``: ``"red circle"`` of
  ``"red circle, geometric; flat colour emoji"``; a free-form caption is all name): tags are
  one-off words (3,600 words of median count 3 in the emoji data), and weighting by them puts
  the weight on the tail of tags (measured: it did not help);
- in at least ``min_count`` captions (a one-off is not a concept) and at most ``max_share``;
- whose images **look alike** (``concepts.look_auc`` >= ``min_look_auc`` in the frozen CLIP's
  image space): a word that names no shared look cannot be learned by showing it more.

A sample's weight is MetaCLIP's per-concept keep probability ``min(1, t / n_c)`` of its
rarest concept (its largest one); a sample whose name has no concept is all tail (its words
are rarer than ``min_count``) and keeps weight 1, as MetaCLIP keeps every tail concept. So
"red circle" (circle: 30 names) keeps weight 1 while "couple with heart" variants (couple:
205) get ~0.1. Clustering the images' own features instead (SemDeDup, DataComp) was measured
first and lowered the simple shapes' share: a plain coloured circle *is* a dense look.

The weights feed ``ResumableBatches`` (weighted draws, a pure function of the stream position:
a resumed run equals an uninterrupted one); ``BalanceReport`` says what they changed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from .captions import short_name
from .concepts import caption_words, look_auc


@dataclass(frozen=True)
class BalanceConfig:
    enabled: bool = False
    cap: int = 20  # MetaCLIP's t: a concept weighs at most this many samples per epoch
    min_count: int = 10  # a name word in fewer captions is not a concept
    max_share: float = 0.5  # nor one in more than this share of them
    min_look_auc: float = 0.8  # nor one whose images do not look alike

    def check(self) -> None:
        if self.cap < 1 or self.min_count < 1 or not 0 < self.max_share <= 1:
            raise ValueError("balance: cap and min_count must be >= 1, max_share in (0, 1]")


def name_words(captions: list[str]) -> list[set[str]]:
    """The content words of each caption's name (``captions.short_name``)."""
    return [caption_words(short_name(c)) for c in captions]


def name_concepts(
    names: list[set[str]], features: torch.Tensor, cfg: BalanceConfig
) -> dict[str, tuple[int, float]]:
    """word -> (captions whose name has it, look AUC), for the words that are concepts;
    ``names`` each caption's ``name_words``."""
    counts = Counter(w for words in names for w in words)
    limit = cfg.max_share * len(names)
    out = {}
    for word in sorted(counts):
        n = counts[word]
        if not cfg.min_count <= n <= limit:
            continue
        look = look_auc(features, torch.tensor([word in words for words in names]))
        if look >= cfg.min_look_auc:
            out[word] = (n, look)
    return out


def concept_weights(
    captions: list[str], features: torch.Tensor, cfg: BalanceConfig
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Per-sample weights (N,) float64 for ``captions`` and their unit-norm image
    ``features`` (N, E), and a report of what they change."""
    cfg.check()
    names = name_words(captions)
    concepts = name_concepts(names, features, cfg)
    rarest = [
        min((w for w in words if w in concepts), key=lambda w: (concepts[w][0], w), default=None)
        for words in names
    ]
    unmatched = sum(r is None for r in rarest)
    weights = torch.tensor(
        [1.0 if r is None else min(1.0, cfg.cap / concepts[r][0]) for r in rarest],
        dtype=torch.float64,
    )
    return weights, balance_report(weights, names, concepts, unmatched)


def balance_report(
    weights: torch.Tensor,
    names: list[set[str]],
    concepts: dict[str, tuple[int, float]],
    unmatched: int,
    top: int = 15,
) -> dict[str, Any]:
    """The concepts' share of an epoch before and after (the most frequent ``top``), and
    the expected share of distinct samples an epoch of draws shows."""
    n = len(weights)
    p = weights / weights.sum()
    rows = []
    for word, (count, look) in sorted(concepts.items(), key=lambda kv: (-kv[1][0], kv[0]))[:top]:
        has = torch.tensor([word in words for words in names])
        rows.append(
            {
                "concept": word,
                "captions": count,
                "look_auc": round(look, 4),
                "share_before": round(count / n, 5),
                "share_after": round(float(p[has].sum()), 5),
            }
        )
    return {
        "samples": n,
        "concepts": len(concepts),
        "unmatched_samples": unmatched,
        "downweighted_samples": int((weights < 1).sum()),
        "distinct_per_epoch": round(float((1 - (1 - p).pow(n)).sum()) / n, 4),
        "largest": rows,
    }
