"""Data: packing, DP-layout independence of the global batch stream, resumable state, sources, errors."""

from __future__ import annotations

import io
import json
import logging
import random
import re
import sys
from pathlib import Path

import pytest
import torch

from torchtitan_like.components.tokenizer import Tokenizer, build_tokenizer
from torchtitan_like.config.schema import Training
from torchtitan_like.data import build_dataloader, global_batch_size, grad_accum_steps
from torchtitan_like.data.dataset import BatchLayout, PackedIterator
from torchtitan_like.data.sources import EMBEDDED_EXCLUDED_DIRS, EmbeddedSource, LocalSource, synthetic_sample
from torchtitan_like.errors import ConfigError, DataError

SEQ = 16
GBS = 8


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return build_tokenizer("")


@pytest.fixture(scope="module")
def docs() -> list[str]:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "(x)", "héllo", "日本", "\n", "    "]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(30)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, docs) -> str:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return str(path)


def stream_windows(tok: Tokenizer, docs: list[str], epochs: int = 1) -> torch.Tensor:
    """The reference: [bos] doc [eos] for every document, concatenated, cut into seq_len + 1 windows."""
    tokens = [t for _ in range(epochs) for d in docs for t in tok.encode(d, bos=True, eos=True)]
    n = len(tokens) // (SEQ + 1)
    return torch.tensor(tokens[: n * (SEQ + 1)]).view(n, SEQ + 1)


def make_training(path: str | None, **kw) -> Training:
    kw = {"local_batch_size": 2, "global_batch_size": GBS, "seq_len": SEQ, "dataset": "local", **kw}
    return Training(dataset_path=path, **kw)


def make_loader(training: Training, tok: Tokenizer | None, *, rank: int = 0, dp: int = 1, **kw):
    return build_dataloader(training=training, tokenizer=tok, vocab_size=2000, dp_rank=rank, dp_degree=dp, seed=0, **kw)


def samples(micro: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(inputs, labels) -> the (local_bs, seq_len + 1) windows they came from."""
    inputs, labels = micro
    return torch.cat([inputs, labels[:, -1:]], dim=1)


def global_batches(training: Training, tok, dp: int, steps: int, state: dict | None = None) -> list[torch.Tensor]:
    """Run every rank of a dp-way layout for `steps` steps and reassemble the global batches."""
    accum = grad_accum_steps(training, dp)
    per_rank = []
    for rank in range(dp):
        loader = make_loader(training, tok, rank=rank, dp=dp)
        if state is not None:
            loader.load_state_dict(state)
        it = iter(loader)
        per_rank.append([samples(next(it)) for _ in range(steps * accum)])
    return [
        torch.cat([torch.cat(per_rank[r][s * accum : (s + 1) * accum]) for r in range(dp)]) for s in range(steps)
    ]


def test_packing_is_the_token_stream(tok, docs, corpus):
    it = iter(make_loader(make_training(corpus), tok))
    inputs, labels = next(it)
    assert inputs.shape == labels.shape == (2, SEQ) and inputs.dtype == labels.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], labels[:, :-1])  # labels are inputs shifted by one
    assert inputs[0, 0] == tok.bos_id  # the stream starts with a document
    got = torch.cat([samples((inputs, labels))] + [samples(next(it)) for _ in range(11)])
    expected = stream_windows(tok, docs)[:24]
    assert torch.equal(got, expected)
    assert (got == tok.bos_id).any() and (got == tok.eos_id).any()


@pytest.mark.parametrize("dp, local_bs", [(1, 2), (1, 8), (2, 2), (2, 1), (4, 2), (4, 1)])
def test_global_batches_do_not_depend_on_dp(tok, docs, corpus, dp, local_bs):
    training = make_training(corpus, local_batch_size=local_bs)
    got = global_batches(training, tok, dp, steps=5)
    expected = stream_windows(tok, docs)[: 5 * GBS].view(5, GBS, SEQ + 1)
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))


def test_state_identical_across_ranks_at_step_boundaries(tok, corpus):
    training = make_training(corpus, local_batch_size=1)
    dp = 4
    loaders = [make_loader(training, tok, rank=r, dp=dp) for r in range(dp)]
    iters = [iter(loader) for loader in loaders]
    for _ in range(3):
        for it in iters:
            for _ in range(grad_accum_steps(training, dp)):
                next(it)
        states = [ldr.state_dict() for ldr in loaders]
        assert all(s == states[0] for s in states[1:])
        assert states[0]["fetcher_state"]["dataset_iter_state"]["micro_index"] == 0


@pytest.mark.parametrize("k", [0, 1, 4, 5, 11])  # step boundaries (accum 4) and mid-step
def test_resume_after_k_microbatches(tok, corpus, k):
    training = make_training(corpus)
    old = make_loader(training, tok)
    it = iter(old)
    for _ in range(k):
        next(it)
    buf = io.BytesIO()
    torch.save(old.state_dict(), buf)  # plain Python values: loads with weights_only
    buf.seek(0)
    new = make_loader(training, tok)
    new.load_state_dict(torch.load(buf, weights_only=True))
    resumed = iter(new)
    for _ in range(30):  # crosses an epoch boundary
        a, b = next(it), next(resumed)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("new_dp, local_bs", [(1, 8), (4, 1), (8, 1)])
def test_resume_with_another_dp_degree(tok, docs, corpus, new_dp, local_bs):
    old_training = make_training(corpus)
    old = [make_loader(old_training, tok, rank=r, dp=2) for r in range(2)]
    for loader in old:
        it = iter(loader)
        for _ in range(3 * grad_accum_steps(old_training, 2)):
            next(it)
    state = old[1].state_dict()
    assert state == old[0].state_dict()
    got = global_batches(make_training(corpus, local_batch_size=local_bs), tok, new_dp, steps=4, state=state)
    expected = stream_windows(tok, docs, epochs=2)[3 * GBS : 7 * GBS].view(4, GBS, SEQ + 1)
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))


def test_mid_step_state_needs_the_same_layout(tok, corpus):
    old = make_loader(make_training(corpus), tok)  # 4 microbatches per step
    next(iter(old))
    new = make_loader(make_training(corpus), tok, rank=0, dp=4)  # 1 microbatch per step
    new.load_state_dict(old.state_dict())
    with pytest.raises(DataError, match="1 microbatches into a global batch.*same layout"):
        iter(new)


def test_a_synthetic_state_resumed_with_documents_is_a_clear_error(tok, corpus):
    synthetic = make_loader(make_training(None, dataset="synthetic"), None)
    next(iter(synthetic))
    packed = make_loader(make_training(corpus), tok)
    packed.load_state_dict(synthetic.state_dict())
    with pytest.raises(DataError, match="holds no document position .*exclude_from_loading"):
        next(iter(packed))  # once a KeyError: 'epoch'


def test_an_embedded_position_resumed_under_another_seed_is_refused(tok):
    """The embedded corpus's document order is drawn from debug.seed: its position under another seed is
    another document (a resume went on in the other order, unless a tail check happened to fail)."""
    def embedded(seed: int):
        return build_dataloader(training=make_training(None, dataset="embedded"), tokenizer=tok, vocab_size=2000,
                                dp_rank=0, dp_degree=1, seed=seed)

    first = embedded(0)
    next(iter(first))
    same, other = embedded(0), embedded(1)
    same.load_state_dict(first.state_dict())
    next(iter(same))
    other.load_state_dict(first.state_dict())
    with pytest.raises(DataError, match=r"in the order of debug.seed=0, this run draws it with debug.seed=1: resume "
                                        r"with the same debug.seed"):
        next(iter(other))


def test_epochs_infinite_and_finite(tok, docs, corpus, caplog):
    training = make_training(corpus)
    n_steps = len(stream_windows(tok, docs)) // GBS
    finite = list(make_loader(training, tok, infinite=False))
    assert len(finite) == n_steps * 4  # the incomplete last global batch is dropped
    with caplog.at_level(logging.INFO, logger="torchtitan_like.data.dataset"):
        got = global_batches(training, tok, 1, steps=3 * n_steps)
    expected = stream_windows(tok, docs, epochs=4)[: 3 * n_steps * GBS]
    assert torch.equal(torch.cat(got), expected)  # leftover tokens carry over into the next epoch
    assert "starting epoch 1" in caplog.text and "starting epoch 2" in caplog.text


class CountingTokenizer(Tokenizer):
    def __init__(self, base: Tokenizer) -> None:
        self.__dict__.update(base.__dict__)
        self.calls = 0

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        self.calls += 1
        return super().encode(text, bos=bos, eos=eos)


def test_resume_skips_documents_without_tokenizing(tok, corpus):
    training = make_training(corpus, local_batch_size=8)  # one microbatch per step
    old = make_loader(training, tok)
    it = iter(old)
    for _ in range(6):
        next(it)
    state = old.state_dict()
    doc_index = state["fetcher_state"]["dataset_iter_state"]["doc_index"]
    counting = CountingTokenizer(tok)
    new = make_loader(training, counting)
    new.load_state_dict(state)
    assert torch.equal(next(iter(new))[0], next(it)[0])
    assert doc_index > 15 and counting.calls < 10


class CountingSource:
    """Counts the records a source goes through: skipped to reach `start`, then handed out."""

    def __init__(self, inner) -> None:
        self.inner, self.scanned = inner, 0

    def documents(self, epoch: int, start: int):
        self.scanned += start
        for doc in self.inner.documents(epoch, start):
            self.scanned += 1
            yield doc


def test_documents_are_read_once(tok, corpus):
    source = CountingSource(LocalSource(corpus, "text"))
    layout = BatchLayout(global_batch_size=GBS, local_batch_size=2, dp_rank=1, dp_degree=2)
    it = PackedIterator(source=source, tokenizer=tok, seq_len=SEQ, layout=layout, infinite=True)
    for _ in range(6 * 2):
        next(it)
    assert 10 < it.state_dict()["doc_index"] == source.scanned  # not re-read from the start every step


def test_local_layouts(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.jsonl").write_text('{"text": "two"}\n\n{"text": "three"}\n', encoding="utf-8")
    (tmp_path / "a.txt").write_text("one\nstill one", encoding="utf-8")
    (tmp_path / "c.json").write_text('[{"text": "four"}, {"text": "five"}]', encoding="utf-8")
    (tmp_path / "d.json").write_text('{"text": "six"}', encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    everything = ["one\nstill one", "two", "three", "four", "five", "six"]
    assert list(LocalSource(str(tmp_path), "text").documents(0, 0)) == everything
    assert list(LocalSource(str(tmp_path), "text").documents(0, 2)) == everything[2:]
    assert list(LocalSource(str(tmp_path / "*.json"), "text").documents(0, 0)) == ["four", "five", "six"]
    assert list(LocalSource(str(tmp_path / "**" / "*.jsonl"), "text").documents(0, 0)) == ["two", "three"]
    (tmp_path / "e.jsonl").write_text('{"content": "seven"}\n', encoding="utf-8")
    assert list(LocalSource(str(tmp_path / "e.jsonl"), "content").documents(0, 0)) == ["seven"]


def test_embedded_source(tok):
    src = EmbeddedSource(seed=0)
    assert len(src.files) > 100 and src.files == sorted(src.files)
    assert not any(set(Path(f).parts[:-1]) & EMBEDDED_EXCLUDED_DIRS for f in src.files)
    first = [next(EmbeddedSource(seed).documents(epoch, 0)) for seed, epoch in [(0, 0), (0, 1), (1, 0)]]
    assert first[0] != first[1] and first[1] == first[2]  # order = Random(seed + epoch)
    training = Training(local_batch_size=2, global_batch_size=4, seq_len=32, dataset="embedded")
    old = make_loader(training, tok)
    it = iter(old)
    inputs, _ = next(it)
    assert inputs.shape == (2, 32) and inputs[0, 0] == tok.bos_id and int(inputs.max()) < tok.vocab_size
    next(it)
    new = make_loader(training, tok)
    new.load_state_dict(old.state_dict())
    assert torch.equal(next(iter(new))[0], next(it)[0])


def test_synthetic(tok):
    training = Training(local_batch_size=2, global_batch_size=8, seq_len=SEQ, dataset="synthetic")
    a = global_batches(training, None, 1, steps=3)
    assert all(torch.equal(x, y) for x, y in zip(a, global_batches(training, None, 4, steps=3), strict=True))
    assert torch.equal(a[1][3], synthetic_sample(0, 1 * GBS + 3, SEQ + 1, 2000))
    assert int(torch.cat(a).min()) >= 0 and int(torch.cat(a).max()) < 2000
    assert not torch.equal(synthetic_sample(0, 0, SEQ + 1, 2000), synthetic_sample(1, 0, SEQ + 1, 2000))
    old = make_loader(training, None)
    it = iter(old)
    for _ in range(5):
        next(it)
    new = make_loader(training, None)
    new.load_state_dict(old.state_dict())
    assert torch.equal(next(iter(new))[0], next(it)[0])


# ---- every user-facing error ----


def first_batch(path: str | Path):
    return next(iter(make_loader(make_training(str(path)), build_tokenizer(""))))


def test_missing_path(tmp_path, tok):
    with pytest.raises(DataError, match=r"training.dataset_path='.*nope.jsonl': no such file or directory"):
        make_loader(make_training(str(tmp_path / "nope.jsonl")), tok)


def test_no_matching_files(tmp_path, tok):
    with pytest.raises(DataError, match="no .txt/.jsonl/.json files match this glob"):
        make_loader(make_training(str(tmp_path / "*.jsonl")), tok)
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(DataError, match=r"directory holds no .txt/.jsonl/.json files"):
        make_loader(make_training(str(tmp_path)), tok)
    with pytest.raises(DataError, match=r"readme.md': unsupported file type"):
        make_loader(make_training(str(tmp_path / "readme.md")), tok)


@pytest.mark.parametrize("dataset", ["local", "hf"])
def test_path_required(dataset, tok):
    with pytest.raises(ConfigError, match=f"training.dataset = '{dataset}' needs training.dataset_path"):
        make_loader(make_training(None, dataset=dataset), tok)


def test_empty_dataset(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"text": ""}\n{"text": "   "}\n\n', encoding="utf-8")
    with pytest.raises(DataError, match="the dataset is empty"):
        first_batch(path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="the dataset is empty"):
        first_batch(tmp_path / "empty.txt")


def test_invalid_utf8_names_file_and_line(tmp_path):
    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"line one\nline two\nbad \xff byte\n")
    with pytest.raises(DataError, match=r"bad.txt:3: invalid UTF-8"):
        first_batch(txt)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "\xc3\x28"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid UTF-8"):
        first_batch(jsonl)


def test_invalid_json_names_file_and_line(tmp_path):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "ok"}\n\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:3: invalid JSON"):
        first_batch(jsonl)
    js = tmp_path / "bad.json"
    js.write_text('[\n{"text": "ok"},\n{"text" "x"}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.json:3: invalid JSON"):
        first_batch(js)


def test_text_field_problems(tmp_path):
    path = tmp_path / "fields.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"fields.jsonl:2: record has no field 'text' \(training.dataset_text_fi"):
        first_batch(path)
    path.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"fields.jsonl:1: field 'text' is int, not a string"):
        first_batch(path)
    path.write_text('["a list"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"fields.jsonl:1: expected a JSON object"):
        first_batch(path)
    js = tmp_path / "fields.json"
    js.write_text('[{"text": "a"}, {"txt": "b"}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"fields.json: record 1: record has no field 'text'"):
        first_batch(js)


def test_hf_without_datasets(monkeypatch, tok):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    expected = "training.dataset = 'hf' needs the `datasets` package: pip install datasets"
    with pytest.raises(DataError, match=f"^{re.escape(expected)}$"):
        make_loader(make_training("some/dataset", dataset="hf"), tok)


class FakeStream:
    """Stands in for a streaming HF dataset: iterable, with .skip(n)."""

    def __init__(self, records: list[dict]) -> None:
        self.records = records

    def skip(self, n: int) -> FakeStream:
        return FakeStream(self.records[n:])

    def __iter__(self):
        return iter(self.records)


def test_hf_source_with_a_fake_hub(monkeypatch, tok, docs):
    calls = []

    def load_dataset(path, *, name, split, streaming):
        calls.append((path, name, split, streaming))
        if path == "org/several" and name is None:
            raise ValueError("Config name is missing. Please pick one among the available configs: ['en', 'de']")
        return FakeStream([{"text": d} for d in docs])

    monkeypatch.setitem(sys.modules, "datasets", type(sys)("datasets"))
    monkeypatch.setattr(sys.modules["datasets"], "load_dataset", load_dataset, raising=False)
    training = make_training("org/name", dataset="hf", dataset_split="validation")
    got = global_batches(training, tok, 2, steps=2)
    assert calls[0] == ("org/name", None, "validation", True)
    assert torch.equal(torch.cat(got), stream_windows(tok, docs)[: 2 * GBS])
    old = make_loader(training, tok)
    it = iter(old)
    for _ in range(9):
        next(it)
    new = make_loader(training, tok)
    new.load_state_dict(old.state_dict())  # resumes through .skip(doc_index)
    assert torch.equal(next(iter(new))[0], next(it)[0])
    # A dataset with several configurations: the error says which key names one; the key reaches the hub.
    several = make_training("org/several", dataset="hf")
    with pytest.raises(DataError, match=r"split 'train': cannot load \(Config name is missing.*\); if it has several "
                                        r"configurations, name one in training.dataset_config"):
        next(iter(make_loader(several, tok)))
    next(iter(make_loader(make_training("org/several", dataset="hf", dataset_config="en"), tok)))
    assert calls[-1] == ("org/several", "en", "train", True)
    monkeypatch.setattr(sys.modules["datasets"], "load_dataset", lambda *a, **k: FakeStream([{"body": "x"}]))
    with pytest.raises(DataError, match=r"HF record 0: no string field 'text' \(training.dataset_text_field\)"):
        next(iter(make_loader(training, tok)))


def test_global_batch_size_rules():
    assert global_batch_size(Training(local_batch_size=4, global_batch_size=-1), 2) == 8
    assert grad_accum_steps(Training(local_batch_size=2, global_batch_size=16), 2) == 4
    with pytest.raises(ConfigError) as exc:
        grad_accum_steps(Training(local_batch_size=8, global_batch_size=20), 2)
    msg = str(exc.value)
    assert "training.global_batch_size=20" in msg and "training.local_batch_size=8" in msg
    assert "data-parallel degree 2 = 16" in msg and "try training.global_batch_size=16 or 32" in msg
    assert "training.local_batch_size in [1, 2, 5, 10]" in msg
    with pytest.raises(ConfigError, match="try training.global_batch_size=12;"):
        make_loader(Training(local_batch_size=3, global_batch_size=6, dataset="synthetic"), None, rank=0, dp=4)


def test_hub_keys_of_a_source_that_is_not_the_hub_are_named():
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.config.validate import ignored_settings

    cfg = load_config(["--training.dataset_config", "en", "--validation.enable", "--validation.dataset", "synthetic",
                       "--validation.steps", "1", "--validation.dataset_split", "test"])
    got = ignored_settings(cfg, pp=1)
    assert 'training.dataset_config (training.dataset="embedded", not hf)' in got
    assert 'validation.dataset_split (validation.dataset="synthetic", not hf)' in got
    hub = load_config(["--training.dataset", "hf", "--training.dataset_path", "org/x", "--training.dataset_config", "en"])
    assert not [s for s in ignored_settings(hub, pp=1) if "dataset" in s]
