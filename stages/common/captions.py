"""Caption augmentation: train on captions as people type them, not only as the data writes them.

Captions in the img2dataset layout here read ``"name, tag, tag; style"`` (the emoji data:
``"red heart, love, emotion; flat colour emoji"``), while people type ``"red heart"``. A
text encoder and a UNet trained only on the full form never see the short one, so at
inference it lands between training captions (measured: docs/measurements.md,
"Images that follow the prompt"). Each training caption is therefore rewritten per step:

- with probability ``name_only`` it is the name alone (the first comma-separated part);
- otherwise each tag is kept with probability ``keep_tag``;
- the ``; style`` suffix is dropped with probability ``drop_style``.

A caption without commas or ``;`` passes through unchanged, so free-form captions (a user's
own data) are not harmed. Draws come from torch's global CPU generator, which the trainer
checkpoints: a resumed run draws the same rewrites.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CaptionAugmentConfig:
    enabled: bool = False
    name_only: float = 0.3  # P(the caption is its name alone)
    keep_tag: float = 0.5  # otherwise, P(each tag is kept)
    drop_style: float = 0.5  # P(the "; style" suffix is dropped)


def split_caption(caption: str) -> tuple[str, list[str], str]:
    """``"red heart, love; flat colour emoji"`` -> ``("red heart", ["love"], "flat colour emoji")``."""
    body, _, style = caption.rpartition(";") if ";" in caption else (caption, "", "")
    parts = [p.strip() for p in body.split(",") if p.strip()]
    if not parts:
        return "", [], style.strip()
    return parts[0], parts[1:], style.strip()


def join_caption(name: str, tags: list[str], style: str) -> str:
    text = ", ".join([p for p in (name, *tags) if p])
    return f"{text}; {style}" if style else text


def short_name(caption: str) -> str:
    """The name alone, as a person would type it (``"red heart"``); the caption if no name."""
    name, _, _ = split_caption(caption)
    return name or caption.strip()


def augment_captions(captions: list[str], cfg: CaptionAugmentConfig) -> list[str]:
    """Rewrite each caption as the module docstring says (unchanged when disabled).

    Draws a fixed number of uniforms per caption (2 + its tag count), so the stream a
    caption consumes does not depend on earlier outcomes.
    """
    if not cfg.enabled:
        return list(captions)
    out = []
    for caption in captions:
        name, tags, style = split_caption(caption)
        if not name:  # empty (the null caption) or only a style: leave as it is
            out.append(caption)
            continue
        u = torch.rand(2 + len(tags)).tolist()
        if u[0] < cfg.name_only:
            kept: list[str] = []
        else:
            kept = [tag for tag, draw in zip(tags, u[2:]) if draw < cfg.keep_tag]
        kept_style = style if u[1] >= cfg.drop_style else ""
        out.append(join_caption(name, kept, kept_style))
    return out
