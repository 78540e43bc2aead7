"""What a source yields: one raw sample (key, caption, encoded image bytes), plus the names
of the reasons a sample can be skipped and the normalisation of keys and captions.

Sources stay dumb: they read, they do not judge. A source that already knows a sample is
unusable (its image file is missing, its SVG does not exist) yields it with ``skip`` set so
that the build counts it under that reason; everything else (empty captions, duplicates,
undecodable images) is judged once, by the build.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# Skip reasons judged by the build; sources may add their own (e.g. "no_name").
MISSING_IMAGE = "missing_image"  # no image in the record, or the file cannot be read
CORRUPT_IMAGE = "corrupt_image"  # bytes present but not decodable in an accepted format
OVERSIZED_IMAGE = "oversized_image"  # more pixels than the target needs (see pixel_cap)
MISSING_CAPTION = "missing_caption"  # no caption sidecar, field or column
EMPTY_CAPTION = "empty_caption"  # a caption made only of whitespace
DUPLICATE_KEY = "duplicate_key"  # a key seen earlier in the same source
DUPLICATE_IMAGE = "duplicate_image"  # the same image bytes seen earlier under another key
BAD_RECORD = "bad_record"  # a manifest line / row / tar member that cannot be parsed
OVERSIZED_MEMBER = "oversized_member"  # a tar member over MAX_MEMBER_BYTES: never read

MAX_KEY_LENGTH = 96  # keeps "{key}.json" inside a USTAR tar name field


@dataclass(frozen=True)
class RawSample:
    key: str  # already made safe by ``make_key``
    caption: str | None
    data: bytes | None  # encoded raster image, or SVG markup when kind == "svg"
    kind: Literal["raster", "svg"] = "raster"
    meta: Mapping[str, Any] = field(default_factory=dict)  # copied into {key}.json
    group: str = ""  # counted per group in the report (e.g. "twemoji")
    split_key: str | None = None  # split by this instead of the key (same emoji, same split)
    skip: str | None = None  # the source already knows why this sample is unusable


def make_key(text: str) -> str:
    """A webdataset-safe key: no dots (they start the extension), no slashes, bounded."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "_"
    if len(key) > MAX_KEY_LENGTH:
        digest = hashlib.sha1(text.encode()).hexdigest()[:12]
        key = f"{key[: MAX_KEY_LENGTH - 13]}_{digest}"
    return key


def normalize_caption(caption: str | None) -> str | None:
    """Collapse whitespace (captions from the web carry newlines and tabs)."""
    if caption is None:
        return None
    return " ".join(str(caption).split())
