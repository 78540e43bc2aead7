"""``make demo``'s picture: a few fixed emoji prompts, one row each, several seeds per row.

Rows differ by prompt and columns by seed (the same seeds in every row), so the grid shows
at a glance whether the model follows the text. Small images are enlarged (nearest
neighbour) so a 32 px tiny-preset grid is viewable, and each row is labelled.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from stages.unet.samplers import SamplerConfig

from .png import save_png
from .text2image import Text2Image

# Short prompts as people type them (colours and shapes the data holds, and object names),
# then full captions in the data's style (preprocess/emoji_captions.py): the Unicode name,
# then the style phrase of one of the three sources.
DEMO_PROMPTS = (
    "red heart",
    "green circle",
    "blue square",
    "purple heart",
    "yellow circle",
    "red apple",
    "grinning face",
    "red apple; flat colour emoji",
    "grinning face; flat colour emoji",
    "sun; outlined colour emoji",
    "dog face; outlined colour emoji",
    "rocket; black line-art emoji",
)
MIN_CELL = 128
LABEL_HEIGHT = 18
PAD = 4


def labelled_grid(rows: list[tuple[str, list[Image.Image]]]) -> Image.Image:
    """One row per (label, images): the label above, images enlarged to >= MIN_CELL px."""
    side = rows[0][1][0].width
    scale = max(1, -(-MIN_CELL // side))  # ceil
    cell = side * scale
    columns = max(len(images) for _, images in rows)
    width = columns * (cell + PAD) + PAD
    height = len(rows) * (LABEL_HEIGHT + cell + PAD) + PAD
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    y = PAD
    for label, images in rows:
        draw.text((PAD, y + 2), label, fill=(0, 0, 0), font=font)
        y += LABEL_HEIGHT
        for col, image in enumerate(images):
            big = image.resize((cell, cell), Image.Resampling.NEAREST) if scale > 1 else image
            grid.paste(big, (PAD + col * (cell + PAD), y))
        y += cell + PAD
    return grid


def write_demo(
    pipe: Text2Image,
    sampling: SamplerConfig,
    seed: int,
    out: Path,
    prompts: tuple[str, ...] = DEMO_PROMPTS,
    per_prompt: int = 4,
) -> Path:
    """Generate ``per_prompt`` images (seeds seed .. seed + per_prompt - 1) per prompt."""
    rows = []
    for prompt in prompts:
        images = pipe.generate(
            [prompt] * per_prompt,
            seed=seed,
            steps=sampling.steps,
            cfg_scale=sampling.cfg_scale,
            sampler=sampling.sampler,
            shift=sampling.shift,
            cfg_interval=sampling.cfg_interval,
        )
        rows.append((prompt, [g.image for g in images]))
    hashes = pipe.hashes
    metadata = {
        "prompts": " | ".join(prompts),
        "seed": f"{seed}..{seed + per_prompt - 1} (per row)",
        "steps": sampling.steps,
        "cfg_scale": sampling.cfg_scale,
        "sampler": sampling.sampler,
        "shift": sampling.shift,
        "cfg_interval": ",".join(f"{t:g}" for t in sampling.cfg_interval),
        "vae_hash": hashes["vae"],
        "clip_hash": hashes["clip"],
        "unet_hash": hashes["unet"],
    }
    return save_png(labelled_grid(rows), metadata, out)
