"""Measuring whether images follow the prompt, and the recipe parts that make them.

Caption augmentation, the attribute x object probe and its colour/shape judge, CIELAB delta
E, R-precision, the grouped InfoNCE, the UNet's scale-shift conditioning, and
``python -m pipeline evaluate`` end to end on tiny exports.
"""

from __future__ import annotations

import json
import math
import random
import shutil

import torch
import torch.nn.functional as F
from exports import one_torch_thread
from synthetic import COLOURS, draw_sample, make_shards

from pipeline.__main__ import main as pipeline_main
from stages.clip.loss import caption_groups, contrastive_loss
from stages.common.captions import CaptionAugmentConfig, augment_captions, short_name
from stages.common.probe import (
    ColourShapeJudge,
    ProbeConfig,
    Reference,
    delta_e,
    find_references,
    judge_rates,
    text_probe,
)
from stages.unet.evaluate import r_precision
from stages.unet.model import UNet, UNetModelConfig

EMOJI = "red heart, love, emotion; flat colour emoji"

# ------------------------------------------------------------------ caption augmentation


def test_caption_augmentation_rewrites_as_people_type_and_is_seeded():
    cfg = CaptionAugmentConfig(enabled=True, name_only=0.3, keep_tag=0.5, drop_style=0.5)
    torch.manual_seed(0)
    first = augment_captions([EMOJI] * 400, cfg)
    torch.manual_seed(0)
    assert augment_captions([EMOJI] * 400, cfg) == first  # the global generator decides
    assert all(c.startswith("red heart") for c in first)  # the name is always kept
    counts = {c: first.count(c) for c in set(first)}
    # name alone 0.3 * 0.5 (style dropped) + 0.7 * 0.25 * 0.5 (no tag kept, style dropped)
    assert abs(counts["red heart"] / 400 - (0.15 + 0.0875)) < 0.07
    assert "red heart, love, emotion; flat colour emoji" in counts
    assert "red heart; flat colour emoji" in counts and "red heart, emotion" in counts
    # free-form captions, the empty (null) caption and a disabled config pass through
    assert augment_captions(["a dog on a beach", ""], cfg) == ["a dog on a beach", ""]
    assert augment_captions([EMOJI], CaptionAugmentConfig()) == [EMOJI]
    assert short_name(EMOJI) == "red heart" and short_name("a cat") == "a cat"


# ------------------------------------------------------------------ probe and its judge


def _shape_image(colour: str, shape: str, rng: random.Random, size: int = 32) -> torch.Tensor:
    """A synthetic shape of one colour at a random size and place, (3, H, W) in [-1, 1]."""
    while True:
        image, caption = draw_sample(rng, size)
        if caption == f"a {colour} {shape}":
            pixels = torch.tensor(list(image.getdata()), dtype=torch.float32)
            return (pixels.T.reshape(3, size, size) / 127.5) - 1


def test_judge_names_colour_and_shape_of_unseen_drawings():
    rng = random.Random(0)
    cfg = ProbeConfig(attributes=tuple(COLOURS), objects=("circle", "square", "triangle"))
    refs = [Reference(p, a, o, p, _shape_image(a, o, rng)) for p, a, o in cfg.prompts()]
    judge = ColourShapeJudge(refs)
    tests = [(a, o) for _, a, o in cfg.prompts() for _ in range(2)]
    images = torch.stack([_shape_image(a, o, rng) for a, o in tests])
    rates = judge_rates(judge, images, [a for a, _ in tests], [o for _, o in tests])
    assert rates["colour_rate"] == 1.0
    assert rates["object_rate"] >= 0.9
    # a white image has no colour; swapped names are wrong
    assert judge.colours(torch.ones(1, 3, 32, 32)) == [None]
    wrong = judge_rates(judge, images, [a for a, _ in reversed(tests)], [o for _, o in tests])
    assert wrong["colour_rate"] < 0.5 and wrong["both_rate"] < 0.5


def test_judge_rates_break_the_object_rate_down_per_object():
    rng = random.Random(1)
    cfg = ProbeConfig(attributes=("red", "blue"), objects=("circle", "square"))
    refs = [Reference(p, a, o, p, _shape_image(a, o, rng)) for p, a, o in cfg.prompts()]
    judge = ColourShapeJudge(refs)
    # a "model" that draws a circle whatever it is asked: every circle right, no square
    circles = torch.stack([_shape_image("red", "circle", rng) for _ in range(4)])
    named = ["circle", "circle", "square", "square"]
    rates = judge_rates(judge, circles, ["red"] * 4, named)
    assert rates["object_rate_circle"] == 1.0 and rates["object_rate_square"] == 0.0
    assert rates["judged_circle"] == 1.0 and rates["judged_square"] == 0.0
    assert rates["object_rate"] == 0.5


def test_find_references_takes_coloured_images_named_like_a_probe_prompt(tmp_path):
    data = make_shards(tmp_path, n_train=60, n_val=4, caption="{colour} {shape}, tag; emoji")
    refs = find_references(data / "train", ProbeConfig(), resolution=16)
    assert refs and all(r.prompt == f"{r.attribute} {r.object}" for r in refs)
    assert {r.attribute for r in refs} <= {"red", "green", "blue", "yellow"}
    assert {r.object for r in refs} <= {"circle", "square"}  # the probe has no triangle


def test_delta_e_is_cie76_in_lab():
    white = torch.ones(1, 3, 4, 4)
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    assert delta_e(white, white).item() < 1e-3
    # sRGB red is L 53.24, a 80.09, b 67.20; white is L 100, a 0, b 0
    expected = math.sqrt((100 - 53.24) ** 2 + 80.09**2 + 67.20**2)
    assert abs(delta_e(white, red).item() - expected) < 0.5


def test_text_probe_tells_an_encoder_that_hears_colour_from_one_that_does_not():
    cfg = ProbeConfig(attributes=("red", "green", "blue"), objects=("heart", "circle"))
    prompts = cfg.prompts()
    attr = torch.eye(3)
    obj = torch.eye(2)

    def emb(w_attr: float) -> torch.Tensor:
        return torch.stack(
            [
                torch.cat([w_attr * attr[cfg.attributes.index(a)], obj[cfg.objects.index(o)]])
                for _, a, o in prompts
            ]
        )

    weak_colour = text_probe(emb(0.1), cfg)
    strong_colour = text_probe(emb(2.0), cfg)
    # The object is heard in both: among other colours the nearest shares the object.
    assert weak_colour["probe_object_given_other_attribute"] == 1.0
    assert strong_colour["probe_object_given_other_attribute"] == 1.0
    # The colour direction, weak or strong, decides the nearest among the other objects.
    assert strong_colour["probe_attribute_given_other_object"] == 1.0
    assert weak_colour["probe_attribute_given_other_object_chance"] == 1 / 3
    assert weak_colour["probe_object_given_other_attribute_chance"] == 1 / 2
    # Pairs sharing only the object are closer when the colour is weakly encoded.
    assert weak_colour["probe_cos_same_object"] > strong_colour["probe_cos_same_object"]
    assert strong_colour["probe_cos_same_attribute"] > weak_colour["probe_cos_same_attribute"]


def test_text_probe_scores_chance_for_an_encoder_deaf_to_the_object():
    cfg = ProbeConfig(attributes=("red", "green", "blue"), objects=("heart", "circle", "square"))
    # The embedding holds the colour only: the object is never what decides a neighbour.
    emb = torch.stack(
        [
            torch.eye(3)[cfg.attributes.index(a)] + 1e-3 * i
            for i, (_, a, _) in enumerate(cfg.prompts())
        ]
    )
    out = text_probe(emb, cfg)
    assert out["probe_attribute_given_other_object"] == 1.0
    # Among the other colours every prompt is equally far: the pick is not the object.
    assert out["probe_object_given_other_attribute"] <= 0.5


# ------------------------------------------------------------------ R-precision


def test_r_precision_is_one_for_a_perfect_match_and_near_chance_for_noise():
    texts = [f"caption {i}" for i in range(300)]
    table = F.normalize(torch.randn(300, 16, generator=torch.Generator().manual_seed(0)), dim=-1)

    def embed(batch: list[str]) -> torch.Tensor:
        return table[[int(t.split()[1]) for t in batch]]

    assert r_precision(embed(texts), texts, embed, seed=0) == 1.0
    noise = F.normalize(torch.randn(300, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert r_precision(noise, texts, embed, seed=0) < 0.06  # chance is 1/100
    # fewer distinct texts than candidates: all others compete; one text: always a hit
    assert r_precision(embed(texts[:3]), texts[:3], embed, seed=0) == 1.0
    assert r_precision(noise[:2], ["same", "same"], lambda t: table[: len(t)], seed=0) == 1.0


# ------------------------------------------------------------------ grouped InfoNCE


def test_identical_captions_are_positives_of_each_other():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(6, 8), dim=-1)
    texts = F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    distinct = caption_groups([f"c{i}" for i in range(6)])
    plain, _ = contrastive_loss(images, texts, scale)
    grouped, _ = contrastive_loss(images, texts, scale, distinct)
    assert torch.equal(plain, grouped)  # all distinct: exactly the one-hot loss
    # rows 0 and 1 share a caption, and so (as the encoder guarantees) a text embedding
    texts[1] = texts[0]
    same = caption_groups(["red heart", "red heart", "c2", "c3", "c4", "c5"])
    assert same[0] == same[1] and same[0] != same[2]
    loss, _ = contrastive_loss(images, texts, scale, same)
    logits = scale * images @ texts.T
    target = torch.eye(6)
    target[0, :2] = target[1, :2] = 0.5
    expected = 0.5 * (
        F.cross_entropy(logits, target) + F.cross_entropy(scale * texts @ images.T, target)
    )
    torch.testing.assert_close(loss, expected)


# ------------------------------------------------------------------ UNet scale-shift


def test_scale_shift_resblocks_take_the_pooled_text():
    cfg = UNetModelConfig(
        in_channels=4,
        context_dim=8,
        sample_size=8,
        base_channels=16,
        groups=4,
        scale_shift=True,
    )
    torch.manual_seed(0)
    unet = UNet(cfg)
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)

    class Cond:
        def __init__(self, pooled):
            self.tokens = torch.zeros(2, 3, 8)
            self.mask = torch.ones(2, 3, dtype=torch.bool)
            self.pooled = pooled

    a = unet(x, t, Cond(torch.zeros(2, 8)))
    b = unet(x, t, Cond(torch.ones(2, 8)))
    assert a.shape == x.shape and not torch.allclose(a, b)
    assert unet.mid_res1.temb.out_features == 2 * unet.mid_res1.conv1.out_channels


# ------------------------------------------------------------------ pipeline evaluate


def test_pipeline_evaluate_writes_every_stage_and_prints_a_table(tmp_path, tiny_exports, capsys):
    data = make_shards(
        tmp_path / "data", n_train=60, n_val=24, caption="{colour} {shape}, tag; flat colour emoji"
    )
    copy = tmp_path / "runs"  # the evaluation writes under the run folders: a copy
    shutil.copytree(tiny_exports.unet.parents[2], copy)
    argv = [
        "evaluate",
        "--runs",
        str(copy),
        "--data",
        str(data),
        "--num-images",
        "6",
        "--probe-seeds",
        "1",
        "--steps",
        "2",
        "--precision",
        "fp32",
    ]
    with one_torch_thread():
        assert pipeline_main(argv) == 0
    table = capsys.readouterr().out
    for stage in ("vae", "clip", "unet"):
        record = json.loads((copy / "tiny" / stage / "eval" / "metrics.json").read_text())
        assert record["references"] > 0 and record["metrics"]
        assert f"\n{stage} " in table
    unet = json.loads((copy / "tiny" / "unet" / "eval" / "metrics.json").read_text())["metrics"]
    for prompt_set in ("captions", "short"):
        assert set(unet[prompt_set]) == {"clip_score", "r_precision", "fd", "seconds_per_image"}
        assert 0 <= unet[prompt_set]["r_precision"] <= 1
    assert {"colour_rate", "object_rate", "both_rate"} <= set(unet["probe"])
    vae = json.loads((copy / "tiny" / "vae" / "eval" / "metrics.json").read_text())["metrics"]
    assert "delta_e" in vae and 0 <= vae["probe_colours_kept"] <= 1
    assert (copy / "tiny" / "vae" / "eval" / "worst.png").exists()
    assert (copy / "tiny" / "unet" / "eval" / "probe.png").exists()
    # a bad stage name is a clear error (exit 2), not a traceback
    assert pipeline_main(["evaluate", "--runs", str(copy), "--stages", "vea"]) == 2
