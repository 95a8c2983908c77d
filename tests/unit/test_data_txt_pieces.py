"""A long .txt document is read and tokenized in pieces (a 1 GB file tokenized whole held ~9 GB of
Python ints in every rank), and the pieces give exactly the tokens of the whole document: the stream,
its checkpointed positions, and positions saved before pieces existed all stay what they were.

The sizes are shrunk for the test: the tokenizer's encode chunk to 500 characters and a piece to 3 of
them, so a 30k-character file is 20 pieces (the real sizes: 400k characters and 6.4M).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from torchtitan_like.components import tokenizer as tokenizer_module
from torchtitan_like.components.tokenizer import Tokenizer, build_tokenizer
from torchtitan_like.data import sources
from torchtitan_like.data.dataset import BatchLayout, PackedIterator, _tokens
from torchtitan_like.data.sources import LocalSource, TextPiece
from torchtitan_like.errors import DataError

CHUNK = 500
PIECE = 3 * CHUNK
SEQ = 128  # 516 tokens a step: 40 steps pass the ~18k tokens of the corpus
GBS = 4
STEPS = 40  # past the end of the corpus: the second epoch starts inside the run


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return build_tokenizer("")


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    monkeypatch.setattr(tokenizer_module, "ENCODE_CHUNK_CHARS", CHUNK)
    monkeypatch.setattr(sources, "TXT_PIECE_CHUNKS", PIECE // CHUNK)
    monkeypatch.setattr(sources, "_READ_BYTES", 701)  # reads that end inside multi-byte characters


def whole_documents(monkeypatch) -> None:
    """Every .txt file one record, as before pieces (the tokenizer's chunk stays small)."""
    monkeypatch.setattr(sources, "TXT_PIECE_CHUNKS", 10**9)


def _text(seed: int, chars: int) -> str:
    rng = random.Random(seed)
    words = ["alpha", "beta", "héllo", "日本語", "🙂", "def", "(x)", "\n", "\n\n", "  ", " " * 30, "2024", "e\u0301"]
    out = []
    while sum(map(len, out)) < chars:
        out.append(rng.choice(words) + " ")
    return "".join(out)[:chars]


@pytest.fixture
def corpus(tmp_path) -> tuple[str, str]:
    """A folder: a.jsonl (small records), b.txt (30k characters, with a byte-order mark), c.txt (small)."""
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": _text(i, 300)}) + "\n" for i in range(5)), "utf-8")
    big = _text(99, 30_000)
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbf" + big.encode("utf-8"))
    (tmp_path / "c.txt").write_text(_text(7, 800), "utf-8")
    return str(tmp_path), big


def _iterator(tok: Tokenizer, path: str) -> PackedIterator:
    layout = BatchLayout(global_batch_size=GBS, local_batch_size=GBS, dp_rank=0, dp_degree=1)
    return PackedIterator(source=LocalSource(path, "text"), tokenizer=tok, seq_len=SEQ, layout=layout, infinite=True)


def _run(it: PackedIterator, steps: int) -> list[torch.Tensor]:
    return [torch.cat([inputs, labels[:, -1:]], dim=1) for inputs, labels in (next(it) for _ in range(steps))]


def test_a_long_txt_is_read_in_pieces_with_the_tokens_of_the_whole(tok, corpus, monkeypatch):
    folder, big = corpus
    records = list(sources._txt_records(Path(folder) / "b.txt"))
    assert len(records) == -(-len(big) // PIECE) == 20
    assert all(isinstance(r, TextPiece) and len(r) <= PIECE for r in records)
    assert "".join(records) == big  # the byte-order mark is not text; multi-byte characters survive the reads
    assert [(r.bos, r.eos) for r in records] == [(True, False)] + [(False, False)] * 18 + [(False, True)]
    lengths: list[int] = []
    encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, **kw: (lengths.append(len(text)), encode(text, **kw))[1])
    pieces = [t for r in records for t in _tokens(tok, r)]
    assert max(lengths) == PIECE  # never the whole document at once
    assert pieces == encode(big, bos=True, eos=True)
    # A file of at most one piece is one plain record, unread until needed.
    assert list(sources._txt_records(Path(folder) / "c.txt")) == [_text(7, 800)]


def test_the_stream_and_its_resumes_are_those_of_whole_documents(tok, corpus, monkeypatch):
    folder, _ = corpus
    pieces = _run(_iterator(tok, folder), STEPS)
    with monkeypatch.context() as m:
        whole_documents(m)
        reference = _run(_iterator(tok, folder), STEPS)
    assert all(torch.equal(a, b) for a, b in zip(pieces, reference, strict=True))
    straight = _iterator(tok, folder)
    for step in range(STEPS - 1):
        next(straight)
        if step % 3:
            continue
        state = straight.state_dict()
        resumed = _iterator(tok, folder)
        resumed.load_state_dict(state)
        rest = _run(resumed, STEPS - step - 1)
        assert all(torch.equal(a, b) for a, b in zip(rest, reference[step + 1:], strict=True)), f"after step {step + 1}"


@pytest.mark.parametrize("kept", ["tail", "buffer"])
def test_positions_saved_before_pieces_are_converted(tok, corpus, monkeypatch, kept):
    """A checkpoint of an older version counted each .txt file as one record (and, older still, stored
    the unread tokens themselves): it resumes at the same token under pieces."""
    folder, _ = corpus
    with monkeypatch.context() as m:
        whole_documents(m)
        old = _iterator(tok, folder)
        states, reference = [], []
        for _ in range(STEPS):
            reference += _run(old, 1)
            state = old.state_dict()
            del state["txt_piece_chars"]
            states.append(state)
        docs = list(LocalSource(folder, "text").documents(0, 0))
    inside_the_long_one = 0
    for step, state in enumerate(states[:-1]):
        if kept == "buffer" and state["tail"]:
            whole = tok.encode(docs[state["doc_index"] - 1], bos=True, eos=True)
            state = {**state, "buffer": whole[len(whole) - state.pop("tail"):]}
        inside_the_long_one += state["doc_index"] == 6 and (state.get("tail") or state.get("buffer")) is not None
        resumed = _iterator(tok, folder)
        resumed.load_state_dict(state)
        rest = _run(resumed, STEPS - step - 1)  # on to the end: a buffer reaches the next record late
        assert all(torch.equal(a, b) for a, b in zip(rest, reference[step + 1:], strict=True)), f"after step {step + 1}"
    assert inside_the_long_one > 5  # positions inside b.txt (record 6: after a.jsonl's 5) were converted


def test_a_position_counting_other_pieces_is_refused(tok, corpus):
    folder, _ = corpus
    it = _iterator(tok, folder)
    _run(it, 3)
    state = {**it.state_dict(), "txt_piece_chars": 2 * PIECE}
    with pytest.raises(DataError, match=r"positions count \.txt pieces of 3000 characters, this version reads pieces "
                                        r"of 1500: .*checkpoint\.exclude_from_loading"):
        _iterator(tok, folder).load_state_dict(state)


def test_invalid_utf8_in_a_long_txt_names_its_line(tmp_path):
    path = tmp_path / "big.txt"
    path.write_bytes(("line\n" * 1000).encode() + b"bad \xff byte\n" + b"more\n" * 1000)
    with pytest.raises(DataError, match=r"big\.txt:1001: invalid UTF-8 \(invalid start byte at byte 5004\)"):
        list(LocalSource(str(path), "text").documents(0, 0))


def test_the_training_loader_resumes_inside_a_split_document(tok, corpus):
    """Through build_dataloader (StatefulDataLoader and its nested state), as the trainer checkpoints it."""
    from torchtitan_like.config.schema import Training
    from torchtitan_like.data import build_dataloader

    folder, _ = corpus

    def loader():
        training = Training(dataset="local", dataset_path=folder, local_batch_size=2, global_batch_size=GBS, seq_len=SEQ)
        return build_dataloader(training=training, tokenizer=tok, vocab_size=2000, dp_rank=0, dp_degree=1, seed=0)

    straight = loader()
    it = iter(straight)
    for _ in range(2 * 12):  # 12 steps of 2 microbatches: inside b.txt
        next(it)
    state = straight.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    rest = iter(resumed)
    for _ in range(2 * 20):  # on through b.txt's later pieces, c.txt and into the next epoch
        a, b = next(it), next(rest)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("read_bytes, content, line, byte", [
    # A character cut by a read, then a bad byte: the position is the bad byte's, not the cut's.
    (4, b"ab" + "日".encode() + b"\xff\n" + b"y\n" * 1000, 1, 5),
    # A byte-order mark first (not text): positions still count it.
    (1 << 20, b"\xef\xbb\xbf" + b"a\n\xff" + b"x" * 2000, 2, 5),
    # The file ends inside a character: where that character starts.
    (64, b"z" * 2000 + b"\xe6\x97", 1, 2000),
], ids=["character-cut-by-a-read", "byte-order-mark", "cut-at-the-end"])
def test_invalid_utf8_positions_in_a_long_txt(tmp_path, monkeypatch, read_bytes, content, line, byte):
    monkeypatch.setattr(sources, "_READ_BYTES", read_bytes)
    path = tmp_path / "big.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"big\.txt:{line}: invalid UTF-8 \(.* at byte {byte}\)"):
        list(LocalSource(str(path), "text").documents(0, 0))
    # The whole-file path (a short file) says the same for a byte-order mark first.
    path.write_bytes(b"\xef\xbb\xbf" + b"a\n\xff")
    with pytest.raises(DataError, match=r"big\.txt:2: invalid UTF-8 \(.* at byte 5\)"):
        list(LocalSource(str(path), "text").documents(0, 0))


def test_a_long_txt_of_whitespace_is_a_blank_document(tok, tmp_path):
    """Blank documents are skipped; a long one was split into pieces, which have no bos and eos
    together, and trained as [bos] whitespace [eos]."""
    (tmp_path / "a.txt").write_text(" \n\t" * 2000, "utf-8")
    source = LocalSource(str(tmp_path), "text")
    assert [_tokens(tok, r) for r in source.documents(0, 0)] == [[]]
    it = _iterator(tok, str(tmp_path))
    with pytest.raises(DataError, match="the dataset is empty"):
        next(it)
    # Whitespace first, then text: split as usual, with the tokens of the whole.
    text = " " * 2000 + _text(3, 4000)
    (tmp_path / "a.txt").write_text(text, "utf-8")
    records = list(source.documents(0, 0))
    assert len(records) > 1 and [t for r in records for t in _tokens(tok, r)] == tok.encode(text, bos=True, eos=True)


def test_a_position_saved_with_smaller_pieces_is_refused_even_where_nothing_splits_now(tok, corpus, monkeypatch):
    folder, _ = corpus
    it = _iterator(tok, folder)
    _run(it, 3)
    state = {**it.state_dict(), "txt_piece_chars": PIECE // 3}  # saved by a version with smaller pieces
    monkeypatch.setattr(sources, "TXT_PIECE_CHUNKS", 1000)  # this version splits nothing in the corpus
    with pytest.raises(DataError, match=r"positions count \.txt pieces of 500 characters"):
        _iterator(tok, folder).load_state_dict(state)
