"""Readers for one's own data: each turns a source into a deterministic stream of RawSamples.

- ``folder_samples``: images with a caption sidecar (``photo.txt``, or ``photo.json`` with a
  caption field), found recursively, in sorted path order;
- ``table_samples``: a JSONL or CSV manifest of image path (relative to the manifest) and
  caption;
- ``parquet_samples``: image bytes and a text column, the Hugging Face layout (an ``image``
  struct of ``bytes`` and ``path``, a ``text`` column), read in row batches with pyarrow;
- ``wds_samples``: webdataset / img2dataset tars (``{key}.jpg``, ``{key}.txt``,
  ``{key}.json``), streamed with tarfile; a truncated tar keeps what was read before the
  damage and counts itself as ``unreadable_shard``.

Readers do not judge captions or pixels (the build does); a record that cannot be parsed or
an image file that cannot be read is yielded with its skip reason so that it is counted.
"""

from __future__ import annotations

import csv
import json
import re
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from .sample import (
    BAD_RECORD,
    MISSING_IMAGE,
    OVERSIZED_MEMBER,
    RawSample,
    make_key,
    normalize_caption,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
UNREADABLE_SHARD = "unreadable_shard"


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _caption_text(value: Any) -> str | None:
    return None if value is None else normalize_caption(str(value))


def _sample(key: str, caption: Any, data: bytes | None, group: str, **meta: Any) -> RawSample:
    skip = None if data else MISSING_IMAGE
    return RawSample(key, _caption_text(caption), data, meta=meta, group=group, skip=skip)


# ------------------------------------------------------------------------------- folder


def _sidecar_caption(image: Path, caption_field: str) -> tuple[str | None, str | None]:
    """(caption, skip reason) from ``<stem>.txt`` or ``<stem>.json``."""
    txt, meta = image.with_suffix(".txt"), image.with_suffix(".json")
    if txt.exists():
        return txt.read_text(encoding="utf-8", errors="replace"), None
    if meta.exists():
        try:
            record = json.loads(meta.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            return None, BAD_RECORD
        return (record.get(caption_field) if isinstance(record, dict) else None), None
    return None, None


def folder_samples(root: Path, caption_field: str = "caption") -> Iterator[RawSample]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for path in images:
        relative = path.relative_to(root).as_posix()
        caption, reason = _sidecar_caption(path, caption_field)
        data = _read_bytes(path)
        yield RawSample(
            make_key(relative.rsplit(".", 1)[0]),
            _caption_text(caption),
            data,
            meta={"source_path": relative},
            group="folder",
            skip=reason or (None if data else MISSING_IMAGE),
        )


# ------------------------------------------------------------------------ JSONL and CSV


def _records(path: Path, fmt: Literal["jsonl", "csv"]) -> Iterator[tuple[int, Any]]:
    """(line number, record or None when unparseable)."""
    with open(path, encoding="utf-8", newline="") as f:
        if fmt == "csv":
            for number, record in enumerate(csv.DictReader(f), start=2):
                yield number, record
            return
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except ValueError:
                yield number, None


def table_samples(
    path: Path,
    fmt: Literal["jsonl", "csv"],
    image_column: str = "image",
    caption_column: str = "caption",
    key_column: str | None = None,
) -> Iterator[RawSample]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file")
    for number, record in _records(path, fmt):
        if not isinstance(record, dict):
            yield RawSample(make_key(f"{path.stem}-line{number}"), None, None, skip=BAD_RECORD)
            continue
        image_ref = record.get(image_column)
        name = record.get(key_column) if key_column else image_ref
        if name is None or name == "":
            name = f"{path.stem}-line{number}"
        key = make_key(str(name).rsplit(".", 1)[0] if not key_column else str(name))
        data = _read_bytes(path.parent / str(image_ref)) if image_ref else None
        yield _sample(key, record.get(caption_column), data, fmt, source_path=str(image_ref))


# ------------------------------------------------------------------------------ Parquet


def _image_bytes(value: Any, base: Path) -> bytes | None:
    """A Parquet image cell: raw bytes, a path, or a {"bytes", "path"} struct."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, str) and value:
        return _read_bytes(base / value)
    return None


def parquet_samples(
    path: Path,
    image_column: str = "image",
    caption_column: str = "text",
    key_column: str | None = None,
    batch_rows: int = 64,
) -> Iterator[RawSample]:
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no .parquet file at {path}")
    for file in files:
        try:
            parquet = pq.ParquetFile(file)
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"{file} is not a readable Parquet file: {err}") from err
        columns = [image_column, caption_column] + ([key_column] if key_column else [])
        missing = [c for c in columns if c not in parquet.schema_arrow.names]
        if missing:
            raise ValueError(
                f"{file}: no column {missing[0]!r} (columns: {', '.join(parquet.schema_arrow.names)})"
            )
        row = 0
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
            images = batch.column(image_column).to_pylist()
            captions = batch.column(caption_column).to_pylist()
            keys = batch.column(key_column).to_pylist() if key_column else [None] * len(images)
            for image, caption, name in zip(images, captions, keys):
                key = make_key(str(name) if name is not None else f"{file.stem}-{row:08d}")
                data = _image_bytes(image, file.parent)
                yield _sample(key, caption, data, "parquet", source_file=file.name, row=row)
                row += 1


# ---------------------------------------------------------------------- webdataset tars


def _split_name(name: str) -> tuple[str, str] | None:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    match = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", name)
    return (match.group(1), match.group(2).lower()) if match else None


MAX_MEMBER_BYTES = 64 << 20  # a larger tar member is skipped unread (oversized_member)


def _tar_groups(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(key, {ext: bytes}) per sample; a member over ``MAX_MEMBER_BYTES`` maps to None."""
    key, files = None, {}
    for member in tar:
        parts = _split_name(member.name) if member.isfile() else None
        if parts is None:
            continue
        if parts[0] != key and files:
            yield key, files
            files = {}
        key = parts[0]
        too_big = member.size > MAX_MEMBER_BYTES
        files[parts[1]] = None if too_big else tar.extractfile(member).read()
    if files:
        yield key, files


def _tar_sample(
    tar_name: str, source_key: str, files: dict[str, bytes | None], caption_field: str
) -> RawSample:
    if any(data is None for data in files.values()):
        return RawSample(make_key(source_key), None, None, skip=OVERSIZED_MEMBER)
    meta: dict[str, Any] = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except ValueError:
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
    if "txt" in files:
        caption = files["txt"].decode("utf-8", errors="replace")
    else:
        caption = meta.get(caption_field)
    data = next((files[e] for e in TAR_IMAGE_EXTENSIONS if e in files), None)
    extra = {"url": meta["url"]} if isinstance(meta.get("url"), str) else {}
    return _sample(make_key(source_key), caption, data, "wds", source_shard=tar_name, **extra)


def wds_samples(path: Path, caption_field: str = "caption") -> Iterator[RawSample]:
    path = Path(path)
    suffixes = (".tar", ".tar.gz", ".tgz")
    tars = (
        [path]
        if path.is_file()
        else sorted(
            p for p in path.rglob("*") if p.name.endswith(suffixes) and not p.name.startswith(".")
        )
    )
    if not tars:
        raise FileNotFoundError(f"no .tar shard at {path}")
    for tar_path in tars:
        name = tar_path.relative_to(path).as_posix() if path.is_dir() else tar_path.name
        try:
            with tarfile.open(tar_path, "r|*") as tar:
                for source_key, files in _tar_groups(tar):
                    yield _tar_sample(name, source_key, files, caption_field)
        except (tarfile.TarError, OSError, EOFError, zlib.error):
            yield RawSample(make_key(f"{name}-unreadable"), None, None, skip=UNREADABLE_SHARD)
