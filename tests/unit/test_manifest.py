"""manifest.json: what it records, and `verify` naming the file for each kind of damage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import torchtitan_like
from torchtitan_like.components.manifest import (
    MANIFEST,
    CheckpointError,
    build_manifest,
    hash_files,
    list_files,
    verify,
    write_manifest,
)
from torchtitan_like.errors import TrainerError

FINGERPRINT = {"config_hash": "abc123", "layout": {"dp_shard": 4, "tp": 2}, "world_size": 8}


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "step-7"
    (folder / "sub").mkdir(parents=True)
    (folder / ".metadata").write_bytes(b"meta" * 10)
    (folder / "__0_0.distcp").write_bytes(bytes(range(256)) * 40)
    (folder / "sub" / "model.safetensors").write_bytes(b"x" * 100)
    manifest = build_manifest(
        step=7, files=hash_files(folder, list_files(folder)), fingerprint=FINGERPRINT, contents=["model", "optimizer"]
    )
    write_manifest(folder, manifest)
    return folder


def test_manifest_records_step_versions_layout_and_every_file(tmp_path):
    folder = _folder(tmp_path)
    m = json.loads((folder / MANIFEST).read_text())
    assert m["step"] == 7
    assert m["config_hash"] == "abc123" and m["layout"] == {"dp_shard": 4, "tp": 2} and m["world_size"] == 8
    assert m["torch_version"] == torch.__version__
    assert m["torchtitan_like_version"] == torchtitan_like.__version__
    assert m["time"].endswith("Z")
    assert sorted(m["files"]) == [".metadata", "__0_0.distcp", "sub/model.safetensors"]
    assert m["files"]["__0_0.distcp"]["size"] == 256 * 40
    assert not (folder / (MANIFEST + ".tmp")).exists()
    assert verify(folder)["step"] == 7


def test_checkpoint_error_is_a_trainer_error():
    assert issubclass(CheckpointError, TrainerError)


def test_verify_names_a_truncated_file(tmp_path):
    folder = _folder(tmp_path)
    data = (folder / "__0_0.distcp").read_bytes()
    (folder / "__0_0.distcp").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp is truncated.*10230 bytes.*10240"):
        verify(folder)


def test_verify_names_a_flipped_byte(tmp_path):
    folder = _folder(tmp_path)
    path = folder / "sub" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[50] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"sub/model\.safetensors is corrupted: sha256"):
        verify(folder)


def test_verify_names_a_missing_file(tmp_path):
    folder = _folder(tmp_path)
    (folder / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"step-7/\.metadata is missing \(listed in manifest\.json\)"):
        verify(folder)


def test_verify_names_an_unlisted_file(tmp_path):
    folder = _folder(tmp_path)
    (folder / "__1_0.distcp").write_bytes(b"stray")
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp is not listed in manifest\.json"):
        verify(folder)


def test_verify_reports_a_missing_manifest_as_incomplete(tmp_path):
    folder = _folder(tmp_path)
    (folder / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"step-7/manifest\.json is missing: .* incomplete"):
        verify(folder)


def test_verify_reports_an_unreadable_manifest(tmp_path):
    folder = _folder(tmp_path)
    (folder / MANIFEST).write_text('{"step": 7, "files": ')
    with pytest.raises(CheckpointError, match=r"manifest\.json is unreadable"):
        verify(folder)


def test_verify_counts_further_problems(tmp_path):
    folder = _folder(tmp_path)
    (folder / ".metadata").unlink()
    (folder / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"\(and 1 more\)"):
        verify(folder)
