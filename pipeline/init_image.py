"""Image-to-image input: a user's image bytes, checked before anything decodes them in full.

``read_init_image(data, limits)`` refuses with an ``InitImageError`` (a ``ValueError``: the
CLI prints it, the server answers 422) that names the limit:

- more than ``max_bytes`` bytes;
- a format other than PNG, JPEG or WebP (read from the header, never from a file name);
- more than ``max_pixels`` pixels, read from the header before decoding (a small file can
  decode to gigabytes);
- bytes that do not decode in full (truncated or corrupt).

The EXIF orientation is applied; resizing to the model's resolution is the pipeline's
(``stages.common.decode.image_tensor``, as training). ``decode_data_uri`` reads the server's
JSON field: a ``data:image/...;base64,`` URI or bare base64.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

FORMATS = ("PNG", "JPEG", "WEBP")


class InitImageError(ValueError):
    """An init image that is refused; the message says why and what is accepted."""


@dataclass(frozen=True)
class InitImageLimits:
    max_bytes: int = 4 * 1024 * 1024
    max_pixels: int = 4096 * 4096


def read_init_image(data: bytes, limits: InitImageLimits | None = None) -> Image.Image:
    """Checked, fully decoded, upright image (any size and mode)."""
    limits = limits or InitImageLimits()
    if not data:
        raise InitImageError("the init image is empty")
    if len(data) > limits.max_bytes:
        raise InitImageError(
            f"the init image is {len(data)} bytes, more than the {limits.max_bytes} allowed"
        )
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning: the pixel cap below is the check that applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise InitImageError(
            f"the init image has more than the {limits.max_pixels} pixels allowed"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise InitImageError(
            f"the init image is not an image ({err}); give a PNG, JPEG or WebP"
        ) from None
    if image.format not in FORMATS:
        raise InitImageError(f"the init image is {image.format}; give a PNG, JPEG or WebP")
    width, height = image.size
    if width * height > limits.max_pixels:
        raise InitImageError(
            f"the init image is {width}x{height} = {width * height} pixels, more than the "
            f"{limits.max_pixels} allowed"
        )
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError) as err:
        raise InitImageError(f"the init image does not decode ({err})") from None


def decode_data_uri(text: str) -> bytes:
    """``data:<type>;base64,<payload>`` or bare base64 -> bytes."""
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise InitImageError("the init image must be a base64 data URI (data:...;base64,...)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InitImageError("the init image is not valid base64") from None
