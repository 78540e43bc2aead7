"""The attribute x object probe: does each stage keep "red" apart from "orange"?

A probe is a grid of short prompts ``"{attribute} {object}"`` (by default the six colours and
three shapes of the emoji data: ``"red heart"``, ``"purple square"``, ...). Three questions are
asked of it, one per stage:

- **VAE**: reconstructing the data's own images of each prompt, is the named colour kept?
- **CLIP** (text side), factored: among the prompts of another colour, does the nearest share
  the object; among those of another object, does it share the colour? (``text_probe``; one
  nearest neighbour cannot share both, so the two are asked apart, each with its chance.)
- **Text-to-image**: does a generated image show the named colour, the named object, both?

The images are judged without any learned model (``ColourShapeJudge``), so the judge cannot
share a stage's blind spots: the colour is the nearest reference colour in CIELAB (a*, b*) of
the chromatic pixels, the object is the object of the reference whose foreground mask
overlaps most (IoU, both cropped to their bounding boxes), both references taken from the training split's images whose caption
name is exactly the probe prompt, in their coloured styles. A data set without such images
(a user's own) simply has no image probe; the text probe needs no images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import kornia.color
import torch
import torch.nn.functional as F

from .captions import short_name
from .data import CorruptSample, ShardDataset, load_index

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SHAPES = ("heart", "circle", "square")
CHROMA_MIN = 25.0  # CIELAB chroma above which a pixel counts as coloured
MIN_COLOURED = 0.02  # share of coloured pixels below which an image has no colour
INK_DISTANCE = 12.0  # CIELAB distance from white above which a pixel is foreground
MASK_SIDE = 16  # side of the box-normalised foreground masks compared by IoU


@dataclass(frozen=True)
class ProbeConfig:
    attributes: tuple[str, ...] = COLOURS
    objects: tuple[str, ...] = SHAPES

    def prompts(self) -> list[tuple[str, str, str]]:
        """(prompt, attribute, object) for every pair, attribute-major."""
        return [(f"{a} {o}", a, o) for a in self.attributes for o in self.objects]


@dataclass(frozen=True)
class Reference:
    prompt: str
    attribute: str
    object: str
    caption: str
    image: torch.Tensor  # (3, H, W) in [-1, 1]


def to_lab(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> CIELAB (B, 3, H, W): L in [0, 100], a*, b* about +-100."""
    return kornia.color.rgb_to_lab(((images.float() + 1) / 2).clamp(0, 1))


def delta_e(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean CIE76 colour difference per image (Euclidean in CIELAB), (B,); images in [-1, 1]."""
    return (to_lab(a) - to_lab(b)).square().sum(dim=1).sqrt().mean(dim=(1, 2))


def find_references(split_dir: Path, cfg: ProbeConfig, resolution: int) -> list[Reference]:
    """The split's images whose caption name is a probe prompt and that are coloured."""
    wanted = {prompt: (a, o) for prompt, a, o in cfg.prompts()}
    dataset = ShardDataset(load_index(split_dir), resolution=resolution)
    found = []
    for i in range(len(dataset)):
        try:
            caption = dataset.caption(i)
        except (CorruptSample, OSError, ValueError):
            continue
        prompt = short_name(caption)
        if prompt not in wanted:
            continue
        sample = dataset[i]
        if "image" not in sample:
            continue
        image = sample["image"]
        if coloured_share(image[None])[0] < MIN_COLOURED:
            continue  # line art: the colour is only in the words
        attribute, obj = wanted[prompt]
        found.append(Reference(prompt, attribute, obj, caption, image))
    return found


def coloured_share(images: torch.Tensor) -> torch.Tensor:
    """(B,) share of pixels whose CIELAB chroma exceeds CHROMA_MIN."""
    lab = to_lab(images)
    return (lab[:, 1:].norm(dim=1) > CHROMA_MIN).float().mean(dim=(1, 2))


class ColourShapeJudge:
    """Names the colour and the object of images by the nearest reference (see module doc)."""

    def __init__(self, references: list[Reference]):
        if not references:
            raise ValueError("the colour/shape judge needs reference images")
        self.size = references[0].image.shape[-1]
        images = torch.stack([r.image for r in references])
        self.objects = [r.object for r in references]
        self.masks = self._masks(images)  # (R, H*W) bool
        self.attributes = sorted({r.attribute for r in references})
        chroma = self._mean_chroma(images)  # (R, 2)
        self.centroids = torch.stack(
            [
                chroma[[i for i, r in enumerate(references) if r.attribute == a]].mean(0)
                for a in self.attributes
            ]
        )  # (A, 2)

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float().clamp(-1, 1)
        if images.shape[-1] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="area")
        return images

    @staticmethod
    def _masks(images: torch.Tensor) -> torch.Tensor:
        """(B, MASK_SIDE**2) bool: the foreground cropped to its bounding box and resized,
        so the same shape drawn at another size or place (the data's styles differ) matches.
        Rows and columns with fewer than 2 foreground pixels are ignored for the box: stray
        pixels of a generated image do not stretch it."""
        lab = to_lab(images)
        white = torch.tensor([100.0, 0.0, 0.0], device=lab.device).view(1, 3, 1, 1)
        ink = (lab - white).norm(dim=1) > INK_DISTANCE  # (B, H, W)
        out = []
        for mask in ink:
            rows = (mask.sum(1) >= 2).nonzero().flatten()
            cols = (mask.sum(0) >= 2).nonzero().flatten()
            if len(rows) == 0 or len(cols) == 0:
                out.append(torch.zeros(MASK_SIDE * MASK_SIDE, dtype=torch.bool))
                continue
            crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].float()
            box = F.interpolate(crop[None, None], size=(MASK_SIDE, MASK_SIDE), mode="area")
            out.append((box > 0.5).flatten())
        return torch.stack(out)

    @staticmethod
    def _mean_chroma(images: torch.Tensor) -> torch.Tensor:
        """(B, 2) mean (a*, b*) of the coloured pixels (zeros for an image with none)."""
        ab = to_lab(images)[:, 1:].flatten(2)  # (B, 2, HW)
        coloured = (ab.norm(dim=1) > CHROMA_MIN).float()  # (B, HW)
        return (ab * coloured[:, None]).sum(-1) / coloured.sum(-1, keepdim=True).clamp_min(1)

    def colours(self, images: torch.Tensor) -> list[str | None]:
        """The nearest reference colour of each image, None where it has almost no colour."""
        images = self._resize(images)
        chroma = self._mean_chroma(images)
        nearest = torch.cdist(chroma, self.centroids).argmin(dim=1)
        share = coloured_share(images)
        return [
            self.attributes[int(j)] if s >= MIN_COLOURED else None for j, s in zip(nearest, share)
        ]

    def objects_of(self, images: torch.Tensor) -> list[str]:
        """The object of the reference whose foreground mask has the highest IoU."""
        masks = self._masks(self._resize(images)).float()  # (B, HW)
        refs = self.masks.float()  # (R, HW)
        inter = masks @ refs.T
        union = masks.sum(1, keepdim=True) + refs.sum(1) - inter
        best = (inter / union.clamp_min(1)).argmax(dim=1)
        return [self.objects[int(j)] for j in best]


def judge_rates(
    judge: ColourShapeJudge, images: torch.Tensor, attributes: list[str], objects: list[str]
) -> dict[str, float]:
    """Shares of images showing the named colour, the named object, and both; then, per
    object, ``object_rate_<o>`` (the share of the images naming it that show it) and
    ``judged_<o>`` (the share of all images judged to show it). A model that draws one shape
    for every prompt scores 1/len(objects) on ``object_rate``; the breakdown shows it."""
    colours, shapes = judge.colours(images), judge.objects_of(images)
    colour_ok = [c == a for c, a in zip(colours, attributes)]
    object_ok = [s == o for s, o in zip(shapes, objects)]
    n = max(len(colours), 1)
    rates = {
        "colour_rate": sum(colour_ok) / n,
        "object_rate": sum(object_ok) / n,
        "both_rate": sum(c and o for c, o in zip(colour_ok, object_ok)) / n,
    }
    for name in sorted(set(objects) | set(judge.objects)):
        named = [ok for ok, o in zip(object_ok, objects) if o == name]
        if named:
            rates[f"object_rate_{name}"] = sum(named) / len(named)
        rates[f"judged_{name}"] = sum(s == name for s in shapes) / n
    return rates


def text_probe(embeddings: torch.Tensor, cfg: ProbeConfig) -> dict[str, float]:
    """The factored structure of the probe prompts' text embeddings (P, E), in
    ``cfg.prompts()`` order. One nearest neighbour cannot share both the attribute and the
    object, so each is asked where the other cannot decide it:

    - ``probe_object_given_other_attribute``: among the prompts of *another* attribute, does
      the nearest share the object? (chance ``1 / len(objects)``: "red heart" -> "blue heart")
    - ``probe_attribute_given_other_object``: among the prompts of *another* object, does the
      nearest share the attribute? (chance ``1 / len(attributes)``: "red heart" -> "red square")
    - ``probe_cos_same_attribute`` / ``probe_cos_same_object``: the mean cosine of the pairs
      that share only the attribute / only the object: how strongly each word is encoded.

    The chance levels are returned beside the shares (``..._chance``)."""
    prompts = cfg.prompts()
    emb = F.normalize(embeddings.float(), dim=-1)
    sim = emb @ emb.T  # (P, P)
    attrs = [a for _, a, _ in prompts]
    objs = [o for _, _, o in prompts]

    def nearest_shares(exclude: list[str], share: list[str]) -> float:
        hits = []
        for i in range(len(prompts)):
            others = [j for j in range(len(prompts)) if exclude[j] != exclude[i]]
            if others:
                j = others[int(sim[i, others].argmax())]
                hits.append(share[j] == share[i])
        return sum(hits) / max(len(hits), 1)

    def mean_cos(same: list[str], differ: list[str]) -> float:
        values = [
            float(sim[i, j])
            for i in range(len(prompts))
            for j in range(len(prompts))
            if i != j and same[i] == same[j] and differ[i] != differ[j]
        ]
        return sum(values) / max(len(values), 1)

    return {
        "probe_object_given_other_attribute": nearest_shares(attrs, objs),
        "probe_object_given_other_attribute_chance": 1 / len(set(objs)),
        "probe_attribute_given_other_object": nearest_shares(objs, attrs),
        "probe_attribute_given_other_object_chance": 1 / len(set(attrs)),
        "probe_cos_same_attribute": mean_cos(attrs, objs),
        "probe_cos_same_object": mean_cos(objs, attrs),
    }


def image_to_prompt_r1(
    image_emb: torch.Tensor, prompt_emb: torch.Tensor, references: list[Reference], cfg: ProbeConfig
) -> float:
    """Share of the references whose own probe prompt is the nearest of ``cfg.prompts()``;
    ``image_emb`` (R, E) of the references, ``prompt_emb`` (P, E) in prompt order."""
    prompts = [p for p, _, _ in cfg.prompts()]
    sim = F.normalize(image_emb.float(), dim=-1) @ F.normalize(prompt_emb.float(), dim=-1).T
    best = sim.argmax(dim=1).tolist()
    return sum(prompts[j] == r.prompt for j, r in zip(best, references)) / len(references)
