"""Checkpoint folders and their integrity.

`manifest.json`, written last, lists every file of a step folder with its size and sha256, plus what
produced it (step, config hash, parallel layout, versions). Folder names: `step-N` (complete when it
holds a manifest), `step-N.{tmp,old,del}-<nonce>-<k>` (leftovers of an interrupted save / replace /
purge, never loaded).

A step folder is complete only when its manifest is there and every file matches it. `verify` is the
one check everybody uses (auto-resume, explicit loads, `tools/checkpoint.py verify`): it raises a
`CheckpointError` that names the first bad file. Hashing can be split over ranks with `shard`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import torchtitan_like
from torchtitan_like.errors import TrainerError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_CHUNK = 8 * 1024 * 1024


class CheckpointError(TrainerError):
    """A checkpoint that cannot be saved or loaded: names the folder and, where it applies, the file."""


def list_files(folder: str | os.PathLike) -> list[str]:
    """Every file under `folder` (relative POSIX paths, sorted), the manifest and its temp file excluded."""
    root = Path(folder)
    names = []
    for dirpath, _, filenames in os.walk(root):
        for fname in filenames:
            rel = (Path(dirpath) / fname).relative_to(root).as_posix()
            if rel not in (MANIFEST, MANIFEST + ".tmp"):
                names.append(rel)
    return sorted(names)


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """{"size": bytes, "sha256": hex} of one file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def hash_files(folder: str | os.PathLike, names: list[str]) -> dict[str, dict[str, Any]]:
    root = Path(folder)
    return {name: file_digest(root / name) for name in names}


def build_manifest(
    *,
    step: int,
    files: dict[str, dict[str, Any]],
    fingerprint: dict[str, Any],
    contents: list[str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "step": step,
        "config_hash": fingerprint.get("config_hash", ""),
        "layout": fingerprint.get("layout", {}),
        "world_size": fingerprint.get("world_size", 1),
        "torch_version": torch.__version__,
        "torchtitan_like_version": torchtitan_like.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "contents": sorted(contents),
        **(extra or {}),
        "files": dict(sorted(files.items())),
    }


def fsync_dir(path: Path) -> None:
    # The rename is only durable once the directory entry is on disk (POSIX; a no-op where unsupported).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(folder: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Atomically write `folder/manifest.json`: temp file, fsync, rename, fsync the folder."""
    folder = Path(folder)
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    fsync_dir(folder)
    return folder / MANIFEST


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise CheckpointError(f"{folder} does not exist or is not a folder")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint in {folder} is incomplete (its save never finished)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}): the checkpoint in {folder} cannot be trusted") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "step" not in manifest:
        raise CheckpointError(f"{path} is not a torchtitan_like manifest (no 'step' or 'files')")
    if not isinstance(manifest["step"], int) or isinstance(manifest["step"], bool):
        raise CheckpointError(f"{path} is damaged: its step is {manifest['step']!r}, not a number")
    named = STEP_RE.match(Path(folder).name) or ASIDE_RE.match(Path(folder).name)
    if named and int(named.group(1)) != manifest["step"]:
        # Checkpoints are ranked by their folders' names: a copied or renamed one would resume the wrong step.
        raise CheckpointError(
            f"{path} says step {manifest['step']}, but its folder is named step-{int(named.group(1))} (copied or "
            f"renamed?): rename it step-{manifest['step']}, or move it out of the checkpoint folder"
        )
    contents = manifest.get("contents", [])
    if not isinstance(contents, list) or not all(isinstance(c, str) for c in contents):
        raise CheckpointError(f"{path} is damaged: its contents are {contents!r}, not a list of names")
    for name, entry in manifest["files"].items():
        # Valid JSON can still be damaged (a flipped byte in a key): every entry needs its size and hash.
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and not isinstance(entry.get("size"), bool)
            and isinstance(entry.get("sha256"), str)
        ):
            raise CheckpointError(f"{path} is damaged: its entry for {name!r} has no size and sha256 ({entry!r})")
    return manifest


def verify_errors(folder: str | os.PathLike, manifest: dict[str, Any], *, shard: tuple[int, int] = (0, 1)) -> list[str]:
    """Problems with this shard's files (every `world`-th listed file from `rank`); rank 0 also reports
    files on disk that the manifest does not list."""
    folder = Path(folder)
    rank, world = shard
    listed = sorted(manifest["files"])
    errors = []
    for name in listed[rank::world]:
        path = folder / name
        want = manifest["files"][name]
        if not path.is_file():
            errors.append(f"{path} is missing (listed in {MANIFEST})")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            errors.append(f"{path} is truncated or changed: {size} bytes, {MANIFEST} says {want['size']}")
            continue
        if file_digest(path)["sha256"] != want["sha256"]:
            errors.append(f"{path} is corrupted: sha256 does not match {MANIFEST}")
    if rank == 0:
        for name in sorted(set(list_files(folder)) - set(listed)):
            errors.append(f"{folder / name} is not listed in {MANIFEST} (a foreign or leftover file)")
    return errors


def verify(folder: str | os.PathLike) -> dict[str, Any]:
    """Re-hash every file of a step folder; return its manifest, or raise CheckpointError naming the file."""
    manifest = read_manifest(folder)
    errors = verify_errors(folder, manifest)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise CheckpointError(errors[0] + more)
    return manifest


STEP_RE = re.compile(r"^step-(\d+)$")
ASIDE_RE = re.compile(r"^step-(\d+)\.old-[0-9a-f]+-\d+$")
"""A complete checkpoint set aside by a replace (renamed back, or read in place, by the next load)."""
PARTIAL_RE = re.compile(r"^step-\d+\.(tmp|old|del)-[0-9a-f]+-\d+$")
"""Leftovers of an interrupted save, replace or purge; removed by rank 0 at the next save."""


def is_partial(name: str) -> bool:
    return PARTIAL_RE.match(name) is not None


# --- folder layout --------------------------------------------------------------------------------


def step_folders(folder: str | os.PathLike) -> dict[int, Path]:
    """step -> step-N folder (complete or not; partial `.tmp-` folders are not listed)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    out = {}
    for p in folder.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir():
            out[int(m.group(1))] = p
    return out


def complete_steps(folder: str | os.PathLike) -> dict[int, Path]:
    """The step-N folders that carry a manifest (not re-hashed: see `manifest.verify`)."""
    return {s: p for s, p in step_folders(folder).items() if (p / MANIFEST).is_file()}


def dcp_keys(path: str | os.PathLike) -> list[str]:
    """Every flattened key of a DCP checkpoint (model.layers.0..., optimizer.state...), from its .metadata alone."""
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise CheckpointError(f"{Path(path) / '.metadata'} is missing or unreadable ({e}): not a DCP checkpoint") from e
    return list(metadata.state_dict_metadata)


def dcp_contents(path: str | os.PathLike) -> set[str]:
    """Top-level state names in a DCP checkpoint (model, optimizer, ...), from its .metadata alone."""
    return {key.split(".", 1)[0] for key in dcp_keys(path)}
