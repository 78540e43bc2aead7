"""The grounding report: which caption words can a model trained on this data learn to draw?

A word is learnable when the images whose caption has it look alike, and the text encoder's
embedding of the word alone points at them. Both are asked of a trained CLIP, for the most
frequent content words of the captions, as ROC AUCs over the images (1 = the images with the
word rank above all others, 0.5 = chance):

- ``look_auc``: each image scored by its cosine to the mean image embedding of the *other*
  images with the word (leave-one-out prototype). Low: the word names several looks or none
  ("heart" in the emoji data names ~200 couples and ~60 heart shapes).
- ``text_auc``: each image scored by its cosine to the text embedding of the word typed alone.
  Low while ``look_auc`` is high: the images agree but the encoder did not learn the word.

Each word gets the names its images most often carry (the first comma-separated part of the
caption), so the report says *what* the word points at, and a verdict: ``ok``, ``data``
(its images do not look alike: more, cleaner or recaptioned data is the lever) or ``text``
(the images agree; the text encoder missed the word: training, not data, is the lever).
Words in nearly every caption (a style suffix) and one-off tags are left out.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from stages.common.captions import short_name
from stages.common.concepts import caption_words, look_auc, roc_auc

REPORT_JSON = "grounding.json"
REPORT_MD = "grounding.md"
WEAK_AUC = 0.8  # below this a word is flagged


@dataclass(frozen=True)
class GroundingConfig:
    enabled: bool = True  # written after the CLIP export, to the run folder
    words: int = 60  # the most frequent content words reported
    min_count: int = 10  # a word in fewer captions is a one-off tag, not reported
    max_share: float = 0.5  # nor one in more than this share of them (a style suffix)


def frequent_words(
    word_sets: list[set[str]], top: int, min_count: int, max_share: float
) -> list[str]:
    """The ``top`` words by caption count (``word_sets``: each caption's ``caption_words``),
    each in at least ``min_count`` captions and at most ``max_share`` of them."""
    counts = Counter(w for words in word_sets for w in words)
    limit = max_share * len(word_sets)
    # by count, then alphabetically: the same words whatever the set iteration order
    ranked = [w for w, n in sorted(counts.items(), key=lambda wn: (-wn[1], wn[0]))]
    ranked = [w for w in ranked if min_count <= counts[w] <= limit]
    return ranked[:top]


def grounding_report(
    image_emb: torch.Tensor,
    captions: list[str],
    embed_texts: Callable[[list[str]], torch.Tensor],
    cfg: GroundingConfig = GroundingConfig(),
) -> dict[str, Any]:
    """The report for images ``image_emb`` (N, E) and their ``captions`` (N)."""
    images = F.normalize(image_emb.float(), dim=-1)
    word_sets = [caption_words(c) for c in captions]
    words = frequent_words(word_sets, cfg.words, cfg.min_count, cfg.max_share)
    text = F.normalize(embed_texts(words).float(), dim=-1) if words else torch.empty(0)
    rows = []
    for j, word in enumerate(words):
        has = torch.tensor([word in s for s in word_sets])
        n = int(has.sum())
        look = look_auc(images, has)
        text_auc = roc_auc(images @ text[j], has)
        names = Counter(short_name(captions[i]) for i in has.nonzero().flatten().tolist())
        verdict = "ok"
        if look < WEAK_AUC:
            verdict = "data"
        elif text_auc < WEAK_AUC:
            verdict = "text"
        rows.append(
            {
                "word": word,
                "captions": n,
                "look_auc": round(look, 4),
                "text_auc": round(text_auc, 4),
                "verdict": verdict,
                "names": [f"{name} ({k})" for name, k in names.most_common(3)],
            }
        )
    return {
        "images": len(captions),
        "weak_auc": WEAK_AUC,
        "words": rows,
        "flagged": [r["word"] for r in rows if r["verdict"] != "ok"],
    }


def write_report(report: dict[str, Any], folder: Path) -> Path:
    """``grounding.json`` and a readable ``grounding.md`` in ``folder``; returns the latter."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Grounding report ({report['images']} images)",
        "",
        "look AUC: do the images whose caption has the word look alike; text AUC: does the "
        f"word typed alone point at them. Flagged below {report['weak_auc']}: `data` (the "
        "images do not agree on a look), `text` (they do; the encoder missed the word).",
        "",
        "| word | captions | look AUC | text AUC | verdict | most common names |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["words"]:
        lines.append(
            f"| {r['word']} | {r['captions']} | {r['look_auc']:.3f} | {r['text_auc']:.3f} "
            f"| {r['verdict']} | {'; '.join(r['names'])} |"
        )
    path = folder / REPORT_MD
    path.write_text("\n".join(lines) + "\n")
    return path
