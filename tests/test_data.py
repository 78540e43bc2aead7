"""The shard reader: index, decoding, corrupt samples, exact resume across workers and ranks."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from stages.common import dataset as dataset_module
from stages.common import images as images_module
from stages.common.data import (
    DataConfig,
    ResumableBatches,
    ShardDataset,
    ShardLoader,
    iter_split,
    load_index,
)
from stages.common.files import sha256_file
from stages.common.shards import ManifestError, ShardInfo, ShardManifest, write_manifest


def take_batches(loader, count: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == count:
            return out
    raise AssertionError("the loader ended")


def take_keys(loader, count: int) -> list[list[str]]:
    return [list(batch["key"]) for batch in take_batches(loader, count)]


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_samples(folder: Path, samples: list[dict], resolution: int) -> Path:
    """One shard of hand-made samples (webdataset dicts) plus its manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(folder / "shard-000000.tar")) as sink:
        for sample in samples:
            sink.write(sample)
    info = ShardInfo("shard-000000.tar", len(samples), sha256_file(folder / "shard-000000.tar"))
    write_manifest(folder, ShardManifest(split="train", resolution=resolution, shards=(info,)))
    return folder


# ------------------------------------------------------------------------- index, decode


def test_index_points_at_the_tar_members(tiny_shards):
    index = load_index(tiny_shards / "train")
    assert len(index) == 96 and len(set(index.keys)) == 96
    assert load_index(tiny_shards / "train") is index  # built once per process
    dataset = ShardDataset(index, resolution=16)
    members = {}
    for path in index.shard_paths:
        with tarfile.open(path) as tar:
            for m in tar:
                members[m.name] = tar.extractfile(m).read()
    for i in (0, 19, 20, 57, 95):
        key = index.keys[i]
        shard = int(index.shard[i])
        assert dataset._read(shard, index.image[i]) == members[f"{key}.png"]
        assert dataset.caption(i) == members[f"{key}.txt"].decode()


def test_sample_is_rgb_in_range_and_exact_at_stored_resolution(tiny_shards):
    dataset = ShardDataset(load_index(tiny_shards / "train"), resolution=16)
    sample = dataset[3]
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, 16, 16)
    raw = dataset._read(int(dataset.index.shard[3]), dataset.index.image[3])
    pixels = np.array(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.float32)
    expected = torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1
    assert torch.equal(sample["image"], expected)
    assert sample["caption"].startswith("a ") and sample["key"] == dataset.index.keys[3]


def test_resize_and_center_crop_when_stored_resolution_differs(tmp_path, tiny_shards):
    loader = ShardLoader(tiny_shards / "train", batch_size=4, resolution=24)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 24, 24)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    # A 48x16 image of three colour thirds: the centre crop at 16 px is the green third.
    wide = Image.new("RGB", (48, 16), (255, 0, 0))
    wide.paste((0, 255, 0), (16, 0, 32, 16))
    wide.paste((0, 0, 255), (32, 0, 48, 16))
    folder = write_samples(
        tmp_path / "wide", [{"__key__": "w", "png": png_bytes(wide), "txt": "x"}], 16
    )
    image = ShardDataset(load_index(folder), resolution=16)[0]["image"]
    assert torch.equal(image[1], torch.ones(16, 16)) and torch.equal(image[0], -torch.ones(16, 16))
    # Downscaled to 8 px, still green away from the (bicubic) edge columns.
    image = ShardDataset(load_index(folder), resolution=8)[0]["image"][:, :, 1:-1]
    assert (image[1] > 0.99).all() and (image[0] < -0.99).all() and (image[2] < -0.99).all()


def open_descriptors() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


def test_open_shards_are_bounded_and_an_unopenable_shard_is_an_error(
    tmp_path, tiny_shards, monkeypatch
):
    """Issue 15, item 10: one descriptor per shard, for ever, ran out of descriptors on a
    big data set; every later sample then failed to open and was skipped as corrupt."""
    monkeypatch.setattr(dataset_module, "MAX_OPEN_SHARDS", 2)
    dataset = ShardDataset(load_index(tiny_shards / "train"), resolution=16)  # 5 shards
    before = open_descriptors()
    keys = [dataset[i]["key"] for i in range(len(dataset))]  # crosses every shard
    assert len(set(keys)) == 96 and open_descriptors() - before <= 2
    del dataset

    copy = tmp_path / "train"
    shutil.copytree(tiny_shards / "train", copy)
    dataset = ShardDataset(load_index(copy), resolution=16)
    (copy / "shard-000001.tar").unlink()  # e.g. a volume gone, or the limit reached
    with pytest.raises(RuntimeError, match="cannot open shard .*shard-000001.tar"):
        dataset[20]


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    good = png_bytes(Image.new("RGB", (8, 8), (10, 200, 30)))
    samples = [
        {"__key__": "ok0", "png": good, "txt": "a green square"},
        {"__key__": "badpng", "png": b"\x89PNG\r\n\x1a\nnot really", "txt": "broken"},
        {"__key__": "empty", "png": good, "txt": "  "},
        {"__key__": "nocap", "png": good, "json": json.dumps({"other": 1})},
        {"__key__": "ok1", "png": good, "json": json.dumps({"caption": "from json"})},
        {"__key__": "noimg", "txt": "caption without an image"},
    ]
    folder = write_samples(tmp_path / "corrupt", samples, resolution=8)
    for workers in (0, 2):
        loader = ShardLoader(folder, batch_size=6, resolution=8, num_workers=workers)
        batches = iter(loader)
        for _ in range(2):  # two epochs: the same four dropped each time
            batch = next(batches)
            assert sorted(batch["key"]) == ["ok0", "ok1"]
            assert batch["image"].shape == (2, 3, 8, 8)
            assert batch["skipped"] == 4 and len(batch["skipped_keys"]) == 4
            assert dict(zip(batch["key"], batch["caption"]))["ok1"] == "from json"
        assert loader.state_dict()["skipped"] == 8


def test_only_shard_formats_within_the_caps_are_decoded_and_any_failure_is_a_skip(
    tmp_path, monkeypatch
):
    """Issue 15, item 11: any Pillow format was decoded at any size, member sizes were not
    looked at, and a JSON sidecar that is not an object crashed the loader."""
    monkeypatch.setattr(images_module, "MIN_PIXEL_CAP", 0, raising=False)
    good = png_bytes(Image.new("RGB", (8, 8), (10, 200, 30)))
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")
    samples = [
        {"__key__": "ok", "png": good, "txt": "a green square"},
        {"__key__": "tiff", "png": tiff.getvalue(), "txt": "a TIFF named .png"},
        # 129 x 128 px is over the 16 x 8 = 128 px side cap of an 8 px target
        {"__key__": "big", "png": png_bytes(Image.new("RGB", (129, 128))), "txt": "big"},
        {"__key__": "list", "png": good, "json": "[]"},
        {"__key__": "long", "png": good, "txt": "a" * (64 << 10) + "a"},
    ]
    folder = write_samples(tmp_path / "hostile", samples, resolution=8)
    batch = next(iter(ShardLoader(folder, batch_size=5, resolution=8)))
    assert batch["key"] == ["ok"] and batch["skipped"] == 4
    reasons = " ".join(batch["skipped_keys"])
    assert "accepted format" in reasons and "px cap" in reasons and "size cap" in reasons


def test_batch_of_only_corrupt_samples_is_not_yielded_and_its_count_carries(tmp_path):
    good = png_bytes(Image.new("RGB", (8, 8)))
    samples = [{"__key__": f"bad{i}", "png": b"junk", "txt": "x"} for i in range(3)]
    samples.append({"__key__": "good", "png": good, "txt": "black"})
    folder = write_samples(tmp_path / "mostly-bad", samples, resolution=8)
    loader = ShardLoader(folder, batch_size=1, resolution=8, seed=3)
    batches = take_batches(loader, 3)  # one per epoch: the good sample, once each
    assert all(batch["key"] == ["good"] for batch in batches)
    skipped = sum(batch["skipped"] for batch in batches)
    assert skipped >= 6 and skipped == loader.state_dict()["skipped"]  # 3 bad per epoch
    val = list(iter_split(folder, batch_size=2, resolution=8))  # [bad0, bad1], [bad2, good]
    assert [b["key"] for b in val] == [["good"]] and val[0]["skipped"] == 3
    all_bad = write_samples(tmp_path / "all-bad", samples[:3], resolution=8)
    with pytest.raises(RuntimeError, match="corrupt"):
        next(iter(ShardLoader(all_bad, batch_size=2, resolution=8)))


# --------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_no_missing_no_duplicate_same_order(tiny_shards, workers):
    split = tiny_shards / "train"  # 96 samples; 7 per batch: epochs end mid-batch
    reference = take_keys(ShardLoader(split, 7, 16, seed=5, num_workers=workers), 30)
    first = ShardLoader(split, 7, 16, seed=5, num_workers=workers)
    head = take_keys(first, 11)
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints hold it as JSON
    assert state["position"] == 11 * 7  # yielded batches only, not the prefetched ones
    resumed = ShardLoader(split, 7, 16, seed=0, num_workers=workers)
    resumed.load_state_dict(state)
    tail = take_keys(resumed, 19)
    assert head + tail == reference
    stream = [k for batch in reference for k in batch]
    all_keys = sorted(load_index(split).keys)
    assert sorted(stream[:96]) == all_keys and sorted(stream[96:192]) == all_keys
    assert stream[:96] != stream[96:192]  # a fresh shuffle each epoch


def test_two_ranks_resumed_cover_every_sample_once_per_epoch(tiny_shards):
    split = tiny_shards / "train"
    steps, stop = 24, 13  # 24 global steps of 2 x 5 = 240 samples: 2.5 epochs
    per_rank = []
    for rank, workers in ((0, 0), (1, 2)):
        loader = ShardLoader(split, 5, 16, seed=9, rank=rank, world_size=2, num_workers=workers)
        head = take_keys(loader, stop)
        resumed = ShardLoader(split, 5, 16, seed=9, rank=rank, world_size=2)
        resumed.load_state_dict(loader.state_dict())
        per_rank.append(head + take_keys(resumed, steps - stop))
    stream = []
    for step in range(steps):
        union = per_rank[0][step] + per_rank[1][step]
        assert len(set(union)) == 10
        stream += union
    all_keys = sorted(load_index(split).keys)
    for epoch in range(2):
        assert sorted(stream[epoch * 96 : (epoch + 1) * 96]) == all_keys
    # The global stream does not depend on how it is split across ranks.
    single = take_keys(ShardLoader(split, 10, 16, seed=9), steps)
    assert stream == [k for batch in single for k in batch]


def test_resume_does_not_decode_skipped_samples(tiny_shards, monkeypatch):
    calls = []
    decode = dataset_module.decode_image
    monkeypatch.setattr(
        dataset_module, "decode_image", lambda data, res: calls.append(1) or decode(data, res)
    )
    reads = []
    read = ShardDataset._read
    monkeypatch.setattr(
        ShardDataset, "_read", lambda self, *args: reads.append(1) or read(self, *args)
    )
    split = tiny_shards / "train"
    loader = ShardLoader(split, 8, 16, seed=2)
    loader.load_state_dict({"position": 8 * 40, "seed": 2, "num_samples": 96})
    batch = next(iter(loader))
    assert len(calls) == 8 and len(reads) == 16  # one batch: 8 images + 8 captions
    assert loader.state_dict()["position"] == 8 * 41 and loader.state_dict()["epoch"] == 3
    expected = take_keys(ShardLoader(split, 8, 16, seed=2), 41)[-1]
    assert batch["key"] == expected


def test_generic_batches_over_any_map_dataset():
    batches = ResumableBatches(list(range(10)), batch_size=4, seed=1)
    it = iter(batches)
    seen = torch.cat([next(it) for _ in range(5)]).tolist()  # 20 = two epochs exactly
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert batches.state_dict() == {
        "position": 20,
        "seed": 1,
        "epoch": 2,
        "num_samples": 10,
        "weights": "uniform",
    }
    again = ResumableBatches(list(range(10)), batch_size=4, seed=1)
    again.load_state_dict({"position": 8, "seed": 1, "num_samples": 10})
    stale, fresh = iter(again), iter(again)  # a newer iterator (or a load) ends older ones
    assert next(fresh).tolist() == seen[8:12]
    with pytest.raises(StopIteration):
        next(stale)
    assert next(fresh).tolist() == seen[12:16]
    with pytest.raises(ValueError, match="12 samples"):
        again.load_state_dict({"position": 8, "seed": 1, "num_samples": 12})


def test_weighted_draws_follow_the_weights_and_resume_exactly():
    weights = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 4.0])  # sample 4 never, 5 four times as often
    batches = ResumableBatches(list(range(6)), batch_size=3, seed=7, weights=weights)
    it = iter(batches)
    seen = torch.cat([next(it) for _ in range(2000)]).tolist()
    counts = torch.bincount(torch.tensor(seen), minlength=6).double() / len(seen)
    assert counts[4] == 0
    assert torch.allclose(counts, weights.double() / weights.sum(), atol=0.02)
    state = batches.state_dict()
    assert state["weights"] not in ("uniform", None)
    # A resumed cursor yields what the uninterrupted one would have, from any position.
    again = ResumableBatches(list(range(6)), batch_size=3, seed=7, weights=weights)
    again.load_state_dict({**state, "position": 3 * 500})
    assert next(iter(again)).tolist() == seen[1500:1503]
    # Other weights (or none) would be another stream: the saved position is refused.
    for other in (None, torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 4.0])):
        moved = ResumableBatches(list(range(6)), batch_size=3, seed=7, weights=other)
        with pytest.raises(ValueError, match="sampling weights"):
            moved.load_state_dict(state)
    with pytest.raises(ValueError, match="finite"):
        ResumableBatches(list(range(3)), batch_size=2, weights=torch.tensor([0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="weights"):
        ResumableBatches(list(range(3)), batch_size=2, weights=torch.ones(4))


# ----------------------------------------------------------------------- validation, config


def test_val_pass_covers_the_split_once_across_ranks(tiny_shards):
    split = tiny_shards / "val"  # 32 samples
    keys = list(load_index(split).keys)
    per_rank = []
    for rank in range(3):
        batches = list(iter_split(split, 5, 16, rank=rank, world_size=3, num_workers=rank % 2 * 2))
        assert all(b["image"].shape[1:] == (3, 16, 16) for b in batches)
        per_rank.append([k for b in batches for k in b["key"]])
    assert [len(r) for r in per_rank] == [11, 11, 10]
    assert per_rank[0] + per_rank[1] + per_rank[2] == keys  # ordered, no duplicate, complete
    assert [k for b in iter_split(split, 64, 16) for k in b["key"]] == keys


def test_from_config(tiny_shards):
    cfg = DataConfig(path=str(tiny_shards), resolution=8, batch_size=3)
    batch = next(iter(ShardLoader.from_config(cfg, split="val", seed=1, rank=1, world_size=2)))
    assert batch["image"].shape == (3, 3, 8, 8)


def test_clear_errors(tmp_path, tiny_shards):
    with pytest.raises(ManifestError, match="does not exist.*preprocess"):
        ShardLoader(tmp_path / "nowhere", 4, 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no manifest.json.*preprocess"):
        ShardLoader(tmp_path / "empty", 4, 16)
    copy = Path(shutil.copytree(tiny_shards / "val", tmp_path / "val"))
    with pytest.raises(ValueError, match="resolution"):
        ShardLoader(copy, 4, 0)
    (copy / "shard-000001.tar").unlink()
    with pytest.raises(ManifestError, match="shard-000001.tar, which is missing"):
        ShardLoader(copy, 4, 16)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:1]
    manifest["shards"][0]["samples"] = 19
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="holds 20 samples but manifest.json says 19"):
        ShardLoader(copy, 4, 16)
    with pytest.raises(ValueError, match="rank 2"):
        ShardLoader(tiny_shards / "val", 4, 16, rank=2, world_size=2)
