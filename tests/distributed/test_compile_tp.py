"""Compiled blocks under tensor parallel compile once: no block recompiles because its input differs in
kind from the others' (tensor_parallel.py: the embedding's output and a pipeline stage's received input
are made like a compiled block's output). Every rank's recompiles count, not only the logging rank's."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from harness import run_on_ranks
from trainer_runs import LAYOUTS, train_run, trainer_argv


def test_tp_blocks_compile_once_on_every_stage(tmp_path: Path) -> None:
    # pp2 x tp2: stage 0 starts with the embedding, stage 1 with a received activation.
    world, _ = LAYOUTS["pp2xtp2"]
    argv = trainer_argv(
        tmp_path / "run", "pp2xtp2", "--compile.enable", "--compile.backend", "aot_eager", "--metrics.log_freq", "1",
        steps=2, n_layers=4,  # 2 blocks a stage: the second one's input is a block's output, the first one's not
    )
    ranks = run_on_ranks(train_run, world_size=world, tmp_path=tmp_path, args=(argv,), timeout_s=300)
    assert all(len(r["history"]) == 2 for r in ranks)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    # (recompiles: the run's total.) torch 2.11's stages infer their shapes by running the first forward
    # without grad: each block compiles once more (guard "grad_mode") at step 1. Later versions do not.
    expected = 1 if torch.__version__ < (2, 12) else 0
    assert all(row["compile_s"] > 0 and row["recompiles"] == expected for row in rows), rows
