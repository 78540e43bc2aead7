"""Byte-level BPE tokenizer with CLIP conventions, trained once with ``tokenizers``.

Text is NFC-normalised, lowercased and its whitespace collapsed, then split into byte-level
BPE tokens (every byte is in the initial alphabet, so nothing is ever unknown). Each caption
becomes ``<|startoftext|> tokens <|endoftext|>`` truncated to the context length with the end
token kept (the post-processor's special tokens are reserved by the truncation), then padded
with a dedicated ``<|pad|>`` id. The attention mask is True on real tokens (start, text, end),
so the end-of-text position of row ``b`` is ``mask[b].sum() - 1`` whatever the ids are.

The trained tokenizer (vocabulary, merges, normaliser, truncation and padding) is one JSON
file: it is written once at the start of a run and shipped in the export, never retrained.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

START = "<|startoftext|>"
END = "<|endoftext|>"
PAD = "<|pad|>"
SPECIALS = (START, END, PAD)


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or lacks the CLIP special tokens."""


class CLIPTokenizer:
    """Wraps a trained ``tokenizers.Tokenizer``; ``encode`` gives fixed-length ids and mask."""

    def __init__(self, tokenizer: Tokenizer, context_length: int):
        if context_length < 2:
            raise TokenizerError(f"context_length must be >= 2 (start + end), got {context_length}")
        ids = [tokenizer.token_to_id(t) for t in SPECIALS]
        if None in ids:
            missing = [t for t, i in zip(SPECIALS, ids) if i is None]
            raise TokenizerError(f"tokenizer lacks the special tokens {missing}")
        self.start_id, self.end_id, self.pad_id = ids
        self.context_length = context_length
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{START} $A {END}",
            special_tokens=[(START, self.start_id), (END, self.end_id)],
        )
        # Truncation counts the template's two special tokens, so the end token survives.
        tokenizer.enable_truncation(max_length=context_length)
        tokenizer.enable_padding(length=context_length, pad_id=self.pad_id, pad_token=PAD)
        self._tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @classmethod
    def from_file(cls, path: Path, context_length: int | None = None) -> CLIPTokenizer:
        """Load a saved tokenizer; the context length defaults to the one it was saved with."""
        path = Path(path)
        if not path.exists():
            raise TokenizerError(f"{path}: no tokenizer file")
        return cls.from_json(path.read_text(), context_length, where=path)

    @classmethod
    def from_json(
        cls, text: str, context_length: int | None = None, where: Path | str = "tokenizer"
    ) -> CLIPTokenizer:
        """A tokenizer from the JSON text of a saved one (``where`` names it in errors)."""
        try:
            tokenizer = Tokenizer.from_str(text)
        except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(f"{where} is not a readable tokenizer.json: {err}") from err
        if context_length is None:
            if tokenizer.truncation is None:
                raise TokenizerError(f"{where} records no context length; pass one")
            context_length = int(tokenizer.truncation["max_length"])
        return cls(tokenizer, context_length)

    def save(self, path: Path) -> None:
        """Write atomically (temporary name + rename): a reader never sees half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self._tokenizer.to_str())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> ids (B, L) long and mask (B, L) bool (True = start, text or end token).

        Special-token strings typed inside a caption are removed so that a caption cannot
        end itself early or inject padding.
        """
        if isinstance(captions, str):
            raise TypeError("encode takes a list of captions, not a single string")
        clean = [_strip_specials(c) for c in captions]
        encodings = self._tokenizer.encode_batch(clean)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.bool)
        return ids.reshape(len(captions), self.context_length), mask.reshape(ids.shape)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """One row of ids -> text without special tokens (the normalised caption)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self._tokenizer.decode(ids, skip_special_tokens=True).strip()


def end_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool mask -> (B,) long index of the end-of-text token (the last real token)."""
    return mask.long().sum(dim=1) - 1


def _strip_specials(text: str) -> str:
    for token in SPECIALS:
        text = text.replace(token, " ")
    return text


def build_untrained() -> Tokenizer:
    """The empty BPE pipeline: normaliser, byte-level pre-tokenizer and decoder."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.NFC(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(
    captions: Iterable[str], vocab_size: int, context_length: int, min_frequency: int = 2
) -> CLIPTokenizer:
    """Train a byte-level BPE on ``captions``; the special tokens get ids 0, 1, 2.

    The learned vocabulary may be smaller than ``vocab_size`` on a small corpus; models size
    their embeddings from ``CLIPTokenizer.vocab_size``.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIALS):
        raise TokenizerError(
            f"vocab_size {vocab_size} is below the byte alphabet plus specials "
            f"({len(alphabet) + len(SPECIALS)})"
        )
    tokenizer = build_untrained()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIALS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator((_strip_specials(c) for c in captions), trainer)
    return CLIPTokenizer(tokenizer, context_length)
