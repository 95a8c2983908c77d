"""Data sources and start-up checks: the document order does not depend on how a file system lists a
folder, a UTF-8 byte-order mark is not text, an empty dataset names its setting, validation files that
training reads too are refused, a training-data format problem is found at start-up, and a Hugging
Face tokenizer folder or tokenizer.json gets a message saying what to use."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from torchtitan_like.components.tokenizer import build_tokenizer
from torchtitan_like.components.validation import build_validation_dataset
from torchtitan_like.config.loader import load_config
from torchtitan_like.config.schema import Training, Validation
from torchtitan_like.data import build_dataloader
from torchtitan_like.data.sources import LocalSource
from torchtitan_like.errors import ConfigError, DataError

from test_profiling import argv as trainer_argv  # the debug model, 32 x 2 tokens, no TensorBoard


def _docs(path: Path, n: int, tag: str) -> None:
    path.write_text(
        "".join(json.dumps({"text": f"def {tag}{i}(x):\n    return x * {i} + {i * i}\n" * 20}) + "\n" for i in range(n)),
        encoding="utf-8",
    )


# --- 1. A folder linked into the dataset folder: which copy is read depends on the listing order ---


class _ListingInOrder:
    """os.scandir with its entries sorted by name (reverse=True: descending), like another filesystem's order."""

    def __init__(self, real, path, reverse: bool) -> None:
        with real(path) as it:
            self._entries = iter(sorted(it, key=lambda e: e.name, reverse=reverse))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._entries)


def test_document_order_does_not_depend_on_the_directory_listing_order(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "v2").mkdir(parents=True)
    _docs(root / "v2" / "shard.jsonl", 2, "v")
    _docs(root / "m.jsonl", 2, "m")
    os.symlink(root / "v2", root / "a_latest")  # data/a_latest -> data/v2: one real folder, two names
    real = os.scandir
    orders = []
    for reverse in (False, True):
        monkeypatch.setattr(os, "scandir", lambda p, reverse=reverse: _ListingInOrder(real, p, reverse))
        source = LocalSource(str(root), "text")
        orders.append(list(source.documents(0, 0)))
    monkeypatch.setattr(os, "scandir", real)
    # Same files, same contents: the documents (and so every global batch and every resumed position)
    # must come in the same order whatever order the filesystem lists a folder in. Today one listing
    # reads a_latest/shard.jsonl before m.jsonl and the other v2/shard.jsonl after it.
    assert len(orders[0]) == len(orders[1]) == 4
    assert orders[0] == orders[1]


# --- 2. A UTF-8 byte-order mark ---


def test_a_utf8_byte_order_mark_is_not_document_text(tmp_path):
    bom = b"\xef\xbb\xbf"
    txt = tmp_path / "doc.txt"
    txt.write_bytes(bom + b"def f():\n    return 1\n")
    assert list(LocalSource(str(txt), "text").documents(0, 0)) == ["def f():\n    return 1\n"]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_bytes(bom + b'{"text": "a"}\n{"text": "b"}\n')
    assert list(LocalSource(str(jsonl), "text").documents(0, 0)) == ["a", "b"]
    js = tmp_path / "docs.json"
    js.write_bytes(bom + b'[{"text": "a"}, {"text": "b"}]')
    assert list(LocalSource(str(js), "text").documents(0, 0)) == ["a", "b"]


# --- 3. "the dataset is empty" names no dataset ---


def test_the_empty_dataset_error_names_the_data(tmp_path):
    tok = build_tokenizer("")
    empty = tmp_path / "empty_docs.jsonl"
    empty.write_text('{"text": ""}\n{"text": "  "}\n', encoding="utf-8")

    training = Training(dataset="local", dataset_path=str(empty), seq_len=16, local_batch_size=2)
    loader = build_dataloader(training=training, tokenizer=tok, vocab_size=2000, dp_rank=0, dp_degree=1, seed=0)
    with pytest.raises(DataError, match="the dataset is empty") as e:
        next(iter(loader))
    assert "training.dataset_path" in str(e.value) or "empty_docs.jsonl" in str(e.value), str(e.value)

    validation = Validation(enable=True, dataset="local", dataset_path=str(empty), seq_len=16, local_batch_size=2)
    data = build_validation_dataset(validation, tokenizer=tok, vocab_size=2000, text_field="text", dp_rank=0,
                                    dp_degree=1, seed=0)
    with pytest.raises(DataError, match="the dataset is empty") as e:
        next(iter(data))
    assert "validation" in str(e.value), str(e.value)


# --- 4. Held-out data that training reads too ---


def test_validation_files_that_training_also_reads_are_named(tmp_path, caplog):
    from torchtitan_like.trainer import Trainer

    data = tmp_path / "data"
    data.mkdir()
    _docs(data / "train.jsonl", 16, "t")
    _docs(data / "val.jsonl", 16, "v")  # the usual layout: data/train.jsonl, data/val.jsonl
    caplog.set_level(logging.WARNING, logger="torchtitan_like")
    argv = trainer_argv(
        tmp_path / "out",
        "--training.dataset", "local", "--training.dataset_path", str(data),
        "--validation.enable", "--validation.dataset", "local", "--validation.dataset_path", str(data / "val.jsonl"),
        "--validation.seq_len", "32", "--validation.local_batch_size", "2", "--validation.steps", "1",
    )
    try:
        trainer = Trainer(load_config(argv))
    except (ConfigError, DataError) as e:
        messages = [str(e)]  # refusing is a fix too
    else:
        trainer.close()
        messages = [r.getMessage() for r in caplog.records]
    # One message that names both keys (the file is in both).
    assert any("validation.dataset_path" in m and "training.dataset_path" in m for m in messages), messages


# --- 5. A training-data format problem is found only at the first step ---


def test_a_wrong_training_text_field_is_refused_at_start_up(tmp_path):
    from torchtitan_like.trainer import Trainer

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"content": f"def f{i}(): return {i}\n" * 30}) + "\n" for i in range(8)),
                    encoding="utf-8")
    argv = trainer_argv(tmp_path / "out", "--training.dataset", "local", "--training.dataset_path", str(data))
    trainer = None
    try:
        with pytest.raises(DataError, match="record has no field 'text'"):
            trainer = Trainer(load_config(argv))
    finally:
        if trainer is not None:
            trainer.close()


# --- 6. A Hugging Face download given as model.tokenizer_path ---


def test_a_hugging_face_tokenizer_path_gets_a_message_that_says_what_to_use(tmp_path):
    hf = tmp_path / "Meta-Llama-3-8B"
    (hf / "original").mkdir(parents=True)
    with pytest.raises(DataError) as e:
        build_tokenizer(str(hf))  # a folder without any tokenizer in it
    assert "not found" not in str(e.value) and "folder" in str(e.value), str(e.value)
    assert "tokenizer.model" in str(e.value) and "tokenizer.json" in str(e.value), str(e.value)
    # A folder's tokenizer.json is read (tests/unit/test_tokenizer_json.py); an incomplete one says what it lacks.
    (hf / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}, indent=2))
    for path in (hf, hf / "tokenizer.json"):
        with pytest.raises(DataError, match=r"tokenizer.json: model.vocab is missing"):
            build_tokenizer(str(path))
