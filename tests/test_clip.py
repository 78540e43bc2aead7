"""CLIP stage: tokenizer conventions, the towers, the loss, retrieval, export, training, resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from stages.clip.export import TextCondition, build_clip_modules, load_clip, save_clip_export
from stages.clip.loss import LogitScale, contrastive_loss
from stages.clip.model import CLIPModelConfig, ImageTowerConfig, TextEncoderConfig
from stages.clip.stage import CLIPStage, CLIPStageConfig, retrieval_metrics
from stages.clip.tokenizer import CLIPTokenizer, TokenizerError, end_positions, train_tokenizer
from stages.common.cli import run_stage
from stages.common.config import ConfigError, load_config
from stages.common.data import iter_split
from stages.common.export import ExportError, load_tensors
from stages.common.stage import RunContext
from stages.common.trainer import Trainer
from stages.vae.export import load_vae, save_vae_export
from stages.vae.model import AutoencoderKL, VAEModelConfig

CAPTIONS = [
    f"a {colour} {shape}"
    for colour in ("red", "green", "blue", "yellow")
    for shape in ("circle", "square", "triangle")
] + ["Café au lait", "a big red apple; flat colour emoji"]


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return train_tokenizer(CAPTIONS * 3, vocab_size=400, context_length=12, min_frequency=1)


def small_model_config(context_length: int = 12) -> CLIPModelConfig:
    return CLIPModelConfig(
        embed_dim=16,
        text=TextEncoderConfig(context_length=context_length, width=32, layers=2, heads=4),
        image=ImageTowerConfig(patch_size=2, width=32, layers=1, heads=4),
    )


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_normalised_text(tokenizer):
    ids, mask = tokenizer.encode(["  A   Red\tCIRCLE ", "a red circle"])
    assert torch.equal(ids[0], ids[1]) and torch.equal(mask[0], mask[1])
    assert tokenizer.decode(ids[0]) == "a red circle"
    assert tokenizer.decode(tokenizer.encode(["café au lait"])[0][0]) == "café au lait"
    # NFC: the decomposed "é" tokenises like the composed one.
    decomposed = unicodedata.normalize("NFD", "café au lait")
    assert decomposed != "café au lait"
    assert torch.equal(tokenizer.encode([decomposed])[0], tokenizer.encode(["café au lait"])[0])


def test_tokenizer_start_end_padding_and_mask(tokenizer):
    ids, mask = tokenizer.encode(["a red circle", ""])
    assert (
        ids.shape == mask.shape == (2, 12) and ids.dtype == torch.long and mask.dtype == torch.bool
    )
    assert len({tokenizer.start_id, tokenizer.end_id, tokenizer.pad_id}) == 3
    length = int(mask[0].sum())
    assert mask[0, :length].all() and not mask[0, length:].any()
    assert ids[0, 0] == tokenizer.start_id and ids[0, length - 1] == tokenizer.end_id
    assert (ids[0, length:] == tokenizer.pad_id).all()
    # The empty caption is start + end, then padding.
    assert ids[1, :2].tolist() == [tokenizer.start_id, tokenizer.end_id]
    assert mask[1].tolist() == [True, True] + [False] * 10
    assert end_positions(mask).tolist() == [length - 1, 1]
    # A caption cannot end itself early by typing the special tokens.
    injected, _ = tokenizer.encode(["a red <|endoftext|><|pad|> circle"])
    assert torch.equal(injected, ids[:1])


def test_truncation_keeps_the_end_token(tokenizer):
    long = " ".join(["a big red apple"] * 20)
    ids, mask = tokenizer.encode([long])
    assert mask.all()
    assert ids[0, 0] == tokenizer.start_id and ids[0, -1] == tokenizer.end_id
    assert (ids[0, 1:-1] != tokenizer.end_id).all()


def test_tokenizer_file_round_trip_is_not_retrained(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    loaded = CLIPTokenizer.from_file(path)
    assert loaded.context_length == 12 and loaded.vocab_size == tokenizer.vocab_size
    assert torch.equal(loaded.encode(CAPTIONS)[0], tokenizer.encode(CAPTIONS)[0])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="bad.json"):
        CLIPTokenizer.from_file(tmp_path / "bad.json")


# -------------------------------------------------------------------------------- towers


def test_pooled_state_is_at_the_end_token_whatever_the_ids(tokenizer):
    torch.manual_seed(0)
    vocab = tokenizer.vocab_size + 50
    text = build_clip_modules(small_model_config(), vocab, 4, 4)["text"].eval()
    ids, mask = tokenizer.encode(["a red circle", "a blue square triangle", ""])
    # Real ids all exceed the end id; make the pad id the largest too: argmax(ids) would
    # point at a pad or a word, never at the end token.
    padded = torch.where(mask, ids, torch.full_like(ids, vocab - 1))
    out = text(padded, mask)
    ends = end_positions(mask)
    assert out.tokens.shape == (3, 12, 32) and out.pooled.shape == (3, 32)
    assert out.embedding.shape == (3, 16)
    assert torch.equal(out.pooled, out.tokens[torch.arange(3), ends])
    assert (padded.argmax(dim=1) != ends).all()
    # Pads are invisible: other pad ids give the same states; pad positions are zero.
    other = text(torch.where(mask, ids, torch.full_like(ids, 7)), mask)
    torch.testing.assert_close(other.tokens, out.tokens)
    assert (out.tokens[~mask] == 0).all()


def test_text_encoder_is_causal(tokenizer):
    torch.manual_seed(0)
    text = build_clip_modules(small_model_config(), tokenizer.vocab_size, 4, 4)["text"].eval()
    ids, mask = tokenizer.encode(["a red circle square"])
    changed = ids.clone()
    changed[0, 4] = ids[0, 2]
    a, b = text(ids, mask).tokens, text(changed, mask).tokens
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4], b[:, 4])


# ---------------------------------------------------------------------------------- loss


def test_logit_scale_starts_at_one_over_007_and_is_clamped():
    scale = LogitScale()
    assert math.isclose(scale().item(), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        scale.log_scale.fill_(10.0)
    assert math.isclose(scale().item(), 100.0, rel_tol=1e-5)


def test_loss_is_lower_on_aligned_than_on_shuffled_pairs():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(16, 8), dim=-1)
    texts = F.normalize(images + 0.3 * torch.randn(16, 8), dim=-1)
    scale = LogitScale()()
    aligned, accuracy = contrastive_loss(images, texts, scale)
    shuffled, _ = contrastive_loss(images, texts[torch.randperm(16)], scale)
    assert aligned < shuffled
    assert accuracy > 0.5


def test_retrieval_metrics_count_identical_captions_as_hits():
    emb = F.normalize(torch.eye(4), dim=-1)
    perfect = retrieval_metrics(emb, emb, torch.tensor([0, 1, 2, 3]))
    assert perfect["t2i_r1"] == perfect["i2t_r1"] == perfect["mean_recall"] == 1.0
    assert math.isclose(perfect["chance_r1"], 0.25)
    # Texts 0 and 1 are the same caption (class 0): text 1 retrieving image 0 is a hit.
    texts = emb[[0, 0, 2, 3]]
    shared = retrieval_metrics(emb, texts, torch.tensor([0, 0, 1, 2]))
    assert shared["t2i_r1"] == 1.0
    assert math.isclose(shared["chance_r1"], (2 + 2 + 1 + 1) / 4 / 4)
    swapped = retrieval_metrics(emb, emb[[1, 0, 3, 2]], torch.tensor([0, 1, 2, 3]))
    assert swapped["t2i_r1"] == swapped["i2t_r1"] == 0.0 and swapped["t2i_r5"] == 1.0


# -------------------------------------------------------------------------------- export


def test_export_reload_gives_identical_embeddings_and_null(tokenizer, tmp_path):
    torch.manual_seed(0)
    modules = build_clip_modules(small_model_config(), tokenizer.vocab_size, 4, 8)
    folder = tmp_path / "export"
    digest = save_clip_export(
        folder,
        modules["text"],
        modules["image"],
        modules["logit_scale"],
        tokenizer,
        vae_hash="v" * 64,
    )
    clip = load_clip(folder, vae_hash="v" * 64)
    assert clip.hash == digest and clip.width == 32 and clip.context_length == 12
    assert clip.embed_dim == 16 and clip.image_input == "latent"
    latents = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        ids, mask = tokenizer.encode(CAPTIONS[:3])
        want_text = F.normalize(modules["text"](ids, mask).embedding, dim=-1)
        want_image = F.normalize(modules["image"](latents), dim=-1)
    assert torch.equal(clip.embed_texts(CAPTIONS[:3]), want_text)
    assert torch.equal(clip.embed_images(latents), want_image)
    null = clip.encode_text([""])
    assert clip.null.tokens.shape == (1, 12, 32) and clip.null.pooled.shape == (1, 32)
    assert clip.null.mask.dtype == torch.bool and clip.null.mask[0].tolist()[:3] == [1, 1, 0]
    for got, want in zip((clip.null.tokens, clip.null.pooled), (null.tokens, null.pooled)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"tokenizer.json", "null_condition.safetensors"}
    assert manifest["upstream"] == {"vae": "v" * 64}

    cond = clip.encode_text(CAPTIONS[:2])
    mixed = cond.where(torch.tensor([True, False]), clip.null)
    assert torch.equal(mixed.tokens[0], clip.null.tokens[0])
    assert torch.equal(mixed.tokens[1], cond.tokens[1])
    assert len(TextCondition.cat([cond, clip.null.expand(2)])) == 4

    with pytest.raises(ExportError, match="vae"):
        load_clip(folder, vae_hash="w" * 64)
    (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text() + " ")
    with pytest.raises(ExportError, match="tokenizer.json"):
        load_clip(folder)


# --------------------------------------------------------------------------------- stage


def write_vae_export(runs: Path, preset: str, seed: int = 0) -> str:
    """An untrained but real VAE export: factor 2, 4 latent channels (16 px -> 8x8x4)."""
    torch.manual_seed(seed)
    cfg = VAEModelConfig(
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        norm_groups=4,
        mid_attention=False,
    )
    return save_vae_export(
        AutoencoderKL(cfg),
        cfg,
        runs / preset / "vae" / "export",
        torch.zeros(4),
        torch.ones(4),
        resolution=16,
    )


def stage_overrides(data: Path, steps: int) -> list[str]:
    return [
        f"data.path={data}",
        "data.resolution=16",
        "data.batch_size=32",
        f"train.max_steps={steps}",
        f"train.val_every={steps}",
        f"train.preview_every={steps}",
        "train.log_every=10",
        "train.trackers=[]",
        "train.mixed_precision=no",
        "optim.lr=1e-3",
        "optim.warmup_steps=5",
        "optim.schedule=constant",
        "ema.decay=0.9",
        "ckpt.every_steps=1000",
        "model.embed_dim=32",
        "model.text.context_length=8",
        "model.text.width=32",
        "model.text.layers=1",
        "model.text.heads=2",
        "model.image.width=32",
        "model.image.layers=1",
        "model.image.heads=2",
        "model.image.patch_size=2",
        "tokenizer.vocab_size=300",
        "tokenizer.min_frequency=1",
        "val.batch_size=16",
    ]


def test_stage_refuses_a_missing_vae_export(tiny_shards, tmp_path):
    config = load_config(CLIPStageConfig, overrides=stage_overrides(tiny_shards, 1))
    with pytest.raises(ExportError, match="make vae"):
        CLIPStage(config, RunContext(tmp_path / "runs", "t", "clip"))


def test_pixel_tower_needs_no_vae_and_records_no_vae_upstream(tiny_shards, tmp_path):
    overrides = [*stage_overrides(tiny_shards, 1), "model.image.input=pixel"]
    config = load_config(CLIPStageConfig, overrides=overrides + ["model.image.patch_size=4"])
    stage = CLIPStage(config, RunContext(tmp_path / "runs", "t", "clip"))  # no VAE export
    assert (stage.image_channels, stage.image_size) == (3, 16)
    modules = stage.build()
    batch = next(iter(stage.train_loader(0, 1)))
    assert torch.isfinite(stage.loss(modules, batch, 0)["loss"])
    stage.export(modules, tmp_path / "export")
    clip = load_clip(tmp_path / "export", vae_hash="any VAE: the pixel tower ignores it")
    assert clip.image_input == "pixel" and clip.upstream == {}
    assert clip.embed_images(batch["image"][:2]).shape == (2, 32)


def run_clip(data: Path, runs: Path, *overrides: str) -> int:
    argv = ["--preset", "tiny", "--data", str(data), "--runs", str(runs), *overrides]
    return run_stage("clip", CLIPStageConfig, CLIPStage, argv)


def test_loss_encodes_images_through_the_vae_on_the_fly(tiny_shards, tmp_path):
    runs = tmp_path / "runs"
    write_vae_export(runs, "t")
    config = load_config(CLIPStageConfig, overrides=stage_overrides(tiny_shards, 1))
    stage = CLIPStage(config, RunContext(runs, "t", "clip"))
    assert (runs / "t" / "clip" / "tokenizer.json").exists()
    assert stage.image_size == 8 and stage.image_channels == 4
    torch.manual_seed(0)
    modules = stage.build()
    batch = next(iter(stage.train_loader(0, 1)))
    assert "latent" not in batch  # cache.enabled defaults to false: the shard reader
    losses = stage.loss(modules, batch, 0)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    assert modules["logit_scale"].log_scale.grad is not None
    assert all(p.grad is not None for p in modules["image"].parameters())
    # A second stage on the same run folder reuses the tokenizer file, not a new one.
    stamp = (runs / "t" / "clip" / "tokenizer.json").stat().st_mtime_ns
    CLIPStage(config, RunContext(runs, "t", "clip"))
    assert (runs / "t" / "clip" / "tokenizer.json").stat().st_mtime_ns == stamp


def test_tiny_run_beats_chance_and_exports(tiny_shards, tmp_path):
    runs = tmp_path / "runs"
    vae_hash = write_vae_export(runs, "tiny")
    assert run_clip(tiny_shards, runs, *stage_overrides(tiny_shards, 40)) == 0
    run_dir = runs / "tiny" / "clip"
    assert list((run_dir / "cache").glob("*/index.json"))  # tiny caches latents
    preview = json.loads(sorted((run_dir / "previews").glob("retrieval_*.json"))[-1].read_text())
    assert {"ema_top1", "raw_top1"} <= set(preview["examples"][0])

    clip = load_clip(run_dir / "export", vae_hash=vae_hash)
    vae = load_vae(runs / "tiny" / "vae" / "export")
    images, captions = [], []
    for batch in iter_split(tiny_shards / "val", 64, 16):
        images.append(clip.embed_images(vae.normalize(vae.encode(batch["image"])[0])))
        captions += batch["caption"]
    classes = torch.tensor([sorted(set(captions)).index(c) for c in captions])
    metrics = retrieval_metrics(torch.cat(images), clip.embed_texts(captions), classes)
    # 32 val samples of 12 caption classes: chance R@1 is about 0.11, R@5 about 0.45.
    for direction in ("t2i", "i2t"):
        assert metrics[f"{direction}_r1"] > 1.5 * metrics["chance_r1"], metrics
        assert metrics[f"{direction}_r5"] > metrics["chance_r5"], metrics
    torch.testing.assert_close(clip.null.pooled, clip.encode_text([""]).pooled)


def test_resume_through_the_shared_loop_equals_an_uninterrupted_run(
    tiny_shards, tmp_path, monkeypatch
):
    resumed_runs = []
    original = Trainer.resume

    def spy(self):
        resumed_runs.append(original(self))
        return resumed_runs[-1]

    monkeypatch.setattr(Trainer, "resume", spy)
    for name in ("straight", "resumed"):
        write_vae_export(tmp_path / name, "tiny")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # 96 samples in batches of 32: the stop at step 3 is an epoch boundary, 8 is mid-epoch.
    assert run_clip(tiny_shards, straight, *stage_overrides(tiny_shards, 8)) == 0
    assert run_clip(tiny_shards, resumed, *stage_overrides(tiny_shards, 3)) == 0
    assert run_clip(tiny_shards, resumed, *stage_overrides(tiny_shards, 8)) == 0
    assert resumed_runs == [False, False, True]
    want = load_tensors(straight / "tiny" / "clip" / "export")
    got = load_tensors(resumed / "tiny" / "clip" / "export")
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_a_run_on_a_replaced_vae_export_retrains_instead_of_doing_nothing(tiny_shards, tmp_path):
    """Issue 15, item 4: after the VAE is retrained, `make clip` used to find its run
    finished and do nothing, and `make unet` then refused the CLIP export for ever. The
    run folder is now kept aside and CLIP trains again on the new VAE."""
    runs = tmp_path / "runs"
    old_vae = write_vae_export(runs, "tiny")
    assert run_clip(tiny_shards, runs, *stage_overrides(tiny_shards, 2)) == 0
    run_dir = runs / "tiny" / "clip"
    shutil.rmtree(runs / "tiny" / "vae")
    new_vae = write_vae_export(runs, "tiny", seed=1)  # the VAE was trained again
    assert new_vae != old_vae
    assert run_clip(tiny_shards, runs, *stage_overrides(tiny_shards, 2)) == 0
    assert load_clip(run_dir / "export", vae_hash=new_vae).upstream == {"vae": new_vae}
    (stale,) = (runs / "tiny").glob("clip.stale-*")
    assert load_clip(stale / "export", vae_hash=old_vae).upstream == {"vae": old_vae}


# Run by two fresh interpreters (a fork of the test process could deadlock in OpenMP and a
# spawn would re-import this whole module): they import only torch and the loss.
DISTRIBUTED_WORKER = """
import sys, torch, torch.distributed as dist, torch.nn.functional as F
from safetensors.torch import save_file
from stages.clip.loss import contrastive_loss
rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
torch.manual_seed(0)
images = F.normalize(torch.randn(8, 6), dim=-1)  # the same global batch on every rank
texts = F.normalize(images + 0.5 * torch.randn(8, 6), dim=-1)
local_images = images[rank * 4 : rank * 4 + 4].clone().requires_grad_(True)
local_texts = texts[rank * 4 : rank * 4 + 4].clone().requires_grad_(True)
loss, _ = contrastive_loss(local_images, local_texts, torch.tensor(10.0))
loss.backward()
grads = {"loss": loss.detach(), "images": local_images.grad, "texts": local_texts.grad}
save_file(grads, f"{out}/rank{rank}.safetensors")
dist.barrier()  # neither rank tears gloo down while the other still talks to it
dist.destroy_process_group()
"""


def test_loss_across_ranks_equals_the_global_batch_loss(tmp_path):
    """Two gloo ranks, 4 pairs each: the mean of their losses and their gradients (after the
    data-parallel average) equal one process's on all 8 pairs."""
    init = f"file://{tmp_path / 'rendezvous'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", DISTRIBUTED_WORKER, str(rank), init, str(tmp_path)], env=env
        )
        for rank in range(2)
    ]
    assert [w.wait(timeout=120) for w in workers] == [0, 0]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    torch.manual_seed(0)
    images = F.normalize(torch.randn(8, 6), dim=-1).requires_grad_(True)
    texts = F.normalize(images.detach() + 0.5 * torch.randn(8, 6), dim=-1).requires_grad_(True)
    loss, _ = contrastive_loss(images, texts, torch.tensor(10.0))
    loss.backward()
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss.detach())
    for name, full in (("images", images.grad), ("texts", texts.grad)):
        # all_gather's backward sums every rank's gradient into the local rows; DDP then
        # divides by the world size.
        got = torch.cat([ranks[0][name], ranks[1][name]]) / 2
        torch.testing.assert_close(got, full)


def test_fine_tuning_takes_the_exports_towers_and_tokenizer(tiny_shards, tmp_path):
    overrides = [*stage_overrides(tiny_shards, 1), "model.image.input=pixel"]
    overrides.append("model.image.patch_size=4")
    first = CLIPStage(
        load_config(CLIPStageConfig, overrides=overrides), RunContext(tmp_path, "a", "clip")
    )
    torch.manual_seed(0)
    trained = first.build()
    export = tmp_path / "export"
    first.export(trained, export)
    config = load_config(CLIPStageConfig, overrides=[*overrides, f"init.from={export}"])
    stage = CLIPStage(config, RunContext(tmp_path, "b", "clip"))
    # The token ids the export's embeddings learned: its tokenizer, not one trained anew.
    copied = tmp_path / "b" / "clip" / "tokenizer.json"
    assert copied.read_bytes() == (export / "tokenizer.json").read_bytes()
    torch.manual_seed(1)
    modules = stage.build()
    weights, export_hash = stage.init_weights(export)
    assert export_hash == json.loads((export / "manifest.json").read_text())["hash"]
    assert set(weights) == {"text", "image", "logit_scale"}
    for name, module in modules.items():
        module.load_state_dict(weights[name], strict=True)
        for key, value in trained[name].state_dict().items():
            assert torch.equal(module.state_dict()[key], value), f"{name}.{key}"
    wider = load_config(
        CLIPStageConfig, overrides=[*overrides, "model.embed_dim=16", f"init.from={export}"]
    )
    with pytest.raises(ConfigError, match="model.embed_dim"):
        CLIPStage(wider, RunContext(tmp_path, "c", "clip")).init_weights(export)
