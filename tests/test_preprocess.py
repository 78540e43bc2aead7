"""Preprocessing: every source to shards, skips per reason, manifests, atomic re-runs, the
image maths, and the emoji builder on hand-made npm tarballs."""

from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from preprocess import emoji_captions, npm
from preprocess import image as image_module
from preprocess import sources as sources_module
from preprocess.__main__ import main
from preprocess.build import BuildConfig, DatasetInfo, build_shards
from preprocess.emoji import build_emoji
from preprocess.image import Job, process_image, process_job
from preprocess.plan import split_of
from preprocess.sources import folder_samples, parquet_samples, table_samples, wds_samples
from stages.common.shards import read_manifest

INFO = DatasetInfo(source="test", licence="CC0", attribution="made by the tests")


def png(colour=(200, 30, 30), size=(12, 12), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def jpg(colour=(30, 30, 200), size=(16, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


CORRUPT = png()[:40]  # a truncated PNG: header fine, pixel data missing


def config(**changes) -> BuildConfig:
    base = dict(resolutions=(8,), val_fraction=0.0, shard_size=2, workers=0)
    return BuildConfig(**{**base, **changes})


def read_split(folder: Path) -> dict[str, dict]:
    """key -> {"txt", "json", "image" (PIL)} over every shard the manifest lists."""
    manifest = read_manifest(folder, verify=True)
    samples: dict[str, dict] = {}
    for shard in manifest.shards:
        with tarfile.open(folder / shard.name) as tar:
            count = 0
            for member in tar:
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                entry = samples.setdefault(key, {})
                if ext == "txt":
                    entry["txt"] = data.decode()
                    count += 1
                elif ext == "json":
                    entry["json"] = json.loads(data)
                else:
                    entry["image"] = Image.open(io.BytesIO(data))
                    entry["ext"] = ext
            assert count == shard.samples
    return samples


def skipped(out: Path) -> Counter:
    counts = Counter()
    for split in ("train", "val"):
        counts.update(read_manifest(out / split).extra["skipped"])
    return counts


def all_samples(out: Path) -> dict[str, dict]:
    return {**read_split(out / "train"), **read_split(out / "val")}


# --------------------------------------------------------------------------- image maths


def test_alpha_on_white_and_centre_crop_of_a_landscape_image():
    # 100x20: red | half-transparent green | blue; the centre square (x 40..60) and the
    # LANCZOS support around it (3 source pixels per output pixel each side) are all green.
    rgba = np.zeros((20, 100, 4), np.uint8)
    rgba[:, :20] = (255, 0, 0, 255)
    rgba[:, 20:80] = (0, 255, 0, 128)
    rgba[:, 80:] = (0, 0, 255, 255)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    images, size = process_image(buffer.getvalue(), "raster", [10, 4], "png")
    assert size == (100, 20)
    for side in (10, 4):
        image = Image.open(io.BytesIO(images[side]))
        assert image.mode == "RGB" and image.size == (side, side)
        pixels = np.asarray(image).astype(int)
        # green at alpha 0.5 over white: (127, 255, 127); no red or blue survives the crop
        assert np.abs(pixels - [127, 255, 127]).max() <= 3


def test_portrait_crop_is_centred_and_palette_transparency_goes_white():
    portrait = np.zeros((30, 10, 3), np.uint8)
    portrait[:10] = (255, 0, 0)
    portrait[10:20] = (0, 0, 0)
    portrait[20:] = (0, 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(portrait).save(buffer, format="PNG")
    images, _ = process_image(buffer.getvalue(), "raster", [5], "jpg")
    assert np.asarray(Image.open(io.BytesIO(images[5]))).max() < 40  # only the black middle

    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0] * 256)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)
    images, _ = process_image(buffer.getvalue(), "raster", [4], "png")
    assert np.asarray(Image.open(io.BytesIO(images[4]))).min() == 255  # transparent -> white


def test_svg_is_rendered_on_white_with_its_shorter_side_at_the_target():
    # a 200x100 drawing: red | green | blue; then the same with a transparent green band
    wide = (
        b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 200 100">'
        b'<rect width="40" height="100" fill="#f00"/><rect x="40" width="120" height="100"'
        b' fill="#0f0"/><rect x="160" width="40" height="100" fill="#00f"/></svg>'
    )
    wide_hole = wide.replace(b'fill="#0f0"/>', b'fill="#0f0" fill-opacity="0"/>')
    images, size = process_image(wide, "svg", [8], "png")
    assert size == (256, 128)  # rendered at the 128 px floor on its shorter side
    centre = np.asarray(Image.open(io.BytesIO(images[8])))
    assert centre.shape == (8, 8, 3) and centre[4, 4].tolist() == [0, 255, 0]
    images, _ = process_image(wide_hole, "svg", [8], "png")
    assert np.asarray(Image.open(io.BytesIO(images[8])))[4, 4].tolist() == [255, 255, 255]


def test_corrupt_and_truncated_images_are_reported_not_raised():
    for data in (CORRUPT, b"not an image at all", b""):
        result = process_job(Job(0, data, "raster", (8,), "png"))
        assert result.images is None and result.reason == "corrupt_image"
    bad_svg = process_job(Job(1, b"<svg", "svg", (8,), "png"))
    assert bad_svg.reason == "corrupt_image"


def test_formats_outside_the_allow_list_big_images_and_decoder_crashes_are_skips(
    tmp_path, monkeypatch
):
    """Issue 15, item 11: Pillow tried every plugin (EPS goes to Ghostscript), decoded any
    size, and an exception other than OSError/ValueError/SyntaxError aborted the build (and
    its re-run, on the same file). Each is now one sample's skip reason; an oversized tar
    member is skipped unread."""
    eps = io.BytesIO()
    Image.new("RGB", (8, 8)).save(eps, format="EPS")
    result = process_job(Job(0, eps.getvalue(), "raster", (8,), "png"))
    assert result.images is None and result.reason == "corrupt_image"
    assert "accepted format" in result.error

    monkeypatch.setattr(image_module, "pixel_cap", lambda side: 100, raising=False)
    result = process_job(Job(1, png(size=(11, 10)), "raster", (8,), "png"))
    assert result.images is None and result.reason == "oversized_image"
    monkeypatch.undo()

    def crash(image):
        raise RuntimeError("a decoder bug")

    monkeypatch.setattr(image_module, "flatten_on_white", crash)
    result = process_job(Job(2, png(), "raster", (8,), "png"))
    assert result.images is None and result.reason == "corrupt_image"
    assert "a decoder bug" in result.error
    monkeypatch.undo()

    monkeypatch.setattr(sources_module, "MAX_MEMBER_BYTES", 1000, raising=False)
    write_tar(
        tmp_path / "00000.tar",
        [
            {"__key__": "big", "png": png(), "txt": b"x" * 1001},
            {"__key__": "small", "png": png(), "txt": b"kept"},
        ],
    )
    got = {s.key: s for s in wds_samples(tmp_path / "00000.tar")}
    assert got["big"].skip == "oversized_member" and got["small"].caption == "kept"


def test_split_by_key_hash_is_stable_and_close_to_the_fraction():
    keys = [f"sample-{i}" for i in range(4000)]
    first = [split_of(k, 0.1) for k in keys]
    assert first == [split_of(k, 0.1) for k in keys]
    assert 0.08 < first.count("val") / len(keys) < 0.12
    assert all(split_of(k, 0.0) == "train" for k in keys)
    # a bigger fraction only moves keys from train to val
    assert all(split_of(k, 0.3) == "val" for k, s in zip(keys, first) if s == "val")


# ------------------------------------------------------------------------------ sources


def make_folder(root: Path) -> Path:
    root.mkdir()
    (root / "sub").mkdir()
    files = {
        "a.png": png((250, 0, 0)),
        "a.txt": "a red square",
        "b.jpg": jpg(),
        "b.json": json.dumps({"caption": "a  blue\nrectangle", "other": 1}),
        "c.png": png((0, 250, 0)),
        "c.txt": "   ",
        "d.png": png((0, 0, 250)),  # no sidecar
        "e.png": CORRUPT,
        "e.txt": "a broken file",
        "f.png": png((250, 0, 0)),  # same bytes as a.png
        "f.txt": "a copy",
        "sub/g.png": png((10, 10, 10), mode="RGB", size=(9, 30)),
        "sub/g.txt": "a dark bar",
        "notes.md": "not an image",
    }
    for name, content in files.items():
        path = root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


def test_folder_source_to_shards_counts_every_skip(tmp_path):
    source = make_folder(tmp_path / "photos")
    out = tmp_path / "out"
    report = build_shards(lambda: folder_samples(source), {8: out}, config(val_fraction=0.3), INFO)
    samples = all_samples(out)
    assert set(samples) == {"a", "b", "sub_g"}
    assert samples["b"]["txt"] == "a blue rectangle"  # whitespace collapsed
    assert samples["a"]["image"].size == (8, 8) and samples["a"]["ext"] == "png"
    meta = samples["sub_g"]["json"]
    assert meta["original_width"] == 9 and meta["original_height"] == 30
    assert meta["caption"] == "a dark bar" and meta["source_path"] == "sub/g.png"
    assert skipped(out) == {
        "empty_caption": 1,
        "missing_caption": 1,
        "corrupt_image": 1,
        "duplicate_image": 1,
    }
    assert sum(r.samples for r in report.splits.values()) == 3
    manifest = read_manifest(out / "train")
    assert (manifest.licence, manifest.attribution, manifest.resolution) == (
        "CC0",
        "made by the tests",
        8,
    )
    assert "corrupt_image" in report.table() and "samples" in report.table()


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_jsonl_and_csv_manifests(tmp_path, fmt):
    (tmp_path / "img").mkdir()
    for name, data in {"one.png": png((1, 2, 3)), "two.jpg": jpg(), "bad.png": CORRUPT}.items():
        (tmp_path / "img" / name).write_bytes(data)
    rows = [
        {"file": "img/one.png", "text": "first"},
        {"file": "img/two.jpg", "text": "second"},
        {"file": "img/one.png", "text": "first again"},  # same key
        {"file": "img/missing.png", "text": "gone"},
        {"file": "img/bad.png", "text": "broken"},
        {"file": "img/two.jpg", "text": ""},  # same key, and empty
    ]
    path = tmp_path / f"list.{fmt}"
    if fmt == "jsonl":
        lines = [json.dumps(r) for r in rows] + ["{not json"]
        path.write_text("\n".join(lines) + "\n")
    else:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file", "text"])
            writer.writeheader()
            writer.writerows(rows)
    out = tmp_path / "out"
    samples = lambda: table_samples(path, fmt, "file", "text")  # noqa: E731
    build_shards(samples, {8: out}, config(), INFO)
    got = all_samples(out)
    assert {k: v["txt"] for k, v in got.items()} == {"img_one": "first", "img_two": "second"}
    expected = {"duplicate_key": 2, "missing_image": 1, "corrupt_image": 1}
    if fmt == "jsonl":
        expected["bad_record"] = 1
    assert skipped(out) == expected


def test_parquet_in_the_hugging_face_layout(tmp_path):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    (tmp_path / "side.png").write_bytes(png((9, 9, 9)))
    images = [
        {"bytes": png((250, 0, 0)), "path": "r.png"},
        {"bytes": jpg(), "path": None},
        {"bytes": CORRUPT, "path": "x.png"},
        {"bytes": png((0, 250, 0)), "path": None},
        None,
        {"bytes": png((250, 0, 0)), "path": "again.png"},
        {"bytes": None, "path": "side.png"},  # bytes stored next to the file
    ]
    texts = ["a red one", "a blue one", "broken", "", "no image", "duplicate", "from a path"]
    table = pa.table({"image": pa.array(images, type=image_type), "text": texts})
    pq.write_table(table, tmp_path / "train-00000.parquet", row_group_size=3)
    out = tmp_path / "out"
    source = lambda: parquet_samples(tmp_path, batch_rows=2)  # noqa: E731
    build_shards(source, {8: out}, config(), INFO)
    got = all_samples(out)
    assert sorted(v["txt"] for v in got.values()) == ["a blue one", "a red one", "from a path"]
    assert "train-00000-00000000" in got  # key: file stem and row
    assert skipped(out) == {
        "corrupt_image": 1,
        "empty_caption": 1,
        "missing_image": 1,
        "duplicate_image": 1,
    }
    with pytest.raises(ValueError, match="no column 'caption'"):
        list(parquet_samples(tmp_path, caption_column="caption"))


def write_tar(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write(sample)


def test_webdataset_shards_are_resharded_and_resized(tmp_path):
    source = tmp_path / "img2dataset"
    source.mkdir()
    meta = lambda caption: json.dumps({"caption": caption, "url": "http://x"}).encode()  # noqa: E731
    write_tar(
        source / "00000.tar",
        [
            {"__key__": "000000000", "jpg": jpg(size=(40, 20)), "txt": b"wide", "json": meta("w")},
            {"__key__": "000000001", "png": png(), "json": meta("caption in json")},
            {"__key__": "000000002", "jpg": CORRUPT, "txt": b"broken"},
            {"__key__": "000000003", "txt": b"no image"},
        ],
    )
    write_tar(source / "00001.tar", [{"__key__": "000000004", "webp": b"", "txt": b"empty"}])
    good = io.BytesIO()
    with wds.TarWriter(good, encoder=False) as sink:
        sink.write({"__key__": "000000005", "png": png((0, 9, 0)), "txt": b"kept"})
        sink.write({"__key__": "000000006", "png": png((0, 0, 9)), "txt": b"lost"})
    with tarfile.open(fileobj=io.BytesIO(good.getvalue())) as tar:
        cut = tar.getmember("000000006.png").offset_data + 10
    (source / "00002.tar").write_bytes(good.getvalue()[:cut])  # truncated inside sample 6
    out = tmp_path / "out"
    build_shards(lambda: wds_samples(source), {8: out}, config(image_format="webp"), INFO)
    got = all_samples(out)
    assert {k: v["txt"] for k, v in got.items()} == {
        "000000000": "wide",
        "000000001": "caption in json",
        "000000005": "kept",
    }
    assert got["000000000"]["ext"] == "webp" and got["000000000"]["image"].size == (8, 8)
    assert got["000000000"]["json"]["url"] == "http://x"
    assert skipped(out) == {"corrupt_image": 1, "missing_image": 2, "unreadable_shard": 1}


# ------------------------------------------------------- manifests, atomicity, re-runs


def make_pngs(root: Path, count: int) -> Path:
    root.mkdir()
    for i in range(count):
        (root / f"{i:03d}.png").write_bytes(png((i * 9 % 256, 40, 200 - i)))
        (root / f"{i:03d}.txt").write_text(f"sample {i}")
    return root


def test_rerun_skips_finished_shards_and_rebuilds_identical_bytes(tmp_path):
    source = make_pngs(tmp_path / "src", 11)
    out = tmp_path / "out"
    cfg = config(val_fraction=0.25, shard_size=3)
    first = build_shards(lambda: folder_samples(source), {8: out}, cfg, INFO)
    train = read_manifest(out / "train", verify=True)
    val = read_manifest(out / "val", verify=True)
    assert train.num_samples + val.num_samples == 11 and val.num_samples > 0
    assert [s.samples for s in train.shards][:-1] == [3] * (len(train.shards) - 1)
    assert first.shards_written == len(train.shards) + len(val.shards)

    again = build_shards(lambda: folder_samples(source), {8: out}, cfg, INFO)
    assert again.shards_written == 0 and again.shards_reused == first.shards_written

    # a lost shard, a damaged one, and a temporary file left by a killed run
    (out / "train" / "shard-000000.tar").unlink()
    (out / "train" / "shard-000001.tar").write_bytes(b"damaged")
    (out / "train" / ".shard-000002.tar.tmp").write_bytes(b"half")
    third = build_shards(lambda: folder_samples(source), {8: out}, cfg, INFO)
    assert third.shards_written == 2
    assert read_manifest(out / "train", verify=True) == train  # the same bytes again
    assert not list((out / "train").glob(".*.tmp"))

    other = tmp_path / "other"
    build_shards(lambda: folder_samples(source), {8: other}, cfg, INFO)
    assert read_manifest(other / "train").shards == train.shards  # deterministic


def test_interrupted_build_never_leaves_a_half_shard_under_its_final_name(tmp_path):
    source = make_pngs(tmp_path / "src", 10)
    out = tmp_path / "out"
    cfg = config(shard_size=4)
    calls = []

    def failing():
        calls.append(1)
        for i, sample in enumerate(folder_samples(source)):
            if len(calls) == 2 and i == 6:  # second pass: die inside the second shard
                raise KeyboardInterrupt
            yield sample

    with pytest.raises(KeyboardInterrupt):
        build_shards(failing, {8: out}, cfg, INFO)
    folder = out / "train"
    assert sorted(p.name for p in folder.iterdir()) == [".progress.json", "shard-000000.tar"]
    with tarfile.open(folder / "shard-000000.tar") as tar:
        assert len(tar.getnames()) == 3 * 4  # complete: 4 samples x (png, txt, json)

    resumed = build_shards(lambda: folder_samples(source), {8: out}, cfg, INFO)
    assert (resumed.shards_reused, resumed.shards_written) == (1, 2)
    assert read_manifest(folder, verify=True).num_samples == 10


def test_several_resolutions_with_worker_processes(tmp_path):
    source = make_pngs(tmp_path / "src", 6)
    outputs = {16: tmp_path / "x16", 4: tmp_path / "x4"}
    cfg = config(resolutions=(16, 4), shard_size=4, workers=2)
    build_shards(lambda: folder_samples(source), outputs, cfg, INFO)
    for side, folder in outputs.items():
        samples = all_samples(folder)
        assert len(samples) == 6
        assert {s["image"].size for s in samples.values()} == {(side, side)}
        assert read_manifest(folder / "train").resolution == side


KILLER = png((1, 2, 3), size=(13, 7))  # the one file whose decode kills its worker process


def decode_or_die(job: Job):
    """``process_job``, except that ``KILLER`` kills the worker like the OOM killer would."""
    import multiprocessing
    import os
    import signal

    if job.data == KILLER and multiprocessing.parent_process() is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    return process_job(job)


def test_a_killed_decode_worker_skips_its_sample_and_the_build_goes_on(tmp_path, monkeypatch):
    import preprocess.build as build_module

    source = make_pngs(tmp_path / "src", 6)
    (source / "003.png").write_bytes(KILLER)
    monkeypatch.setattr(build_module, "process_job", decode_or_die)
    cfg = config(shard_size=4, workers=2)
    for _ in range(2):  # the re-run must not die on the same file either
        out = tmp_path / "out"
        report = build_shards(lambda: folder_samples(source), {8: out}, cfg, INFO)
        assert report.splits["train"].skipped == Counter(decoder_crashed=1)
        assert sorted(all_samples(out)) == ["000", "001", "002", "004", "005"]
        shutil.rmtree(out)


def test_cli_builds_and_reports(tmp_path, capsys):
    source = make_folder(tmp_path / "photos")
    out = tmp_path / "mine-{res}"
    args = ["folder", str(source), "--out", str(out), "--resolutions", "8", "4", "--workers", "0"]
    assert main([*args, "--licence", "CC0", "--val-fraction", "0.2"]) == 0
    printed = capsys.readouterr().out
    assert "duplicate_image" in printed and "samples" in printed
    assert read_manifest(tmp_path / "mine-4" / "train").licence == "CC0"
    assert (
        main(["folder", str(source), "--out", str(tmp_path / "x"), "--resolutions", "8", "4"]) == 2
    )
    assert "{res}" in capsys.readouterr().err


# ------------------------------------------------------------------------------- emoji


def svg(colour: str, shape: str = "circle") -> bytes:
    body = (
        f'<circle cx="36" cy="36" r="30" fill="{colour}"/>'
        if shape == "circle"
        else f'<rect x="6" y="6" width="60" height="60" fill="{colour}"/>'
    )
    return f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72">{body}</svg>'.encode()


def entry(hexcode, annotation, tags="", openmoji_tags="", base=""):
    return {
        "emoji": "".join(chr(int(h, 16)) for h in hexcode.split("-")),
        "hexcode": hexcode,
        "group": "smileys-emotion",
        "subgroups": "face",
        "annotation": annotation,
        "tags": tags,
        "openmoji_tags": openmoji_tags,
        "openmoji_author": "Test Author",
        "skintone": "1" if base else "",
        "skintone_base_hexcode": base,
    }


def make_tgz(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def fake_npm_tarballs(folder: Path) -> tuple[Path, Path]:
    entries = [
        entry("1F600", "grinning face", "face, grin, happy, smile", "smile, happy, cheerful"),
        entry("1F44B", "waving hand", "hand, wave, hello, waving", "hello, goodbye"),
        entry("1F44B-1F3FB", "waving hand: light skin tone", base="1F44B"),
        entry("2764-FE0F", "red heart", "heart, love", "love"),
        entry("E000", "an extra without artwork", "extra"),
    ]
    om = {"package/data/openmoji.json": json.dumps(entries).encode()}
    for hexcode, colour in [("1F600", "#fcea2b"), ("1F44B", "#fadcbc"), ("1F44B-1F3FB", "#f0c8a0")]:
        om[f"package/color/svg/{hexcode}.svg"] = svg(colour)
        om[f"package/black/svg/{hexcode}.svg"] = svg("#000000", "rect")  # all the same lines
    om["package/color/svg/2764-FE0F.svg"] = svg("#ea5a47")
    om["package/black/svg/2764-FE0F.svg"] = svg("#000000")
    tw = {
        "package/license": b"MIT",
        "package/1f600.svg": svg("#ffcc4d"),
        "package/2764.svg": svg("#dd2e44", "rect"),  # file names omit FE0F
        "package/e50a.svg": svg("#123456"),  # not a Unicode emoji: no name
    }
    return make_tgz(folder / "openmoji-17.0.0.tgz", om), make_tgz(folder / "tw.tgz", tw)


def test_emoji_builder_on_handmade_npm_tarballs(tmp_path):
    openmoji, twemoji = fake_npm_tarballs(tmp_path)
    cfg = config(resolutions=(16, 8), val_fraction=0.3, shard_size=4)
    report = build_emoji(tmp_path / "data", cfg, openmoji_tgz=openmoji, twemoji_tgz=twemoji)
    root = tmp_path / "data"
    small, big = all_samples(root / "emoji-8"), all_samples(root / "emoji-16")
    assert set(small) == set(big)
    captions = {k: v["txt"] for k, v in big.items()}
    assert captions == {
        "openmoji-color-1F600": "grinning face, smile, happy, cheerful; outlined colour emoji",
        "openmoji-color-1F44B": "waving hand, hello, goodbye, wave; outlined colour emoji",
        "openmoji-color-1F44B-1F3FB": (
            "waving hand, light skin tone, hello, goodbye, wave; outlined colour emoji"
        ),
        "openmoji-color-2764-FE0F": "red heart, love; outlined colour emoji",
        "openmoji-black-1F600": "grinning face, smile, happy, cheerful; black line-art emoji",
        "openmoji-black-2764-FE0F": "red heart, love; black line-art emoji",
        "twemoji-1f600": "grinning face, smile, happy, cheerful; flat colour emoji",
        "twemoji-2764": "red heart, love; flat colour emoji",
    }
    assert skipped(root / "emoji-16") == {"missing_svg": 2, "duplicate_image": 2, "no_name": 1}
    assert sum((s.groups for s in report.splits.values()), Counter()) == {
        "openmoji-color": 4,
        "openmoji-black": 2,
        "twemoji": 2,
    }
    # rendered on white: white corners, the heart's red in the middle
    heart = np.asarray(big["twemoji-2764"]["image"]).astype(int)
    assert heart[8, 8].tolist() == [0xDD, 0x2E, 0x44]
    circle = np.asarray(big["openmoji-color-1F600"]["image"])
    assert circle[0, 0].tolist() == [255, 255, 255]
    # one emoji, one split, whatever its style
    split_of_key = {}
    for split in ("train", "val"):
        for sample in read_split(root / "emoji-16" / split).values():
            codepoints = sample["json"]["codepoints"]
            assert split_of_key.setdefault(codepoints, split) == split
    manifest = read_manifest(root / "emoji-8" / "train")
    assert "CC BY-SA 4.0" in manifest.licence and "OpenMoji" in manifest.attribution
    assert "CC-BY 4.0" in (root / "emoji-8" / "ATTRIBUTION.md").read_text()


def test_emoji_names_read_like_cldr_annotations():
    assert emoji_captions.package_name_as_cldr("woman_dark_skin_tone_blond_hair", (0x1F469,)) == (
        "woman, dark skin tone, blond hair"
    )
    assert emoji_captions.package_name_as_cldr("Germany", (0x1F1E9, 0x1F1EA)) == "flag, germany"
    assert emoji_captions.clean_phrase("flag: Germany") == "flag, germany"
    assert emoji_captions.codepoints("0023-FE0F-20E3") == emoji_captions.codepoints("23-20e3")
    tags = ["Happy", "happy", "cz", "face", "smile", "grin", "joy"]
    assert emoji_captions.caption("Grinning face", tags, "openmoji-black") == (
        "grinning face, happy, smile, grin; black line-art emoji"
    )


def test_npm_cache_is_reused_and_a_broken_tarball_is_fetched_again(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    make_tgz(cache / "openmoji-17.0.0.tgz", {"package/a": b"x"})
    (cache / "twemoji-svg-15.0.0.tgz").write_bytes(b"half a download")
    packed = []

    def fake_pack(spec: str, destination: Path) -> Path:
        packed.append(spec)
        return make_tgz(destination / npm.tarball_name(spec), {"package/b": b"y"})

    monkeypatch.setattr(npm, "_npm_pack", fake_pack)
    paths = npm.fetch_npm_packages(["openmoji@17.0.0", "@twemoji/svg@15.0.0"], cache)
    assert packed == ["@twemoji/svg@15.0.0"]
    assert [p.name for p in paths] == ["openmoji-17.0.0.tgz", "twemoji-svg-15.0.0.tgz"]
    assert all(npm.tarball_unpacks(p) for p in paths)
    assert sorted(p.name for p in cache.iterdir()) == [p.name for p in paths]
