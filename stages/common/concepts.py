"""Caption words as concepts, and whether the images that carry a word look alike.

Shared by the grounding report (``stages/clip/grounding.py``: which words can a model learn
to draw) and concept-balanced sampling (``balance.py``: which words to show more often).
A word's images *look alike* when a leave-one-out prototype (the mean embedding of the
other images with the word) ranks them above the images without it: ``look_auc`` is that
ROC AUC, 1 for one shared look, 0.5 for none.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

STOPWORDS = frozenset(
    "the and with for from into onto over under of in on at to by as or an a is it its "
    "this that these those be are was one two".split()
)
WORD = re.compile(r"[a-z][a-z'\-]+")


def caption_words(caption: str) -> set[str]:
    """The lowercase content words of a caption (2+ letters, no stopwords)."""
    return {w for w in WORD.findall(caption.lower()) if w not in STOPWORDS}


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Mann-Whitney ROC AUC of ``scores`` (N,) for the boolean labels ``positive`` (N,); ties
    count one half. NaN when either class is empty."""
    pos, neg = int(positive.sum()), int((~positive).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    # the average rank of each distinct value: ties share it
    ends = torch.cumsum(counts, 0).double()
    average = ends - (counts.double() - 1) / 2
    ranks = average[inverse]
    u = ranks[positive].sum() - pos * (pos + 1) / 2
    return float(u / (pos * neg))


def look_auc(features: torch.Tensor, has: torch.Tensor) -> float:
    """How well a leave-one-out prototype of the images with a word (``has``, (N,) bool)
    tells them from the rest; ``features`` (N, E) unit-norm image embeddings."""
    total = features[has].sum(0)
    prototype = total.expand_as(features) - features * has[:, None].to(features.dtype)
    scores = (features * F.normalize(prototype, dim=-1)).sum(-1)
    return roc_auc(scores, has)
