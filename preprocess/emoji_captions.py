"""Names and captions of the emoji data set.

A caption says what the picture shows, then its style, e.g.
``"grinning face, smile, happy, cheerful; flat colour emoji"``:
the Unicode (CLDR) name, up to three tags (of 3+ letters) that add words the name lacks
(OpenMoji's own curated tags first, then the CLDR keywords; skin-tone variants borrow the
tags of their base emoji), deduplicated and lowercase, then one style phrase:

- ``outlined colour emoji``: OpenMoji colour (colour fills with black outlines);
- ``black line-art emoji``: OpenMoji black (outlines only);
- ``flat colour emoji``: Twemoji (flat colour, no outlines).

Twemoji file names are code point sequences without the FE0F variation selector
(``2764.svg`` is U+2764 U+FE0F, red heart), so emoji are matched on their code points
with FE0F dropped. Twemoji names come from the ``emoji`` package, OpenMoji's annotation
when that package does not know the sequence.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import emoji

STYLE_PHRASES = {
    "openmoji-color": "outlined colour emoji",
    "openmoji-black": "black line-art emoji",
    "twemoji": "flat colour emoji",
}
MAX_TAGS = 3
VARIATION_SELECTOR = 0xFE0F
SKIN_TONE = re.compile(r" ((?:light|medium-light|medium|medium-dark|dark) skin tone)")

Codepoints = tuple[int, ...]


def codepoints(hex_sequence: str) -> Codepoints:
    """``"2764-FE0F"`` or ``"2764"`` -> ``(0x2764,)``: FE0F dropped, as Twemoji names files."""
    values = (int(part, 16) for part in hex_sequence.strip().split("-"))
    return tuple(v for v in values if v != VARIATION_SELECTOR)


def codepoints_key(points: Codepoints) -> str:
    """The same emoji gets the same key in every style (it decides the train/val split)."""
    return "-".join(f"{p:x}" for p in points)


def clean_phrase(text: str) -> str:
    """Lowercase words: CLDR's ``"flag: Germany"`` -> ``"flag, germany"``."""
    text = text.replace("_", " ").replace(":", ",").lower()
    text = re.sub(r"\s*(?:,\s*)+", ", ", " ".join(text.split()))
    return text.strip(" ,")


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text))


def caption(name: str, tags: Iterable[str], style: str) -> str:
    name = clean_phrase(name)
    known = _words(name)
    picked: list[str] = []
    for tag in tags:
        tag = clean_phrase(tag)
        if len(tag) <= 2 or tag in picked or _words(tag) <= known:
            continue  # country codes like "cz", repeats, or no word the caption lacks
        picked.append(tag)
        known |= _words(tag)
        if len(picked) == MAX_TAGS:
            break
    return f"{', '.join([name, *picked])}; {STYLE_PHRASES[style]}"


def _split_tags(text: str) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def openmoji_tags(entries: Iterable[Mapping[str, Any]]) -> dict[Codepoints, list[str]]:
    """Code points -> tags (OpenMoji's first, then CLDR's), base emoji tags for skin tones."""
    entries = list(entries)
    tags = {
        codepoints(e["hexcode"]): _split_tags(e.get("openmoji_tags", ""))
        + _split_tags(e.get("tags", ""))
        for e in entries
    }
    for entry in entries:
        points = codepoints(entry["hexcode"])
        base = entry.get("skintone_base_hexcode") or ""
        if not tags[points] and base:
            tags[points] = tags.get(codepoints(base), [])
    return tags


def emoji_package_names() -> dict[Codepoints, str]:
    """Code points (FE0F dropped) -> CLDR short name from the ``emoji`` package."""
    names: dict[Codepoints, str] = {}
    for char, data in emoji.EMOJI_DATA.items():
        points = tuple(ord(c) for c in char if ord(c) != VARIATION_SELECTOR)
        names.setdefault(points, data["en"].strip(":"))
    return names


def _is_flag(points: Codepoints) -> bool:
    regional = all(0x1F1E6 <= p <= 0x1F1FF for p in points) and len(points) == 2
    return regional or (len(points) > 1 and points[0] == 0x1F3F4 and points[1] >= 0xE0020)


def package_name_as_cldr(name: str, points: Codepoints) -> str:
    """``woman_dark_skin_tone_blond_hair`` -> ``woman, dark skin tone, blond hair``;
    ``Germany`` (a flag) -> ``flag, germany``: the same words as OpenMoji's annotations."""
    text = SKIN_TONE.sub(r", \1,", name.replace("_", " "))
    if _is_flag(points) and not text.lower().startswith("flag"):
        text = f"flag, {text}"
    return clean_phrase(text)
