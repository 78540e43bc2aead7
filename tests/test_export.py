"""Export folders: atomic, hashed over files and info, refused when edited or mismatched."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from stages.common.export import ExportError, check_upstream, read_export, write_export


@dataclass(frozen=True)
class _Config:
    width: int = 4


def _write(folder, info):
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    return write_export(folder, "vae", weights, _Config(), info=info)


def test_hash_covers_info_and_edited_manifest_is_refused(tmp_path):
    first = _write(tmp_path / "a", {"latent_mean": [0.0]})
    second = _write(tmp_path / "b", {"latent_mean": [0.5]})
    assert first != second  # same weights, other latent statistics: another export
    assert read_export(tmp_path / "a", "vae")["hash"] == first

    path = tmp_path / "a" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["info"]["latent_mean"] = [0.5]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="does not match"):
        read_export(tmp_path / "a", "vae")


def test_rewrite_replaces_atomically_and_wrong_stage_is_refused(tmp_path):
    _write(tmp_path / "e", {"x": 1})
    again = _write(tmp_path / "e", {"x": 2})
    assert read_export(tmp_path / "e", "vae")["hash"] == again
    assert not list(tmp_path.glob(".e.*"))  # no temporary folder left behind
    with pytest.raises(ExportError, match="not a clip export"):
        read_export(tmp_path / "e", "clip")


def test_upstream_mismatch_names_both_hashes(tmp_path):
    manifest = {"stage": "unet", "upstream": {"vae": "aaa"}}
    check_upstream(manifest, "vae", "aaa", tmp_path)
    with pytest.raises(ExportError, match="aaa.*bbb"):
        check_upstream(manifest, "vae", "bbb", tmp_path)
