"""Scatter plots drawn with Pillow (no plotting library): one panel per quality measure.

Used by the sampling sweep for quality against seconds per image. Each point has a colour
(one per group, e.g. per sampler) and a marker: a plain dot, or a ring (the reference
setting) or a filled square (the chosen one). A dashed line marks each panel's tolerance
threshold when one is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
PANEL = (420, 300)  # width, height of one panel in pixels
MARGIN = (56, 36, 16, 40)  # left, top, right, bottom


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    group: str
    mark: str = "dot"  # "dot" | "ring" (reference) | "square" (chosen)


@dataclass(frozen=True)
class Panel:
    title: str
    y_label: str
    points: list[Point]
    threshold: float | None = None  # a dashed horizontal line (the tolerance bound)
    x_label: str = "seconds per image"
    groups: list[str] = field(default_factory=list)  # legend order (default: first seen)


def _range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.08 or abs(hi) * 0.1 or 1.0
    return lo - pad, hi + pad


def _panel(panel: Panel, font: ImageFont.ImageFont) -> Image.Image:
    width, height = PANEL
    left, top, right, bottom = MARGIN
    image = Image.new("RGB", PANEL, "white")
    draw = ImageDraw.Draw(image)
    xs = [p.x for p in panel.points]
    ys = [p.y for p in panel.points] + ([panel.threshold] if panel.threshold is not None else [])
    (x0, x1), (y0, y1) = _range(xs), _range(ys)

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x0) / (x1 - x0) * (width - left - right),
            height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom),
        )

    draw.rectangle((left, top, width - right, height - bottom), outline=(120, 120, 120))
    for i in range(5):  # ticks: 5 values on each axis
        tx, ty = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        px, _ = at(tx, y0)
        _, py = at(x0, ty)
        draw.line((px, height - bottom, px, height - bottom + 4), fill=(120, 120, 120))
        draw.text((px - 14, height - bottom + 6), f"{tx:.3g}", fill="black", font=font)
        draw.line((left - 4, py, left, py), fill=(120, 120, 120))
        draw.text((4, py - 6), f"{ty:.3g}", fill="black", font=font)
    if panel.threshold is not None:
        _, py = at(x0, panel.threshold)
        for px in range(left, width - right, 8):
            draw.line((px, py, min(px + 4, width - right), py), fill=(160, 160, 160))
    groups = panel.groups or list(dict.fromkeys(p.group for p in panel.points))
    colour = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(groups)}
    for point in sorted(panel.points, key=lambda p: p.mark != "dot"):  # marks on top
        px, py = at(point.x, point.y)
        c = colour[point.group]
        if point.mark == "ring":
            draw.ellipse((px - 6, py - 6, px + 6, py + 6), outline="black", width=2)
        elif point.mark == "square":
            draw.rectangle((px - 5, py - 5, px + 5, py + 5), fill=c, outline="black", width=2)
        draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=c)
    draw.text((left, 8), f"{panel.title}", fill="black", font=font)
    draw.text((width // 2 - 40, height - 16), panel.x_label, fill="black", font=font)
    for i, g in enumerate(groups):
        draw.rectangle(
            (width - 118, top + 6 + 14 * i, width - 110, top + 14 + 14 * i), fill=colour[g]
        )
        draw.text((width - 106, top + 4 + 14 * i), g, fill="black", font=font)
    return image


def scatter(panels: list[Panel], path: Path, note: str = "") -> Path:
    """Panels side by side, ``note`` (one line) under them; written as a PNG to ``path``."""
    font = ImageFont.load_default()
    width, height = PANEL
    sheet = Image.new("RGB", (width * len(panels), height + 20), "white")
    for i, panel in enumerate(panels):
        sheet.paste(_panel(panel, font), (i * width, 0))
    ImageDraw.Draw(sheet).text((8, height + 4), note, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
