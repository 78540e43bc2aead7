"""The grounding report: which caption words can a model learn to draw, and why not."""

from __future__ import annotations

import json

import torch

from stages.clip.grounding import GroundingConfig, frequent_words, grounding_report, write_report
from stages.common.concepts import caption_words, roc_auc


def test_roc_auc_is_the_mann_whitney_statistic_with_ties_at_one_half():
    positive = torch.tensor([True, True, False, False])
    assert roc_auc(torch.tensor([0.9, 0.8, 0.1, 0.2]), positive) == 1.0
    assert roc_auc(torch.tensor([0.1, 0.2, 0.9, 0.8]), positive) == 0.0
    assert roc_auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), positive) == 0.5
    assert roc_auc(torch.tensor([0.9, 0.1, 0.5, 0.2]), positive) == 0.5
    assert roc_auc(torch.tensor([0.9, 0.3, 0.5, 0.2]), positive) == 0.75


def test_caption_words_drop_stopwords_and_frequent_words_drop_tags_and_style():
    assert caption_words("Red heart, love; a flat colour emoji") == {
        "red", "heart", "love", "flat", "colour", "emoji",
    }  # fmt: skip
    captions = [f"thing {i}, red; emoji" for i in range(10)] + [
        "blue, once, red; emoji",
        "green; emoji",
    ]
    # "emoji" is in every caption (over max_share), "once" in one (under min_count)
    word_sets = [caption_words(c) for c in captions]
    assert frequent_words(word_sets, top=10, min_count=2, max_share=0.95) == ["red", "thing"]


def _data(n: int = 60, dim: int = 16, seed: int = 0):
    """Three words: "alike" names one look and the encoder learned it; "mixed" names one
    look half of the time and otherwise the looks of "other" images (a word the data does not
    ground, as "heart" names heart shapes and couples); "missed" names one look the encoder
    did not learn (its text embedding points elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    looks = torch.eye(dim)
    captions, images = [], []
    for i in range(n):
        kind = i % 4
        word = ("alike", "mixed", "missed", "other")[kind]
        look = {0: 0, 1: 1 if (i // 4) % 2 else 4 + (i // 8) % 8, 2: 3, 3: 4 + (i // 4) % 8}[kind]
        captions.append(f"thing {word}; style")
        images.append(looks[look] + 0.05 * torch.randn(dim, generator=g))
    text = {"alike": looks[0], "mixed": looks[1], "missed": looks[9], "other": looks[12]}
    text |= {"thing": looks[15], "style": looks[14]}

    def embed_texts(words):
        return torch.stack([text[w] for w in words])

    return torch.stack(images), captions, embed_texts


def test_the_report_says_which_words_the_data_or_the_encoder_fails():
    images, captions, embed_texts = _data()
    cfg = GroundingConfig(words=10, min_count=5, max_share=0.5)
    report = grounding_report(images, captions, embed_texts, cfg)
    rows = {r["word"]: r for r in report["words"]}
    assert set(rows) == {"alike", "mixed", "missed", "other"}  # thing/style: every caption
    assert rows["alike"]["verdict"] == "ok" and rows["alike"]["text_auc"] > 0.95
    assert rows["mixed"]["look_auc"] < rows["alike"]["look_auc"]
    assert rows["mixed"]["verdict"] == "data"
    assert rows["missed"]["look_auc"] > 0.95 and rows["missed"]["verdict"] == "text"
    assert set(report["flagged"]) >= {"mixed", "missed"} and "alike" not in report["flagged"]
    assert rows["alike"]["names"] == ["thing alike (15)"]


def test_the_report_is_written_as_json_and_a_table(tmp_path):
    images, captions, embed_texts = _data()
    report = grounding_report(images, captions, embed_texts, GroundingConfig(min_count=5))
    path = write_report(report, tmp_path)
    assert json.loads((tmp_path / "grounding.json").read_text()) == report
    table = path.read_text()
    assert "| mixed |" in table and "| data |" in table
