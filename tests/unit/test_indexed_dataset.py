"""training.dataset = "indexed": pre-tokenized PREFIX.bin + PREFIX.idx (Megatron-LM's layout), written by
tools/pretokenize.py. The same batches as the source it was tokenized from, under any data-parallel
degree; exact resume; wrap-around; the file layout byte for byte; and one-line errors for bad data."""

from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch

from torchtitan_like.components.tokenizer import Tokenizer, build_tokenizer
from torchtitan_like.config.schema import Training, Validation
from torchtitan_like.data import build_dataloader
from torchtitan_like.data.indexed import IndexedTokens, write_indexed
from torchtitan_like.errors import ConfigError, DataError

from test_data_state_and_sources import corpus  # noqa: F401  (a fixture: 40 .jsonl documents)

ROOT = Path(__file__).resolve().parents[2]
SEQ, GBS, VOCAB = 16, 8, 2000


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return build_tokenizer("")


def pretokenize(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "tools/pretokenize.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def _tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretokenize", ROOT / "tools/pretokenize.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.fixture(scope="module")
def prefix(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("indexed") / "sub" / "docs"
    r = pretokenize("--out", str(out), "--job.config_file", str(ROOT / "train_configs/debug_model.toml"),
                    "--training.dataset", "local", "--training.dataset_path", str(corpus))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{out}.bin + .idx + .json: 40 records, "), r.stdout
    assert 'training.dataset_path = "' in r.stdout, r.stdout
    return out


def loader(dataset: str, path: Path, *, rank: int = 0, dp: int = 1, **kw):
    training = Training(dataset=dataset, dataset_path=str(path), local_batch_size=2, global_batch_size=GBS, seq_len=SEQ)
    return build_dataloader(training=training, tokenizer=build_tokenizer(""), vocab_size=VOCAB, dp_rank=rank,
                            dp_degree=dp, seed=0, **kw)


def batches(dl, n: int) -> list[torch.Tensor]:
    return [torch.cat([x, y[:, -1:]], dim=1) for x, y in islice(iter(dl), n)]


def assert_resumes_under_dp2(make, whole: torch.Tensor, total: int, at: int = 3) -> dict:
    """A loader state taken `at` global batches into a dp-1 run, loaded by both ranks of dp 2, continues
    `whole` (that run's samples) exactly; returns the state. make(rank=, dp=) builds a loader."""
    first = make(rank=0, dp=1)
    it = iter(first)
    for _ in range(at * GBS // 2):
        next(it)
    state = first.state_dict()
    got = []
    for rank in range(2):
        resumed = make(rank=rank, dp=2)
        resumed.load_state_dict(state)
        got.append(batches(resumed, (total - at) * GBS // 4))
    for g in range(total - at):
        expect = whole[(at + g) * GBS : (at + 1 + g) * GBS]
        assert torch.equal(torch.cat(got[0][2 * g : 2 * g + 2] + got[1][2 * g : 2 * g + 2]), expect), g
    return state


def test_the_idx_is_megatrons_layout_and_the_bin_the_packers_stream(prefix, corpus, tok):
    lines = Path(corpus).read_text().splitlines()
    records = [tok.encode(json.loads(line)["text"], bos=True, eos=True) for line in lines]
    idx = Path(f"{prefix}.idx").read_bytes()
    magic, version, code, n_seq, n_doc = struct.unpack_from("<9sQBQQ", idx)
    assert (magic, version, code, n_seq, n_doc) == (b"MMIDIDX\x00\x00", 1, 8, 40, 41)  # 8 = uint16
    off = 34
    lengths = list(struct.unpack_from(f"<{n_seq}i", idx, off))
    pointers = list(struct.unpack_from(f"<{n_seq}q", idx, off + 4 * n_seq))
    documents = list(struct.unpack_from(f"<{n_doc}q", idx, off + 12 * n_seq))
    assert len(idx) == off + 12 * n_seq + 8 * n_doc
    assert lengths == [len(r) for r in records]
    assert pointers == [2 * sum(lengths[:i]) for i in range(n_seq)] and documents == list(range(41))
    stream = [t for r in records for t in r]
    assert list(struct.unpack(f"<{len(stream)}H", Path(f"{prefix}.bin").read_bytes())) == stream


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_the_same_batches_as_the_source_under_any_data_parallel_degree(prefix, corpus, dp):
    n = 5  # global batches: 5 x 8 x 17 tokens, within the first epoch
    want = batches(loader("local", corpus), n * GBS // 2)  # dp 1: 4 microbatches of 2 per global batch
    for rank in range(dp):
        got = batches(loader("indexed", prefix, rank=rank, dp=dp), n * GBS // (2 * dp))
        per = GBS // (2 * dp)  # this rank's microbatches per global batch
        for g in range(n):
            mine = torch.cat(got[g * per : (g + 1) * per])
            whole = torch.cat(want[g * (GBS // 2) : (g + 1) * (GBS // 2)])
            assert torch.equal(mine, whole[rank * GBS // dp : (rank + 1) * GBS // dp]), (dp, rank, g)


def test_a_resume_continues_exactly_under_another_degree_and_past_the_end(prefix, caplog):
    n_tokens = IndexedTokens(str(prefix), section="training").n_tokens
    per_batch = GBS * (SEQ + 1)
    total = n_tokens // per_batch + 3  # global batches: past the end of the stream, into epoch 1
    whole = torch.cat(batches(loader("indexed", prefix), total * GBS // 2))
    # Sample i is tokens [17 i, 17 i + 17) of the stream, modulo its length.
    stream = IndexedTokens(str(prefix), section="training").read(0, n_tokens)
    assert torch.equal(whole.flatten(), torch.cat([stream] * 2)[: whole.numel()])  # (less than 2 epochs)
    bin_path = prefix.with_suffix(".bin")  # (PREFIX.bin names the dataset too)
    assert_resumes_under_dp2(lambda rank, dp: loader("indexed", bin_path, rank=rank, dp=dp), whole, total)
    caplog.clear()  # this block's records only (with the root logger at DEBUG, the loaders above logged too)
    with caplog.at_level(logging.INFO, logger="torchtitan_like.data.indexed"):
        batches(loader("indexed", prefix), total * GBS // 2)
    opened, *epochs = [r.getMessage() for r in caplog.records]
    assert opened == (f"data: {prefix}.bin, {n_tokens} tokens in 40 sequences (uint16), "
                      f"{n_tokens / per_batch:.1f} global batches of 8 x 17 per epoch")
    assert epochs == [f"data: {prefix}.bin read to its end, starting epoch 1"]


def test_validation_reads_it_once_and_drops_the_incomplete_last_batch(prefix):
    from torchtitan_like.components.validation import build_validation_dataset

    cfg = Validation(enable=True, dataset="indexed", dataset_path=str(prefix), local_batch_size=2,
                     global_batch_size=GBS, seq_len=SEQ)
    data = build_validation_dataset(cfg, tokenizer=None, vocab_size=VOCAB, text_field="text", dp_rank=0, dp_degree=1,
                                    seed=0)
    n_tokens = IndexedTokens(str(prefix), section="validation").n_tokens
    assert len(list(iter(data))) == n_tokens // (GBS * (SEQ + 1)) * GBS // 2


def _state_after_one_batch(dl) -> dict:
    next(iter(dl))
    return dl.state_dict()


def _with_tokens(state: dict, n: list[int]) -> dict:
    fetcher = state["fetcher_state"]
    return {**state, "fetcher_state": {**fetcher, "dataset_iter_state": {**fetcher["dataset_iter_state"],
                                                                         "indexed_tokens": n}}}


def test_a_checkpoint_of_another_dataset_or_of_other_data_is_refused(prefix, corpus):
    state = _state_after_one_batch(loader("indexed", prefix))
    local = _state_after_one_batch(loader("local", corpus))
    cases = [
        ("indexed", prefix, local, "not a position in an indexed dataset .*exclude_from_loading"),
        ("indexed", prefix, _with_tokens(state, [12]),
         r"indexed data of \[12\] tokens with weights \[1.0\], but .*docs.bin hold \[\d+\] with weights \[1.0\]: "
         r"the data or the blend changed since the checkpoint"),
        ("local", corpus, state, "holds no document position .*indexed dataset"),
    ]
    for dataset, path, saved, message in cases:
        dl = loader(dataset, path)
        dl.load_state_dict(saved)
        with pytest.raises(DataError, match=message):
            next(iter(dl))  # (the loader applies a loaded state when it starts iterating)


def _write(path: Path, records: list[list[int]], vocab: int = VOCAB, meta: dict | None = None) -> Path:
    write_indexed(path, records, vocab_size=vocab, meta=meta)
    return path


def test_bad_data_is_one_error_naming_the_file(tmp_path):
    good = _write(tmp_path / "good", [[1, 2, 3] * 20, [4, 5] * 30])
    with pytest.raises(DataError, match=r"missing.idx does not exist; an indexed dataset is the pair PREFIX.bin \+ "
                                         r"PREFIX.idx \(set the path to PREFIX; write them with tools/pretokenize.py"):
        IndexedTokens(str(tmp_path / "missing"), section="training")
    (tmp_path / "junk.idx").write_bytes(b"not an index at all, longer than its header")
    (tmp_path / "junk.bin").write_bytes(b"")
    with pytest.raises(DataError, match=r"junk.idx is not an indexed-dataset index \(it does not start with"):
        IndexedTokens(str(tmp_path / "junk"), section="training")
    idx = Path(f"{good}.idx").read_bytes()
    for name, data, message in [
        ("float", idx[:17] + bytes([6]) + idx[18:], "dtype code 6, a float type: token ids must be integers"),
        ("v2", idx[:9] + struct.pack("<Q", 2) + idx[17:], "is index version 2; only version 1 is read"),
        ("cut", idx[:-8], r"holds \d+ bytes, but its header \(2 sequences, 3 document indices\) needs \d+: truncated"),
    ]:
        (tmp_path / f"{name}.idx").write_bytes(data)
        (tmp_path / f"{name}.bin").write_bytes(Path(f"{good}.bin").read_bytes())
        with pytest.raises(DataError, match=message):
            IndexedTokens(str(tmp_path / name), section="training")
    (tmp_path / "none.idx").write_bytes(struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", 1, 8, 0, 1) + bytes(8))
    (tmp_path / "none.bin").write_bytes(b"")
    with pytest.raises(DataError, match="none.idx indexes no sequences: the dataset is empty"):
        IndexedTokens(str(tmp_path / "none"), section="training")
    Path(f"{good}.bin").write_bytes(Path(f"{good}.bin").read_bytes()[:-2])  # one token short
    with pytest.raises(DataError, match=r"good.bin holds 238 bytes, but its index ends the last sequence at byte 240: "
                                         r"truncated, or the two files are from different runs"):
        IndexedTokens(str(good), section="training")


def test_token_ids_outside_the_vocabulary_and_too_little_data_are_refused(tmp_path):
    big = _write(tmp_path / "big", [list(range(1990, 2010)) * 2], vocab=65536)
    with pytest.raises(DataError, match=r"token 2000 at position 10 of .*big.bin is outside the model's vocabulary "
                                         r"\(0..1999\): the data was tokenized with another tokenizer"):
        next(iter(loader("indexed", big)))
    small = _write(tmp_path / "small", [[1] * SEQ])
    with pytest.raises(DataError, match=r"small.bin holds 16 tokens, fewer than one sample of seq_len \+ 1 = 17"):
        loader("indexed", small)
    with pytest.raises(ValueError, match="no tokens: the dataset is empty"):
        write_indexed(tmp_path / "empty", [[], []], vocab_size=VOCAB)
    assert not list(tmp_path.glob("empty*"))  # nothing left behind
    wide = tmp_path / "wide"
    write_indexed(wide, [[70000, 1, 2]], vocab_size=128256)  # int32 where ids pass uint16
    assert struct.unpack_from("<B", Path(f"{wide}.idx").read_bytes(), 17) == (4,)
    assert IndexedTokens(str(wide), section="training").read(0, 5).tolist() == [70000, 1, 2, 70000, 1]


def test_config_and_tool_errors_are_one_line(tmp_path, corpus):
    from torchtitan_like.config.loader import load_config

    with pytest.raises(ConfigError, match=r"training.dataset='indexed' needs training.dataset_path \(.*PREFIX of "
                                          r"PREFIX.bin \+ PREFIX.idx for indexed\)"):
        load_config(["--job.config_file", str(ROOT / "train_configs/debug_model.toml"),
                     "--training.dataset", "indexed"])
    r = pretokenize("--out", str(tmp_path / "x"), "--training.dataset", "synthetic")
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "error: training.dataset='synthetic' has no documents to tokenize: set it to embedded, local or hf (with its "
        "dataset_path)"], r.stderr
    r = pretokenize("--out", str(tmp_path / "x"), "--training.dataset", "local", "--training.dataset_path",
                    str(tmp_path / "nothing.jsonl"))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "nothing.jsonl" in r.stderr, r.stderr
    assert not list(tmp_path.glob("x*"))
    for flag, message in [("--max-tokens", "--max-tokens 0 must be >= 1 (leave it out for the whole dataset)"),
                          ("--workers", "--workers 0 must be >= 1 (e.g. the machine's cores)")]:
        r = pretokenize("--out", str(tmp_path / "x"), flag, "0")
        assert r.returncode == 2 and r.stderr.splitlines()[-1] == f"tools/pretokenize.py: error: {message}", r.stderr
    # A sample of the source: stops at --max-tokens.
    r = pretokenize("--out", str(tmp_path / "s"), "--max-tokens", "100", "--training.dataset", "local",
                    "--training.dataset_path", str(corpus))
    assert r.returncode == 0 and IndexedTokens(str(tmp_path / "s"), section="training").n_tokens == 100, r.stderr


def test_the_trainer_trains_on_it_as_on_its_source_and_validates_on_another(tmp_path, corpus, prefix):
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.trainer import Trainer

    def run(name: str, *data: str) -> list[float]:
        dump = tmp_path / name
        trainer = Trainer(load_config([
            "--job.config_file", str(ROOT / "train_configs/debug_model.toml"), "--job.dump_folder", str(dump),
            "--model.n_layers", "2", "--training.seq_len", "32", "--training.local_batch_size", "2",
            "--training.steps", "3", "--metrics.no_enable_tensorboard", "--metrics.log_freq", "1", *data,
        ]))
        try:
            trainer.train()
        finally:
            trainer.close()
        return [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]

    held_out = _write(tmp_path / "held_out", [[1, 5, 9, 2] * 100])  # one global batch: 8 x 33 tokens
    source = run("local", "--training.dataset", "local", "--training.dataset_path", str(corpus))
    indexed = run("indexed", "--training.dataset", "indexed", "--training.dataset_path", str(prefix),
                  "--validation.enable", "--validation.freq", "3", "--validation.steps", "1", "--validation.dataset",
                  "indexed", "--validation.dataset_path", str(held_out), "--validation.seq_len", "32")
    assert [r["loss"] for r in indexed] == [r["loss"] for r in source] and len(source) == 3
    assert "val_loss" in indexed[-1] and indexed[-1]["val_loss"] > 0
    with pytest.raises(ConfigError, match=r"share 1 file\(s\), e.g. .*docs.bin: the held-out data would be trained on"):
        run("shared", "--training.dataset", "indexed", "--training.dataset_path", str(prefix), "--validation.enable",
            "--validation.dataset", "indexed", "--validation.dataset_path", f"{prefix}.idx")


def test_workers_write_the_same_files(tmp_path):
    lines = [json.dumps({"text": f"record {i} " + "word " * (i % 7)}) for i in range(700)]  # 3 chunks of 256
    (tmp_path / "many.jsonl").write_text("\n".join(lines) + "\n")
    outs = []
    for workers in ("1", "3"):
        out = tmp_path / f"w{workers}"
        r = pretokenize("--out", str(out), "--workers", workers, "--training.dataset", "local",
                        "--training.dataset_path", str(tmp_path / "many.jsonl"))
        assert r.returncode == 0 and ": 700 records, " in r.stdout, r.stderr
        outs.append([Path(f"{out}{s}").read_bytes() for s in (".bin", ".idx", ".json")])
    assert outs[0] == outs[1]


def test_records_keep_their_framing_on_the_way_to_a_worker(tok):
    """A long .txt file's pieces carry bos / eos of their own; a worker gets them as plain values."""
    from torchtitan_like.data.dataset import _tokens
    from torchtitan_like.data.sources import TextPiece

    tool = _tool()
    tool._start_worker("")
    records = [TextPiece("first piece", bos=True, eos=False), TextPiece(" middle", bos=False, eos=False),
               TextPiece(" last", bos=False, eos=True), "a whole document", "   "]
    for record in records:
        assert tool._encode(tool._framed(record)) == _tokens(tok, record), record
    assert tool._encode(tool._framed(records[1])) == tok.encode(" middle", bos=False, eos=False)


# ---- blends: several prefixes with relative weights -------------------------------------------------


def blend_loader(paths: list[Path], weights: list[float], *, rank: int = 0, dp: int = 1):
    training = Training(dataset="indexed", dataset_path=",".join(map(str, paths)), dataset_weights=weights,
                        local_batch_size=2, global_batch_size=GBS, seq_len=SEQ)
    return build_dataloader(training=training, tokenizer=None, vocab_size=VOCAB, dp_rank=rank, dp_degree=dp, seed=0)


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> list[Path]:
    """Two sources told apart by their ids: A in 0..499 (50 windows), B in 1000..1499 (12 windows)."""
    tmp = tmp_path_factory.mktemp("blend")
    a = _write(tmp / "a", [[i % 500 for i in range(50 * (SEQ + 1))]])
    b = _write(tmp / "b", [[1000 + i % 500 for i in range(12 * (SEQ + 1))]])
    return [a, b]


def test_a_blend_takes_each_sources_windows_in_order_at_its_weight(two):
    n = 10  # global batches of 8: 60 samples of A (past its 50 windows) and 20 of B (past its 12)
    samples = torch.cat(batches(blend_loader(two, [3.0, 1.0]), n * GBS // 2))
    from_b = samples[:, 0] >= 1000
    # Weights 3:1 hold exactly after every 4 samples, B's share spread out, not in runs.
    for m in range(1, n * GBS // 4 + 1):
        assert int(from_b[: 4 * m].sum()) == m, m
    assert int(from_b[:4].sum()) == 1 and not bool((from_b[:-1] & from_b[1:]).any())
    stream = {0: IndexedTokens(str(two[0]), section="training"), 1: IndexedTokens(str(two[1]), section="training")}
    for source, rows in ((0, samples[~from_b]), (1, samples[from_b])):
        # The k-th sample of a source is its window k, wrapping past its end.
        want = stream[source].read(0, len(rows) * (SEQ + 1)).view(len(rows), SEQ + 1)
        assert torch.equal(rows, want), source


def test_a_blend_resumes_exactly_under_another_degree_and_refuses_another_blend(two, caplog):
    total = 10
    whole = torch.cat(batches(blend_loader(two, [3.0, 1.0]), total * GBS // 2))
    state = assert_resumes_under_dp2(lambda rank, dp: blend_loader(two, [3.0, 1.0], rank=rank, dp=dp), whole, total)
    other = blend_loader(two, [1.0, 1.0])
    other.load_state_dict(state)
    with pytest.raises(DataError, match=r"with weights \[0.75, 0.25\], but .*a.bin, .*b.bin hold \[850, 204\] with "
                                         r"weights \[0.5, 0.5\]: the data or the blend changed"):
        next(iter(other))
    caplog.clear()  # this block's records only (with the root logger at DEBUG, the loaders above logged too)
    with caplog.at_level(logging.INFO, logger="torchtitan_like.data.indexed"):
        batches(blend_loader(two, [3.0, 1.0]), total * GBS // 2)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:2] == [
        f"data: {two[0]}.bin, 850 tokens in 1 sequences (uint16), weight 0.75, 8.3 global batches of 8 x 17 per epoch",
        f"data: {two[1]}.bin, 204 tokens in 1 sequences (uint16), weight 0.25, 6.0 global batches of 8 x 17 per epoch",
    ]
    # B's 12 windows end exactly at a global batch boundary (batch 6 starts its epoch 1), A's inside batch 8.
    assert messages[2:] == [f"data: {two[1]}.bin read to its end, starting epoch 1",
                            f"data: {two[0]}.bin read to its end, starting epoch 1"]


@pytest.mark.parametrize("path, weights, message", [
    ("a,b", [], r"training.dataset_path names 2 indexed datasets \(a blend\): set training.dataset_weights to their "
                r"relative weights, one each \(e.g. \[1.0, 1.0\]\)"),
    ("a,b", [1.0], r"training.dataset_weights has 1 weight\(s\) for the 2 prefix\(es\) of training.dataset_path='a,b': "
                   "give one weight per prefix"),
    ("a,b", [1.0, 0.0], r"training.dataset_weights=\[1.0, 0.0\] must all be > 0"),
    ("a,,b", [1.0, 1.0, 1.0], "training.dataset_path='a,,b' has an empty entry"),
])
def test_a_blend_that_does_not_add_up_is_a_config_error(path, weights, message):
    from torchtitan_like.config.loader import load_config

    argv = ["--training.dataset", "indexed", "--training.dataset_path", path]
    if weights:
        argv += ["--training.dataset_weights", ",".join(map(str, weights))]
    with pytest.raises(ConfigError, match=message):
        load_config(argv)


def test_weights_and_shuffle_without_an_indexed_dataset_are_named_as_ignored():
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.config.validate import ignored_settings

    cfg = load_config(["--training.dataset_weights", "0.5,0.5", "--training.dataset_shuffle"])
    ignored = ignored_settings(cfg, pp=1)
    assert 'training.dataset_weights (training.dataset="embedded")' in ignored
    assert 'training.dataset_shuffle (training.dataset="embedded")' in ignored


def test_a_text_field_that_no_source_reads_is_named_as_ignored():
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.config.validate import ignored_settings

    field = ["--training.dataset_text_field", "body"]
    indexed = load_config(["--training.dataset", "indexed", "--training.dataset_path", "data/train", *field])
    assert ignored_settings(indexed, pp=1) == [
        'training.dataset_text_field (no local or hf dataset reads records: training.dataset="indexed")'
    ]
    # Validation's local records are read with training's field: then it is used.
    val = ["--validation.enable", "--validation.dataset", "local", "--validation.dataset_path", "val.jsonl"]
    assert ignored_settings(load_config([*field, "--training.dataset", "synthetic", *val]), pp=1) == []
    said = ignored_settings(load_config([*field, "--training.dataset", "synthetic", "--validation.enable"]), pp=1)
    assert said == ['training.dataset_text_field (no local or hf dataset reads records: training.dataset="synthetic", '
                    'validation.dataset="embedded")']


# ---- shuffled reading ---------------------------------------------------------------------------------


def test_the_window_permutation_is_a_bijection_for_every_size():
    from torchtitan_like.data.indexed import window_permutation

    for m in [*range(1, 130), 1000, 4097]:
        for key in (0, 1, 2**63 + 5):
            assert sorted(window_permutation(j, m, key) for j in range(m)) == list(range(m)), (m, key)
    assert [window_permutation(j, 10, 7) for j in range(10)] != list(range(10))


def shuffled_loader(path: Path, *, seed: int = 0, rank: int = 0, dp: int = 1, shuffle: bool = True):
    training = Training(dataset="indexed", dataset_path=str(path), dataset_shuffle=shuffle, local_batch_size=2,
                        global_batch_size=GBS, seq_len=SEQ)
    return build_dataloader(training=training, tokenizer=None, vocab_size=VOCAB, dp_rank=rank, dp_degree=dp,
                            seed=seed)


def test_shuffled_reading_visits_every_window_once_per_epoch_in_a_new_order_and_resumes(two, caplog):
    a = two[0]  # 50 windows of 17 tokens, each with a different first token
    windows = IndexedTokens(str(a), section="training").read(0, 50 * (SEQ + 1)).view(50, SEQ + 1)
    total = 12  # global batches: 96 samples, epoch 0 and 46 windows of epoch 1

    def order(rows: torch.Tensor) -> list[int]:
        return [int((windows == row).all(dim=1).nonzero()) for row in rows]

    caplog.clear()  # this block's records only (with the root logger at DEBUG, the loaders above logged too)
    with caplog.at_level(logging.INFO, logger="torchtitan_like.data.indexed"):
        whole = torch.cat(batches(shuffled_loader(a), total * GBS // 2))
    seen = order(whole)
    assert sorted(seen[:50]) == list(range(50)) and seen[:50] != list(range(50))
    assert len(set(seen[50:])) == 46 and seen[50:] != seen[:46]  # epoch 1: a new order
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].endswith("global batches of 8 x 17 per epoch, shuffled"), messages
    assert f"data: {a}.bin read to its end, starting epoch 1 (in a new order)" in messages
    assert order(torch.cat(batches(shuffled_loader(a, seed=1), GBS // 2))) != seen[:GBS]  # the seed picks it
    state = assert_resumes_under_dp2(lambda rank, dp: shuffled_loader(a, rank=rank, dp=dp), whole, total)
    for kw, message in [({"shuffle": False}, "it read the indexed data shuffled with seed 0, this run reads it in file "
                                             "order: resume with the same training.dataset_shuffle and debug.seed"),
                        ({"seed": 3}, "shuffled with seed 0, this run reads it shuffled with seed 3")]:
        other = shuffled_loader(a, **kw)
        other.load_state_dict(state)
        with pytest.raises(DataError, match=message):
            next(iter(other))


def test_a_shuffled_blend_resumes_from_a_checkpoint_with_the_same_losses(tmp_path, two):
    """The loader state (counts, weights, token counts, seed) goes through a DCP checkpoint and back."""
    import shutil

    from torchtitan_like.config.loader import load_config
    from torchtitan_like.trainer import Trainer

    def run(dump: Path) -> list[dict]:
        trainer = Trainer(load_config([
            "--job.config_file", str(ROOT / "train_configs/debug_model.toml"), "--job.dump_folder", str(dump),
            "--model.n_layers", "1", "--training.seq_len", str(SEQ), "--training.local_batch_size", "4",
            "--training.steps", "4", "--metrics.no_enable_tensorboard", "--metrics.log_freq", "1",
            "--training.dataset", "indexed", "--training.dataset_path", ",".join(map(str, two)),
            "--training.dataset_weights", "3,1", "--training.dataset_shuffle",
            "--checkpoint.enable", "--checkpoint.interval", "2",
        ]))
        try:
            trainer.train()
        finally:
            trainer.close()
        return [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]

    whole = run(tmp_path / "whole")
    shutil.copytree(tmp_path / "whole" / "checkpoint" / "step-2", tmp_path / "resumed" / "checkpoint" / "step-2")
    resumed = run(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole[2:]]


def test_a_full_disk_is_one_line_and_leaves_the_old_pair(tmp_path, corpus, monkeypatch, capsys):
    import errno

    import torchtitan_like.data.indexed as indexed

    out = tmp_path / "data"
    _write(out, [[1, 2, 3]], meta={"tokenizer_sha256": "x"})
    before = [Path(f"{out}{s}").read_bytes() for s in (".bin", ".idx", ".json")]
    real = indexed.write_indexed

    def full(prefix, records, **kw):
        def failing():
            yield from islice(records, 3)
            raise OSError(errno.ENOSPC, "No space left on device", f"{prefix}.bin.tmp1")
        return real(prefix, failing(), **kw)

    monkeypatch.setattr(indexed, "write_indexed", full)
    rc = _tool().main(["--out", str(out), "--training.dataset", "local", "--training.dataset_path", str(corpus)])
    err = capsys.readouterr().err
    assert rc == 2 and err == (f"error: No space left on device: {out}.bin.tmp1 (an earlier PREFIX.bin / .idx pair, "
                               "if any, is untouched)\n"), err
    assert [Path(f"{out}{s}").read_bytes() for s in (".bin", ".idx", ".json")] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin", "data.idx", "data.json"]  # no temporary file


def test_the_record_of_the_tokenizer_refuses_another_and_a_stale_record_is_named(prefix, corpus, tok, tmp_path):
    import shutil

    meta = json.loads(Path(f"{prefix}.json").read_text())
    n_tokens = IndexedTokens(str(prefix), section="training").n_tokens
    assert meta == {"written_by": "tools/pretokenize.py", "tokenizer": "(the embedded one)",
                    "tokenizer_sha256": tok.fingerprint(), "source": f"training.dataset_path={str(corpus)!r}",
                    "records": 40, "tokens": n_tokens}
    loader("indexed", prefix)  # the run's tokenizer is the one that wrote it
    for name, change, message in [
        ("other", {"tokenizer_sha256": "ab" * 32, "tokenizer": "llama3/tokenizer.model"},
         r"docs was tokenized with 'llama3/tokenizer.model' \(vocabulary sha256 abababababab...\), but "
         r"model.tokenizer_path loads another \(8a72e63b9e67...\): train with the tokenizer that wrote it"),
        ("stale", {"tokens": 5}, r"docs.json records 5 tokens, but .*docs.bin holds \d+: it is from another write"),
    ]:
        copy = tmp_path / name / "docs"
        copy.parent.mkdir()
        for ext in (".bin", ".idx"):
            shutil.copy(f"{prefix}{ext}", f"{copy}{ext}")
        Path(f"{copy}.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(DataError, match=message):
            loader("indexed", copy)
    (tmp_path / "stale" / "docs.json").write_text("{not json")
    with pytest.raises(DataError, match=r"docs.json is not a record tools/pretokenize.py wrote \(JSONDecodeError"):
        loader("indexed", tmp_path / "stale" / "docs")
    _write(tmp_path / "stale" / "docs", [[1, 2, 3] * 10])  # written without a record: the old one goes
    assert not (tmp_path / "stale" / "docs.json").exists()


def test_the_vocabulary_fingerprint_tells_tokenizers_apart_not_files(tok, tmp_path):
    from torchtitan_like.components.tokenizer import DEFAULT_TOKENIZER_PATH

    copy = tmp_path / "renamed.model"
    copy.write_bytes(DEFAULT_TOKENIZER_PATH.read_bytes())
    assert build_tokenizer(str(copy)).fingerprint() == tok.fingerprint()
    lines = DEFAULT_TOKENIZER_PATH.read_text().splitlines()
    a, b = lines[300].split(), lines[301].split()  # two ranks' tokens swapped: other ids for the same text
    lines[300], lines[301] = f"{b[0]} {a[1]}", f"{a[0]} {b[1]}"
    (tmp_path / "swapped.model").write_text("\n".join(lines) + "\n")
    assert build_tokenizer(str(tmp_path / "swapped.model")).fingerprint() != tok.fingerprint()


def test_describe_records_the_tokenizer_of_files_written_elsewhere(tok, tmp_path, capsys):
    tool = _tool()
    tool.DESCRIBE_CHUNK_TOKENS = 3  # several reads, and a bad id past the first one
    docs = [[tok.bos_id, 5, 6, tok.eos_id], [7, 8, 9, tok.eos_id]] * 5
    megatron = _write(tmp_path / "megatron", docs, vocab=tok.vocab_size)  # as preprocess_data.py leaves it: no .json
    assert not Path(f"{megatron}.json").exists()
    assert tool.main(["--describe", "--out", str(megatron)]) == 0
    assert capsys.readouterr().out == (f"{megatron}.json: 10 sequences, 40 tokens, largest id {tok.eos_id}, 5 bos and 10 "
                                       "eos tokens; training with another model.tokenizer_path is now refused\n")
    record = json.loads(Path(f"{megatron}.json").read_text())
    assert (record["tokenizer_sha256"], record["tokens"], record["records"]) == (tok.fingerprint(), 40, 10)
    data = IndexedTokens(str(megatron), section="training")
    data.check_tokenizer(tok)
    lines = (ROOT / "torchtitan_like/assets/tokenizer/tokenizer.model").read_text().splitlines()
    lines[300], lines[301] = lines[301].split()[0] + " 300", lines[300].split()[0] + " 301"
    (tmp_path / "other.model").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"megatron was tokenized with '\(the embedded one\)'"):
        data.check_tokenizer(build_tokenizer(str(tmp_path / "other.model")))
    # Once only; ids outside the vocabulary write nothing; --describe tokenizes nothing.
    assert tool.main(["--describe", "--out", str(megatron)]) == 2
    assert "megatron.json exists already" in capsys.readouterr().err
    wide = _write(tmp_path / "wide", [[1, 2, 3, 4, 5, 6, 7, 70_000, 9]], vocab=100_000)
    assert tool.main(["--describe", "--out", str(wide)]) == 2
    assert capsys.readouterr().err == (f"error: --out {wide}: token 7 is id 70000, outside the vocabulary of "
                                       "model.tokenizer_path (2000 ids): these files were tokenized with another "
                                       "tokenizer\n")
    assert not Path(f"{wide}.json").exists()
    assert tool.main(["--describe", "--out", str(tmp_path / "none")]) == 2  # (was named --out.dataset_path='...')
    assert capsys.readouterr().err.startswith(f"error: --out {tmp_path / 'none'}: {tmp_path / 'none'}.idx does not exist")
    r = pretokenize("--describe", "--out", str(wide), "--workers", "2")
    assert r.returncode == 2 and r.stderr.splitlines()[-1].endswith(
        "error: --workers: not used with --describe, which tokenizes nothing; leave it out"), r.stderr


def test_a_resume_under_another_seq_len_goes_on_from_the_tokens_read_or_is_refused(two, caplog):
    """The position is a count of windows of seq_len + 1 tokens: resumed with another training.seq_len it
    was read as windows of the new length, skipping (longer) or repeating (shorter) data without a word."""

    def make(seq_len: int, path: Path, **kw):
        training = Training(dataset="indexed", dataset_path=str(path), local_batch_size=2, global_batch_size=GBS,
                            seq_len=seq_len, **kw)
        return build_dataloader(training=training, tokenizer=None, vocab_size=VOCAB, dp_rank=0, dp_degree=1, seed=0)

    a = two[0]  # tokens i % 500, 50 windows of 17
    first = make(SEQ, a)
    it = iter(first)
    for _ in range(3 * GBS // 2):  # 3 global batches of 8 windows of 17 tokens: tokens 0..407
        next(it)
    state = first.state_dict()
    longer = make(2 * SEQ, a)  # windows of 33 tokens: the next boundary at or after token 408 is 33 * 13 = 429
    with caplog.at_level(logging.WARNING, logger="torchtitan_like.data.indexed"):
        longer.load_state_dict(state)
        x, y = next(iter(longer))
    assert x[0, 0].item() == 429 and "goes on from token 429, the next window boundary (21 tokens skipped)" in caplog.text
    shorter = make(SEQ // 2, a)  # windows of 9: 408 = 9 * 45 + 3, on from 414
    shorter.load_state_dict(state)
    assert next(iter(shorter))[0][0, 0].item() == 414
    for kw, path, what in (({"dataset_shuffle": True}, a, "shuffled order"),
                           ({"dataset_weights": [3.0, 1.0]}, ",".join(map(str, two)), "blend")):
        saved = make(SEQ, path, **kw)
        it = iter(saved)
        next(it)
        with pytest.raises(DataError, match=rf"indexed data's {what} counts windows of 17 tokens, and this run's "
                                            r"are 33 \(training.seq_len 16 -> 32\): resume with the same"):
            resumed = make(2 * SEQ, path, **kw)
            resumed.load_state_dict(saved.state_dict())
            next(iter(resumed))  # (the loader hands the state to its dataset when iterated)


def test_a_blend_for_validation_is_refused_at_start_naming_it():
    """It failed when opened, as '.../a,/.../b.idx does not exist'."""
    from torchtitan_like.config.loader import load_config

    with pytest.raises(ConfigError, match=r"validation.dataset_path='data/a,data/b' names 2 indexed datasets \(a "
                                          r"blend, which training reads\): validation reads one PREFIX"):
        load_config(["--validation.enable", "--validation.dataset", "indexed", "--validation.dataset_path",
                     "data/a,data/b"])


def test_the_closing_line_names_the_section_the_output_is_for(tmp_path):
    """--section validation tokenizes [validation]'s source: the hint names validation's keys, not training's."""
    r = pretokenize("--out", str(tmp_path / "v"), "--section", "validation", "--max-tokens", "100")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().endswith(f'validate on it with validation.dataset = "indexed", '
                                      f'validation.dataset_path = "{tmp_path / "v"}"'), r.stdout
    r = pretokenize("--out", str(tmp_path / "t"), "--max-tokens", "100")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().endswith(f'train on it with training.dataset = "indexed", '
                                      f'training.dataset_path = "{tmp_path / "t"}"'), r.stdout
