"""Image bytes -> the float32 (3, R, R) tensor in [-1, 1] that training sees.

Only the formats shards hold (PNG, JPEG, WebP) and at most ``pixel_cap(R)`` pixels, judged
from the header before decoding (``images.py``); transparency is composited on white, the
shorter side resized and the centre cropped, as preprocessing does. The pipeline's
image-to-image input goes through ``image_tensor`` too, so it is prepared as training data.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .images import SHARD_FORMATS, open_image, pixel_cap


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparency is composited on white, as preprocessing does."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, resolution: int) -> torch.Tensor:
    """Image bytes -> float32 (3, R, R) in [-1, 1]; shorter side resized, then center-cropped.

    PNG, JPEG and WebP only (what shards hold), at most ``pixel_cap(R)`` pixels."""
    image = open_image(data, SHARD_FORMATS, pixel_cap(resolution))
    image.draft("RGB", (resolution, resolution))  # JPEG: decode at a reduced scale if larger
    return image_tensor(image, resolution)


def image_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """A PIL image -> float32 (3, R, R) in [-1, 1], as training sees it (alpha on white,
    shorter side resized, center-cropped); the pipeline's image-to-image input too."""
    image = _to_rgb(image)
    if image.size != (resolution, resolution):
        width, height = image.size
        scale = resolution / min(width, height)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return pixels.float().div_(127.5).sub_(1.0)
