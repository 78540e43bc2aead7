"""Concept-balanced sampling: MetaCLIP's cap over the caption names' concepts that look alike."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.common.balance import BalanceConfig, concept_weights, name_concepts, name_words


def _data():
    """60 "person" images of one look (a head concept), 6 "circle" images of another (a tail
    concept), 10 "thing" images of scattered looks (a word naming no look), 4 one-offs."""
    g = torch.Generator().manual_seed(0)
    captions, looks = [], []
    for i in range(60):
        captions.append(f"person {i % 3}, tag; style")  # name words: person (+ a digit)
        looks.append(0)
    for _ in range(6):
        captions.append("red circle, geometric; style")
        looks.append(1)
    for i in range(10):
        captions.append("thing")
        looks.append(2 + i)
    for i in range(4):
        captions.append(f"unique{'abcd'[i]}, tag; style")
        looks.append(12 + i)
    features = torch.eye(16)[looks] + 0.05 * torch.randn(len(looks), 16, generator=g)
    return captions, F.normalize(features, dim=-1)


def test_concepts_are_name_words_frequent_enough_whose_images_look_alike():
    captions, features = _data()
    cfg = BalanceConfig(enabled=True, cap=6, min_count=5, max_share=0.9, min_look_auc=0.8)
    concepts = name_concepts(name_words(captions), features, cfg)
    # "tag" and "style" are not in the names; "thing" names no shared look; one-offs are rare
    assert set(concepts) == {"person", "red", "circle"}
    assert concepts["person"][0] == 60 and concepts["circle"][0] == 6


def test_weights_cap_the_head_concept_and_keep_the_tail():
    captions, features = _data()
    cfg = BalanceConfig(enabled=True, cap=6, min_count=5, max_share=0.9, min_look_auc=0.8)
    weights, report = concept_weights(captions, features, cfg)
    assert torch.allclose(weights[:60], torch.full((60,), 6 / 60, dtype=torch.float64))
    assert (weights[60:] == 1).all()  # circles (6 <= cap), the look-less "thing", one-offs
    p = weights / weights.sum()
    assert p[:60].sum() < 60 / len(captions) / 3  # the head's share of an epoch, cut 3x+
    assert report["downweighted_samples"] == 60 and report["unmatched_samples"] == 14
    rows = {r["concept"]: r for r in report["largest"]}
    assert rows["person"]["share_after"] < rows["person"]["share_before"]
    assert rows["circle"]["share_after"] > rows["circle"]["share_before"]
