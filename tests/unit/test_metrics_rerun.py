"""metrics.jsonl lists every step once, with or without checkpointing.

Trainer.__init__ once called `metrics.drop_after(step)` only when checkpoint.enable was true: without
checkpointing every (re)start begins at step 0 and appended to the old metrics.jsonl, so a rerun of
`./run_train.sh` (the debug config has no [checkpoint]) or a MAX_RESTARTS restart listed every step
twice. README: "one JSON object per logged step"; "Rows of metrics.jsonl ... from the attempt that
died, are dropped on resume, so every step appears once". With checkpoint.enable = true the same
rerun from scratch (no checkpoint yet) does truncate the file: drop_after(0).
"""

from __future__ import annotations

import json

import pytest

from torchtitan_like.config.loader import load_config
from torchtitan_like.trainer import Trainer


def _run(dump, *overrides: str) -> None:
    t = Trainer(load_config([
        "--job.config_file", "train_configs/debug_model.toml",
        "--job.dump_folder", str(dump),
        "--training.seq_len", "32",
        "--training.local_batch_size", "2",
        "--training.steps", "2",
        "--training.prefetch_batches", "0",
        "--metrics.no_enable_tensorboard",
        *overrides,
    ]))
    try:
        t.train()
    finally:
        t.close()


def _steps(dump) -> list[int]:
    return [json.loads(line)["step"] for line in (dump / "metrics.jsonl").read_text().splitlines()]


def test_with_checkpointing_a_fresh_rerun_starts_a_fresh_file(tmp_path):
    # Reference behaviour: checkpoint.enable with no checkpoint saved yet (interval past the run).
    args = ("--checkpoint.enable", "--checkpoint.interval", "100", "--checkpoint.keep_latest_k", "0")
    _run(tmp_path, *args)
    import shutil

    shutil.rmtree(tmp_path / "checkpoint")  # e.g. the final save went elsewhere / was removed
    _run(tmp_path, *args)
    assert _steps(tmp_path) == [1, 2]


def test_rerun_without_checkpointing_lists_every_step_once(tmp_path):
    _run(tmp_path)
    _run(tmp_path)  # the same command again (or torchrun restarting the workers)
    assert _steps(tmp_path) == [1, 2]


def test_a_row_cut_off_by_a_crash_is_dropped_on_resume(tmp_path):
    _run(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # the process died mid-write
    _run(tmp_path)
    assert _steps(tmp_path) == [1, 2]
