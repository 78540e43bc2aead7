"""PNG files that say how to reproduce them, grids of images, and data URIs.

Settings are stored as PNG ``tEXt`` chunks (Pillow's ``PngInfo``), one key per setting,
all strings, so any PNG reader (``exiftool``, ``PIL.Image.open(p).text``) shows them.
"""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo


def png_info(metadata: Mapping[str, object]) -> PngInfo:
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, "" if value is None else str(value))
    return info


def encode_png(image: Image.Image, metadata: Mapping[str, object]) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(metadata))
    return buf.getvalue()


def save_png(image: Image.Image, metadata: Mapping[str, object], path: Path) -> Path:
    """Write atomically (temporary file + rename) so a reader never sees half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(encode_png(image, metadata))
    os.replace(tmp, path)
    return path


def read_png_text(path_or_bytes: Path | bytes) -> dict[str, str]:
    """The text chunks of a PNG file (or of PNG bytes)."""
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as image:
        image.load()
        return dict(image.text)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def make_grid(
    images: Sequence[Image.Image], columns: int | None = None, pad: int = 2
) -> Image.Image:
    """Tile equally sized images row by row on a white canvas (``columns`` ~ sqrt(n))."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new(
        "RGB", (columns * width + (columns - 1) * pad, rows * height + (rows - 1) * pad), "white"
    )
    for i, image in enumerate(images):
        row, col = divmod(i, columns)
        grid.paste(image, (col * (width + pad), row * (height + pad)))
    return grid
