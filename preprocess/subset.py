"""A small subset of a shard folder, for the overfit test every practitioner runs first.

``python -m preprocess subset data/emoji-32 --out data/overfit-32 --resolutions 32 --words
heart circle square --others 500`` keeps every sample (train and val of the source) whose
caption has one of the words, plus about ``others`` of the rest, and builds shards of them
as any source is built. Trained on it, the chain must draw the named objects of its own
training images from their names: if it cannot, the design (not the data or the budget) is
what fails. The choice of the others is a seeded hash of each sample's key, so both passes
of the build (and a re-run) select the same samples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from stages.common.concepts import caption_words

from .sample import RawSample
from .sources import wds_samples


def _has_word(caption: str | None, words: frozenset[str]) -> bool:
    return bool(caption) and not words.isdisjoint(caption_words(caption))


def _draw(key: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, key)."""
    digest = hashlib.sha256(f"minisd-subset/{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


class SubsetSource:
    """A re-iterable sample stream: the source's samples with a word, and ~``others`` more."""

    def __init__(self, source: Path, words: list[str], others: int, seed: int = 0):
        self.folders = [p for p in (Path(source) / "train", Path(source) / "val") if p.is_dir()]
        if not self.folders:
            raise FileNotFoundError(f"{source} has no train/ or val/ shard folder")
        self.words = frozenset(w.lower() for w in words)
        if not self.words:
            raise ValueError("--words needs at least one word")
        self.seed = seed
        rest = sum(1 for s in self._all() if not _has_word(s.caption, self.words))
        self.keep_other = min(1.0, others / rest) if rest else 0.0

    def _all(self) -> Iterator[RawSample]:
        for folder in self.folders:
            yield from wds_samples(folder)

    def __call__(self) -> Iterator[RawSample]:
        for sample in self._all():
            if (
                _has_word(sample.caption, self.words)
                or _draw(sample.key, self.seed) < self.keep_other
            ):
                yield sample
