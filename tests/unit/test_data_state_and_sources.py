"""The data pipeline's state and sources: a loader position stays a few integers however long the
document, a mid-step position resumes only under its own layout, synthetic data continues its sample
stream under another data-parallel degree, a closed prefetcher raises instead of hanging, and a
dataset folder is read as a glob reads it (linked folders in, hidden files out)."""

from __future__ import annotations

import json
import pickle
import random
import threading
from pathlib import Path

import pytest
import torch
from test_data import GBS, SEQ, tok  # noqa: F401 (the embedded tokenizer fixture and test_data's shapes)

from torchtitan_like.config.schema import Training
from torchtitan_like.data import build_dataloader, grad_accum_steps
from torchtitan_like.data.prefetch import PrefetchingLoader, _Raised
from torchtitan_like.data.sources import synthetic_sample
from torchtitan_like.errors import DataError

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "(x)", "\n"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) for _ in range(40)]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return str(path)


def make_loader(tok, path, *, rank=0, dp=1, **kw):
    kw = {"local_batch_size": 2, "global_batch_size": GBS, "seq_len": SEQ, "dataset": "local", **kw}
    return build_dataloader(
        training=Training(dataset_path=path, **kw), tokenizer=tok, vocab_size=2000, dp_rank=rank, dp_degree=dp, seed=0
    )


def windows(micro: tuple[torch.Tensor, torch.Tensor]) -> list[tuple[int, ...]]:
    """(inputs, labels) -> the seq_len + 1 windows they were cut from, as hashable rows."""
    inputs, labels = micro
    return [tuple(r) for r in torch.cat([inputs, labels[:, -1:]], dim=1).tolist()]


def test_state_of_a_long_document_stays_small(tok, tmp_path):
    # README: a .txt file is one document. A one-file corpus (a few hundred MB of text is common) makes
    # `buffer` hold ~all of its tokens as Python ints: O(doc) copies per step and O(doc) checkpoint state.
    big = tmp_path / "corpus.txt"
    big.write_text("alpha beta gamma delta epsilon " * 20_000, encoding="utf-8")  # ~100k tokens, 620 kB
    loader = make_loader(tok, str(big), local_batch_size=8)  # one microbatch per step
    it = iter(loader)
    first = [next(it) for _ in range(2)]
    state = loader.state_dict()
    # The position inside one document is a few integers (epoch, doc_index, unread tokens), not the
    # rest of the document (~100k tokens as Python ints).
    size = len(pickle.dumps(state))
    assert size < 20_000, f"dataloader state is {size} bytes after 2 steps into one 100k-token document"
    # And the resume is exact: the document is tokenized again and its unread tail taken.
    resumed = make_loader(tok, str(big), local_batch_size=8)
    resumed.load_state_dict(state)
    assert windows(next(iter(resumed))) == windows(next(it))
    assert first[0][0][0, 0] == tok.bos_id


def test_mid_step_state_under_another_layout_is_refused(tok, corpus):
    # Saved one microbatch into a global batch by dp=1, local_batch_size=2 (4 microbatches per step):
    # samples 0 and 1 of the global batch were consumed, 2..7 remain. dp=2 with local_batch_size=1 also
    # takes 4 microbatches per step, but its microbatch 1 is other samples: it would replay and skip.
    old = make_loader(tok, corpus, local_batch_size=2, dp=1)
    next(iter(old))
    state = old.state_dict()
    training = Training(dataset="local", dataset_path=corpus, local_batch_size=1, global_batch_size=GBS, seq_len=SEQ)
    assert grad_accum_steps(training, 2) == 4
    loader = make_loader(tok, corpus, local_batch_size=1, rank=0, dp=2)
    with pytest.raises(DataError, match=r"1 microbatches into a global batch \(local batch 2, data-parallel degree 1, "
                                        r"global batch 8\), which this layout \(local batch 1, data-parallel degree 2"):
        loader.load_state_dict(state)  # (StatefulDataLoader applies it when iteration starts)
        next(iter(loader))
    # Under its own layout it resumes exactly.
    same = make_loader(tok, corpus, local_batch_size=2, dp=1)
    same.load_state_dict(state)
    straight = make_loader(tok, corpus, local_batch_size=2, dp=1)
    it = iter(straight)
    next(it)
    assert windows(next(iter(same))) == windows(next(it))


def test_a_checkpoint_with_the_unread_tokens_themselves_still_resumes(tok, corpus):
    """Checkpoints before the (epoch, doc_index, tail) position stored the unread tokens as "buffer"."""
    straight = make_loader(tok, corpus)
    it = iter(straight)
    for _ in range(4):  # one step
        next(it)
    state = straight.state_dict()
    stream = state  # the iterator state is nested inside the StatefulDataLoader's
    while "tail" not in stream:
        stream = next(v for v in stream.values() if isinstance(v, dict))
    doc_tokens = tok.encode(json.loads(Path(corpus).read_text().splitlines()[stream["doc_index"] - 1])["text"],
                            bos=True, eos=True)
    stream["buffer"] = doc_tokens[len(doc_tokens) - stream.pop("tail"):]
    resumed = make_loader(tok, corpus)
    resumed.load_state_dict(state)
    assert windows(next(iter(resumed))) == windows(next(it))


def test_a_dataset_that_changed_under_a_checkpoint_is_a_data_error(tok, tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("alpha beta gamma delta " * 200, encoding="utf-8")
    loader = make_loader(tok, str(path), local_batch_size=8)
    next(iter(loader))
    state = loader.state_dict()
    path.write_text("alpha beta", encoding="utf-8")  # the document is now shorter than its unread tail
    resumed = make_loader(tok, str(path), local_batch_size=8)
    resumed.load_state_dict(state)
    with pytest.raises(DataError, match="the dataset changed since the checkpoint"):
        next(iter(resumed))


def test_synthetic_resume_with_another_dp_degree_continues_the_sample_stream():
    def loader(dp, rank):
        training = Training(dataset="synthetic", local_batch_size=2, global_batch_size=-1, seq_len=SEQ)
        return build_dataloader(training=training, tokenizer=None, vocab_size=2000, dp_rank=rank, dp_degree=dp, seed=0)

    old = [loader(2, r) for r in range(2)]  # global batch 4
    for ld in old:
        it = iter(ld)
        for _ in range(3):  # 3 steps: samples 0..11 trained on
            next(it)
    state = old[0].state_dict()
    assert state == old[1].state_dict()
    new = loader(1, 0)  # resumed on half the ranks: global batch 2
    new.load_state_dict(state)
    inputs, labels = next(iter(new))
    got = torch.cat([inputs, labels[:, -1:]], dim=1)
    expected = torch.stack([synthetic_sample(0, 12 + i, SEQ + 1, 2000) for i in range(2)])
    assert torch.equal(got, expected), "resumed synthetic stream does not continue at sample 12"


def test_next_after_close_raises_instead_of_hanging(tok, corpus):
    pre = PrefetchingLoader(make_loader(tok, corpus), depth=1)
    it = iter(pre)
    next(it)
    pre.close()
    # Drain whatever was prefetched before close (at most `depth` items), then the next call must not hang.
    outcome: list = []

    def consume():
        try:
            for _ in range(pre.depth + 1):
                next(it)
            outcome.append("returned")
        except BaseException as e:  # noqa: BLE001
            outcome.append(e)

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    t.join(5)
    hung = t.is_alive()
    if hung and pre._queue is not None:  # release the stuck consumer so no thread is left behind
        for _ in range(pre.depth + 1):
            try:
                pre._queue.put(_Raised(RuntimeError("released by the test")), timeout=1)
            except Exception:  # noqa: BLE001
                break
        t.join(5)
    assert not hung, "next() after close() blocked (no producer thread is left to fill the queue)"
    assert outcome and isinstance(outcome[0], BaseException) and not isinstance(outcome[0], AssertionError)


def test_directory_reads_files_under_symlinked_subdirectories(tmp_path):
    from torchtitan_like.data.sources import LocalSource

    shards = tmp_path / "elsewhere" / "shard_b"  # e.g. on another disk, linked into the dataset folder
    shards.mkdir(parents=True)
    (shards / "b.jsonl").write_text('{"text": "from the linked shard"}\n', encoding="utf-8")
    data = tmp_path / "data"
    (data / "shard_a").mkdir(parents=True)
    (data / "shard_a" / "a.jsonl").write_text('{"text": "from the real shard"}\n', encoding="utf-8")
    (data / "shard_b").symlink_to(shards, target_is_directory=True)
    via_glob = list(LocalSource(str(data / "**" / "*.jsonl"), "text").documents(0, 0))
    assert via_glob == ["from the real shard", "from the linked shard"]
    # A hidden folder (a notebook's checkpoint copies) and a link back up (a cycle) change nothing.
    (data / ".ipynb_checkpoints").mkdir()
    (data / ".ipynb_checkpoints" / "a-checkpoint.jsonl").write_text('{"text": "a copy"}\n', encoding="utf-8")
    (data / "shard_a" / "loop").symlink_to(data, target_is_directory=True)
    assert list(LocalSource(str(data), "text").documents(0, 0)) == via_glob


def test_files_of_other_formats_in_a_dataset_folder_or_glob_are_named_not_skipped_silently(tmp_path, caplog):
    import logging

    from torchtitan_like.data.sources import LocalSource

    data = tmp_path / "data"
    (data / "part2").mkdir(parents=True)
    (data / "part1.jsonl").write_text('{"text": "read"}\n', encoding="utf-8")
    (data / "part2" / "more.jsonl.gz").write_bytes(b"\x1f\x8b not read")  # compressed: half the data
    (data / "part2" / "more2.parquet").write_bytes(b"PAR1")
    (data / ".gitattributes").write_text("*.gz filter=lfs\n")  # hidden: not data, not worth a word
    with caplog.at_level(logging.WARNING, logger="torchtitan_like.data.sources"):
        assert list(LocalSource(str(data), "text").documents(0, 0)) == ["read"]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"training.dataset_path={str(data)!r}: not reading 2 file(s)" in warning, warning
    assert ".jsonl.gz .parquet: more.jsonl.gz, more2.parquet" in warning, warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="torchtitan_like.data.sources"):
        assert len(LocalSource(str(data / "**" / "*"), "text", section="validation").files) == 1
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "validation.dataset_path=" in warning and "not reading 2 file(s)" in warning, warning
    # A glob that matches only other formats: the error says what it did match.
    with pytest.raises(DataError, match=r"no \.txt/\.jsonl/\.json files match this glob \(it matches 2 other "
                                        r"file\(s\): more\.jsonl\.gz, more2\.parquet\)"):
        LocalSource(str(data / "**" / "more*"), "text")
    # Only supported files: no warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="torchtitan_like.data.sources"):
        LocalSource(str(data / "part1.jsonl"), "text")
    assert not caplog.records


def test_an_indexed_datasets_record_beside_the_documents_is_not_read_as_one(tmp_path, caplog):
    """tools/pretokenize.py --out data/train writes data/train.json beside .bin and .idx: a local source over
    data/ read that record as a document file (an error about its missing text field, at the epoch boundary,
    hours in); a rerun of pretokenize on the folder failed the same way."""
    import logging
    import subprocess
    import sys

    from torchtitan_like.data.sources import LocalSource

    root = Path(__file__).resolve().parents[2]
    data = tmp_path / "data"
    data.mkdir()
    (data / "docs.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n', encoding="utf-8")
    write = [sys.executable, str(root / "tools/pretokenize.py"), "--out", str(data / "train"),
             "--training.dataset", "local", "--training.dataset_path", str(data)]
    for _ in range(2):  # (the second run reads the folder with the first one's output in it)
        r = subprocess.run(write, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in data.iterdir()) == ["docs.jsonl", "train.bin", "train.idx", "train.json"]
    for path in (str(data), str(data / "*")):
        with caplog.at_level(logging.INFO, logger="torchtitan_like.data.sources"):
            assert list(LocalSource(path, "text").documents(0, 0)) == ["one", "two"]
        (line,) = [r.getMessage() for r in caplog.records]  # one info line, no warning about .bin and .idx
        assert "not reading the indexed dataset(s) train (.bin, .idx and the .json record" in line, line
        caplog.clear()
    with pytest.raises(DataError, match=r"is the record of an indexed dataset .* training.dataset = \"indexed\""):
        LocalSource(str(data / "train.json"), "text")
