"""Opening image bytes someone else made: an allow-list of formats and a pixel cap.

Pillow would otherwise try every plugin it has (EPS hands the bytes to Ghostscript when it
is installed; PSD, TIFF and friends bring large parsers) and decode up to ~179 Mpx with
only a warning, whatever the target size. ``open_image`` names the formats it accepts and
refuses, from the header alone, an image with more pixels than its target needs.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image

# What shards hold (preprocessing writes PNG, JPEG or WebP).
SHARD_FORMATS = ("PNG", "JPEG", "WEBP")
# What preprocessing reads from a user's or a stranger's files.
SOURCE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
MIN_PIXEL_CAP = 1 << 24  # 16.8 Mpx (4096 x 4096): any photo a phone takes fits (at 8+ px sides)


class ImageRejected(ValueError):
    """Bytes that are no image in an accepted format (garbage, or e.g. PSD or EPS)."""


class ImageTooLarge(ImageRejected):
    """An image with more pixels than its target needs (judged from the header)."""


def pixel_cap(side: int) -> int:
    """Most pixels accepted for a target of ``side`` px: 16x the side each way, at least
    ``MIN_PIXEL_CAP``."""
    return max(MIN_PIXEL_CAP, (16 * side) ** 2)


def open_image(data: bytes, formats: Sequence[str], max_pixels: int) -> Image.Image:
    """``Image.open`` restricted to ``formats``, refusing more than ``max_pixels`` before
    anything is decoded (the size comes from the header): ``ImageRejected``,
    ``ImageTooLarge``."""
    try:
        image = Image.open(io.BytesIO(data), formats=list(formats))
    except Image.UnidentifiedImageError as err:
        raise ImageRejected(f"not an image in an accepted format ({', '.join(formats)})") from err
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"{width}x{height} px is over the {max_pixels} px cap")
    return image
