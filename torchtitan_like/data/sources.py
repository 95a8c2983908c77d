"""Where documents come from: the embedded corpus, local files, an HF hub dataset, or synthetic tokens.

A `DocumentSource` yields the records of one epoch, in a fixed order, from any record index on;
records it skips are not parsed or tokenized, so resuming deep into an epoch stays cheap.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import logging
import os
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from torchtitan_like.components import tokenizer as _tokenizer
from torchtitan_like.config.schema import Training
from torchtitan_like.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

EMBEDDED_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "turtledemo"}
)
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json")


class DocumentSource(Protocol):
    """Documents of one epoch as strings; an empty string is a record with no usable text."""

    label: str
    """The config setting that names this data, for errors (e.g. "training.dataset_path='data/'")."""

    def documents(self, epoch: int, start: int) -> Iterator[str]:
        """Records `start`, `start + 1`, ... of `epoch`'s order."""
        ...


# A .txt document longer than this many characters is read and tokenized in pieces of this size:
# tokenized whole, a 1 GB file became ~250M Python ints (~9 GB) in every rank. The size is a multiple
# of the tokenizer's own encode chunk, so the pieces give exactly the tokens of the whole document.
TXT_PIECE_CHUNKS = 16
_READ_BYTES = 8 << 20


def txt_piece_chars() -> int:
    return TXT_PIECE_CHUNKS * _tokenizer.ENCODE_CHUNK_CHARS


class TextPiece(str):
    """One piece of a .txt document too long to tokenize at once (see TXT_PIECE_CHUNKS): the document's
    bos token goes before its first piece and its eos after its last. Each piece is a record of its own
    for positions (DocumentSource.documents' `start`, the data loader's checkpointed doc_index)."""

    bos: bool
    eos: bool

    def __new__(cls, text: str, *, bos: bool, eos: bool) -> TextPiece:
        piece = super().__new__(cls, text)
        piece.bos, piece.eos = bos, eos
        return piece


def frame(text: str) -> tuple[bool, bool]:
    """(bos, eos) for a record: a whole document has both; a TextPiece has them at the document's ends."""
    return getattr(text, "bos", True), getattr(text, "eos", True)


def _txt_records(path: Path) -> Iterator[str]:
    """The records of one .txt file: the whole text, or its TextPieces when it is longer than a piece (a
    file of whitespace only stays one blank record, skipped as a blank document is)."""
    size = txt_piece_chars()
    if path.stat().st_size <= size:  # never more characters than bytes
        yield _decode(path.read_bytes(), path, first_line=1)
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending, first, has_text, offset, line = "", True, False, 0, 1
    started = False  # some text decoded (a leading byte-order mark is dropped from it: not text)
    with path.open("rb") as f:
        while True:
            raw = f.read(_READ_BYTES)
            final = not raw
            held = len(decoder.getstate()[0])  # bytes of a character the previous read cut (no newline among them)
            try:
                text = decoder.decode(raw, final=final)
            except UnicodeDecodeError as e:
                at = e.start - held  # in `raw`; negative inside the held bytes
                where = line + raw.count(b"\n", 0, max(at, 0))
                raise DataError(f"{path}:{where}: invalid UTF-8 ({e.reason} at byte {offset + at})") from None
            offset, line = offset + len(raw), line + raw.count(b"\n")
            if not started and text:
                started, text = True, text.removeprefix("\ufeff")
            pending += text
            has_text = has_text or (bool(text) and not text.isspace())
            # Emit a piece only once more text follows it (the last piece carries eos), and only once the
            # document has text: whitespace alone is a blank document.
            while has_text and len(pending) > size:
                yield TextPiece(pending[:size], bos=first, eos=False)
                pending, first = pending[size:], False
            if final:
                yield TextPiece(pending, bos=first, eos=True) if has_text else ""
                return


class EmbeddedSource:
    """The Python standard library's own .py files (one file = one document), shuffled per epoch."""

    label = "training.dataset='embedded'"

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.root = Path(sysconfig.get_paths()["stdlib"])
        self.files = _stdlib_py_files(self.root)
        if not self.files:
            raise DataError(f"training.dataset = 'embedded': no .py files under the standard library at {self.root}")

    def documents(self, epoch: int, start: int) -> Iterator[str]:
        order = list(self.files)
        random.Random(self.seed + epoch).shuffle(order)
        for rel in order[start:]:
            try:
                yield (self.root / rel).read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                yield ""  # not UTF-8: excluded from the corpus, but keeps its index so positions stay stable


def _stdlib_py_files(root: Path) -> list[str]:
    """Relative paths (POSIX, sorted) of the stdlib .py files outside test/tool directories."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EMBEDDED_EXCLUDED_DIRS]
        rel_dir = Path(dirpath).relative_to(root)
        found.extend((rel_dir / f).as_posix() for f in filenames if f.endswith(".py"))
    return sorted(found)


class LocalSource:
    """.txt (whole file = 1 document, read in TextPieces past txt_piece_chars()), .jsonl (1 record per
    line), .json (a list of records or one record)."""

    def __init__(self, dataset_path: str, text_field: str, *, section: str = "training") -> None:
        """section: the config section whose dataset_path this is, named in errors."""
        self.label = f"{section}.dataset_path={dataset_path!r}"
        self.text_field = text_field
        self.files = _resolve_local_files(dataset_path, key=f"{section}.dataset_path")

    def splits_documents(self, piece_chars: int | None = None) -> bool:
        """Whether some .txt file may be read in several TextPieces of `piece_chars` (default: this
        version's txt_piece_chars()) characters: positions then count pieces."""
        size = txt_piece_chars() if piece_chars is None else piece_chars
        return any(p.suffix == ".txt" and p.stat().st_size > size for p in self.files)

    def documents(self, epoch: int, start: int) -> Iterator[str]:
        skip = start
        for path in self.files:
            if path.suffix == ".txt":
                if skip and path.stat().st_size <= txt_piece_chars():
                    skip -= 1  # one record, not read
                    continue
                for record in _txt_records(path):  # (a split file is decoded once, skipped or not)
                    if skip:
                        skip -= 1
                        continue
                    yield record
            elif path.suffix == ".jsonl":
                with path.open("rb") as f:
                    for lineno, raw in enumerate(f, start=1):
                        if not raw.strip():
                            continue  # blank lines are not records
                        if skip:
                            skip -= 1
                            continue
                        record = _parse_json(_decode(raw, path, first_line=lineno), path, lineno)
                        yield self._text(record, f"{path}:{lineno}")
            else:
                records = _load_json_file(path)
                for i, record in enumerate(records):
                    if skip:
                        skip -= 1
                        continue
                    yield self._text(record, f"{path}: record {i}")

    def _text(self, record: Any, where: str) -> str:
        if not isinstance(record, dict):
            kind = type(record).__name__
            raise DataError(f"{where}: expected a JSON object with a {self.text_field!r} field, got {kind}")
        if self.text_field not in record:
            raise DataError(f"{where}: record has no field {self.text_field!r} (training.dataset_text_field)")
        text = record[self.text_field]
        if not isinstance(text, str):
            kind = type(text).__name__
            raise DataError(f"{where}: field {self.text_field!r} is {kind}, not a string (training.dataset_text_field)")
        return text


def _indexed_record(path: Path) -> bool:
    """PREFIX.json beside PREFIX.bin and PREFIX.idx: the record tools/pretokenize.py writes of an indexed
    dataset (its tokenizer and source), not a document file."""
    return path.suffix == ".json" and path.with_suffix(".bin").is_file() and path.with_suffix(".idx").is_file()


def _drop_indexed(key: str, dataset_path: str, files: list[Path], others: list[Path]) -> tuple[list[Path], list[Path]]:
    """`files` without the records of indexed datasets, and `others` (the files not read) without those
    datasets' .bin and .idx: they are said in one line of their own."""
    records = [p for p in files if _indexed_record(p)]
    if not records:
        return files, others
    stems = {p.with_suffix("") for p in records}
    logger.info("%s=%r: not reading the indexed dataset(s) %s (.bin, .idx and the .json record tools/pretokenize.py "
                "writes): training.dataset = \"indexed\" reads them", key, dataset_path, _names(sorted(stems)))
    return ([p for p in files if p not in records],
            [p for p in others if not (p.suffix in (".bin", ".idx") and p.with_suffix("") in stems)])


def _resolve_local_files(dataset_path: str, *, key: str) -> list[Path]:
    """The files `dataset_path` names (file, directory or glob), sorted; errors name the path. A path
    that exists is that file or directory, even with glob characters in its name (`data[1].jsonl`). The
    record of an indexed dataset (PREFIX.json beside PREFIX.bin and .idx) is not a document file."""
    if any(c in dataset_path for c in "*?[") and not Path(dataset_path).exists():
        listed = glob.glob(dataset_path, recursive=True)
        _refuse_broken_links(Path(p) for p in listed)
        matched = sorted(Path(p) for p in listed if Path(p).is_file())
        files, skipped = _drop_indexed(key, dataset_path, [p for p in matched if p.suffix in LOCAL_SUFFIXES],
                                       [p for p in matched if p.suffix not in LOCAL_SUFFIXES])
        if not files:
            others = f" (it matches {len(matched)} other file(s): {_names(matched)})" if matched else ""
            raise DataError(f"{key}={dataset_path!r}: no .txt/.jsonl/.json files match this glob{others}")
        _warn_skipped(key, dataset_path, skipped)
        return files
    path = Path(dataset_path)
    if not path.exists():
        raise DataError(f"{key}={dataset_path!r}: no such file or directory")
    if path.is_dir():
        files, skipped = _walk(path)
        files, skipped = _drop_indexed(key, dataset_path, sorted(files, key=lambda p: p.relative_to(path).as_posix()),
                                       skipped)
        if not files:
            raise DataError(f"{key}={dataset_path!r}: directory holds no .txt/.jsonl/.json files")
        _warn_skipped(key, dataset_path, sorted(skipped, key=lambda p: p.relative_to(path).as_posix()))
        return files
    if path.suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{key}={dataset_path!r}: unsupported file type (use .txt, .jsonl or .json)")
    if _indexed_record(path):
        raise DataError(f"{key}={dataset_path!r} is the record of an indexed dataset (tools/pretokenize.py wrote it "
                        f"beside {path.with_suffix('.bin').name}): train on that data with training.dataset = "
                        f"\"indexed\" and dataset_path = {str(path.with_suffix(''))!r}")
    return [path]


def _warn_skipped(key: str, dataset_path: str, skipped: list[Path]) -> None:
    """Say which files of the dataset are not read: a folder of .jsonl shards with a few .jsonl.gz among
    them would otherwise train on part of the data without a word."""
    if not skipped:
        return
    kinds = sorted({"".join(p.suffixes[-2:]) or "(no extension)" for p in skipped})
    logger.warning(
        "%s=%r: not reading %d file(s) that are not .txt/.jsonl/.json (%s: %s); compressed or other formats "
        "must be converted first", key, dataset_path, len(skipped), " ".join(kinds), _names(skipped),
    )


def _names(paths: list[Path]) -> str:
    return ", ".join(p.name for p in paths[:3]) + (", ..." if len(paths) > 3 else "")


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
    """The data files under `root`, as a glob `root/**/*` sees them: into linked folders (a shard linked in
    from another disk; Path.rglob of Python 3.11 does not enter them), each real folder once, without
    hidden files and folders (".ipynb_checkpoints" copies would be read twice). Also returns the other
    (not hidden) files found, which are not read."""
    files, skipped, seen = [], [], set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        # Sorted: a folder reachable under two names (a link) is kept under the same one everywhere, so
        # the document order does not depend on how a file system lists a folder.
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in names:
            if not n.startswith(".") and Path(folder, n).is_file():
                (files if Path(n).suffix in LOCAL_SUFFIXES else skipped).append(Path(folder, n))
        _refuse_broken_links(Path(folder, n) for n in names if not n.startswith("."))
    return files, skipped


def _refuse_broken_links(paths: Any) -> None:
    """A data file linked from a disk that is not mounted (or was moved) is part of the dataset that would
    be left out without a word: an error, naming the link and its target."""
    for p in paths:
        if p.suffix in LOCAL_SUFFIXES and p.is_symlink() and not p.exists():
            raise DataError(
                f"{p} is a link to {os.readlink(p)}, which does not exist: that part of the dataset is missing "
                "(mount its disk, or remove the link)"
            )


def _decode(raw: bytes, path: Path, *, first_line: int) -> str:
    try:
        # A file's UTF-8 byte-order mark (Windows editors write one) is not text.
        return raw.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as e:
        # utf-8-sig reports positions after the byte-order mark it removed.
        at = e.start + (len(codecs.BOM_UTF8) if first_line == 1 and raw.startswith(codecs.BOM_UTF8) else 0)
        line = first_line + raw.count(b"\n", 0, at)
        raise DataError(f"{path}:{line}: invalid UTF-8 ({e.reason} at byte {at})") from None


def _parse_json(text: str, path: Path, lineno: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})") from None


def _load_json_file(path: Path) -> list[Any]:
    text = _decode(path.read_bytes(), path, first_line=1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    return data if isinstance(data, list) else [data]


class HFSource:
    """A streaming split of an HF hub dataset (needs the optional `datasets` package)."""

    def __init__(
        self, dataset_path: str, split: str, text_field: str, *, config: str | None = None, section: str = "training"
    ) -> None:
        """config: the dataset's configuration name (load_dataset's `name`), None for its default."""
        try:
            import datasets
        except ImportError:
            raise DataError(f"{section}.dataset = 'hf' needs the `datasets` package: pip install datasets") from None
        which = f"split {split!r}" + (f", config {config!r}" if config else "")
        self.label = f"{section}.dataset_path={dataset_path!r} ({which})"
        self.text_field = text_field
        try:
            self._ds = datasets.load_dataset(dataset_path, name=config, split=split, streaming=True)
        except Exception as e:  # the hub raises many types; the user needs the name and the cause
            hint = ""
            if not config and "config" in str(e).lower():
                hint = f"; if it has several configurations, name one in {section}.dataset_config"
            raise DataError(f"{section}.dataset_path={dataset_path!r} {which}: cannot load ({e}){hint}") from e

    def documents(self, epoch: int, start: int) -> Iterator[str]:
        ds = self._ds.skip(start) if start else self._ds
        for i, record in enumerate(ds, start=start):
            text = record.get(self.text_field)
            if not isinstance(text, str):
                raise DataError(
                    f"HF record {i}: no string field {self.text_field!r} (training.dataset_text_field)"
                )
            yield text


def build_source(training: Training, seed: int) -> DocumentSource:
    """The document source `training.dataset` names; path problems raise here, before training."""
    if training.dataset == "embedded":
        return EmbeddedSource(seed)
    if training.dataset in ("local", "hf") and not training.dataset_path:
        raise ConfigError(f"training.dataset = {training.dataset!r} needs training.dataset_path")
    if training.dataset == "local":
        return LocalSource(training.dataset_path, training.dataset_text_field)
    if training.dataset == "hf":
        return HFSource(
            training.dataset_path, training.dataset_split, training.dataset_text_field, config=training.dataset_config
        )
    raise ConfigError(f"training.dataset = {training.dataset!r} has no document source (synthetic makes tokens)")


def synthetic_sample(seed: int, index: int, length: int, vocab_size: int) -> torch.Tensor:
    """`length` token ids uniform in [0, vocab_size), a pure function of (seed, index)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little"))
    return torch.randint(0, vocab_size, (length,), generator=gen, dtype=torch.int64)
