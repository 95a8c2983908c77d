"""The background-thread loader hands out the plain loader's batches and states, in order."""

from __future__ import annotations

import logging
import pickle
import threading
from pathlib import Path

import pytest
import torch

from torchtitan_like.components.tokenizer import build_tokenizer
from torchtitan_like.config.loader import load_config
from torchtitan_like.data.loader import build_dataloader
from torchtitan_like.data.prefetch import PrefetchingLoader
from torchtitan_like.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


def _loader(*overrides: str):
    cfg = load_config(["--job.config_file", str(ROOT / "train_configs/debug_model.toml"), "--training.seq_len", "32",
                       "--training.local_batch_size", "2", *overrides])
    return build_dataloader(training=cfg.training, tokenizer=build_tokenizer(""), vocab_size=2000, dp_rank=0,
                            dp_degree=1, seed=0)


def _take(it, n: int) -> list:
    return [next(it) for _ in range(n)]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_batches_and_states_are_the_plain_loaders():
    plain = _loader()
    it = iter(plain)
    want, states = [], []
    for _ in range(9):
        want.append(next(it))
        states.append(pickle.dumps(plain.state_dict()))

    pre = PrefetchingLoader(_loader(), depth=3)
    it = iter(pre)
    for i in range(5):
        assert _same([next(it)], [want[i]]), i
        # The state after the batch handed out, not after the ones prefetched behind it.
        assert pickle.dumps(pre.state_dict()) == states[i], i
    # Iterating again continues from the last batch handed out (the prefetched ones are not lost).
    assert _same(_take(iter(pre), 4), want[5:9])
    assert pickle.dumps(pre.state_dict()) == states[8]

    # A fresh loader resumed from a handed-out state continues the stream exactly.
    resumed = PrefetchingLoader(_loader(), depth=1)
    resumed.load_state_dict(pickle.loads(states[2]))
    assert _same(_take(iter(resumed), 6), want[3:9])
    for p in (pre, resumed):
        thread = p._thread
        p.close()
        assert thread is not None and not thread.is_alive()


def test_a_loader_error_is_raised_in_order(tmp_path):
    data = tmp_path / "data.jsonl"
    good = [f'{{"text": "{"word " * 40}{i}"}}' for i in range(6)]
    data.write_text("\n".join([*good, "{not json"]) + "\n")
    plain = iter(_loader("--training.dataset", "local", "--training.dataset_path", str(data)))
    n_good = 0
    with pytest.raises(DataError, match=r"data.jsonl:7: invalid JSON"):
        while True:
            next(plain)
            n_good += 1
    assert n_good >= 1
    pre = PrefetchingLoader(_loader("--training.dataset", "local", "--training.dataset_path", str(data)), depth=4)
    it = iter(pre)
    _take(it, n_good)  # every batch before the bad record comes out first
    with pytest.raises(DataError, match=r"data.jsonl:7: invalid JSON"):
        next(it)
    assert pre._thread is None  # the thread ended with the error
    with pytest.raises(DataError, match=r"data.jsonl:7: invalid JSON"):  # and says so again, never hangs
        next(it)


def test_depth_and_prefetch_key_are_checked():
    with pytest.raises(ValueError, match="depth=0 must be >= 1"):
        PrefetchingLoader(_loader(), depth=0)
    from torchtitan_like.errors import ConfigError

    with pytest.raises(ConfigError, match=r"training\.prefetch_batches"):
        load_config(["--training.prefetch_batches", "-1"])


class _StuckLoader:
    """A loader whose second read never returns (a streaming source that stopped answering)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __iter__(self):
        yield torch.zeros(1)
        self.release.wait()


def test_close_leaves_a_stuck_read_behind_with_a_warning(caplog):
    stuck = _StuckLoader()
    pre = PrefetchingLoader(stuck, depth=2)
    it = iter(pre)
    assert torch.equal(next(it), torch.zeros(1))
    thread = pre._thread
    with caplog.at_level(logging.WARNING, logger="torchtitan_like.data.prefetch"):
        pre.close(timeout_s=0.2)  # returns instead of waiting on the read
    assert thread is not None and thread.is_alive() and thread.daemon
    assert "still inside the data loader after 0.2 s" in caplog.text
    stuck.release.set()
    thread.join(5)
    assert not thread.is_alive()
