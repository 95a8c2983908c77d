"""Operations: TensorBoard on resume, straggler stats that see a straggler, process-group timeouts
before the first step, no profiler trace for a step that never ran, the launcher's error line in a world
of one, and a pre-emption signal during the final async save."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from test_profiling import argv  # the debug model at seq 32, batch 2
from tests.distributed.harness import run_on_ranks

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def _argv(dump: Path | str, *overrides: str) -> list[str]:
    return argv(Path(dump), "--training.prefetch_batches", "0", *overrides)  # (each test sets its steps)


# --- 1. TensorBoard drops the dead attempt's steps after a resume ------------------------------------


def _tb_logger(dump: Path):
    from torchtitan_like.components.metrics import MetricsLogger
    from torchtitan_like.config.schema import Metrics

    return MetricsLogger(
        Metrics(enable_tensorboard=True), str(dump), enabled=True, flops_per_token=1.0, peak_flops_per_s=None,
        device=CPU, world_size=1,
    )


def _log(m, step: int, loss: float) -> None:
    m.log(step, loss=loss, grad_norm=1.0, lr=1.0, tokens=1, elapsed_s=1.0, data_wait_s=0.0, steps=1)


def test_tensorboard_lists_every_step_once_after_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = _tb_logger(tmp_path)
    for step in range(1, 6):  # the attempt that died after step 5; its last checkpoint is step 3
        _log(first, step, float(step))
    first.close()
    time.sleep(1.1)  # a new event file, as a new process writes one
    resumed = _tb_logger(tmp_path)
    assert resumed.drop_after(3) == 2  # what Trainer.__init__ does after loading step 3
    for step in range(4, 7):
        _log(resumed, step, 100.0 + step)
    resumed.close()

    jsonl = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert jsonl == [1, 2, 3, 4, 5, 6]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    events = acc.Scalars("loss/global_avg")
    # (Without purge_step TensorBoard showed [(1,1), (2,2), (3,3), (4,4), (5,5), (4,104), (5,105), (6,106)].)
    assert [(e.step, e.value) for e in events] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 104.0), (5, 105.0), (6, 106.0)]


# --- 2. straggler statistics see a straggler ---------------------------------------------------


def straggler_run(dump: str) -> None:
    """Rank 1 is a data straggler: 0.4 s more per step fetching its batch."""
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.trainer import Trainer

    original = Trainer._next_batches

    def slow_next_batches(self, data_iter):
        if dist.get_rank() == 1:
            time.sleep(0.4)
        return original(self, data_iter)

    Trainer._next_batches = slow_next_batches
    trainer = Trainer(load_config(_argv(
        dump, "--training.steps", "6", "--metrics.log_freq", "2", "--parallelism.data_parallel_shard_degree", "2",
    )))
    try:
        trainer.train()
    finally:
        trainer.close()


def test_straggler_stats_name_the_slow_rank(tmp_path):
    dump = tmp_path / "out"
    run_on_ranks(straggler_run, world_size=2, tmp_path=tmp_path, args=(str(dump),), timeout_s=150)
    rows = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    # (Wall-clock step times once gave slowest_rank 1, 0, 1 with max - median < 0.001 s.)
    for r in rows:
        assert r["slowest_rank"] == 1, r
        assert r["host_time_max"] - r["host_time_median"] > 0.1, r  # rank 1 spends 0.4 s/step more


# --- 3. comm.init_timeout_seconds reaches the mesh groups --------------------------------------

INIT_TIMEOUT_S = 90  # also the harness's default-group timeout, so any fix gives 90 everywhere


def timeouts_after_start_up(dump: str) -> dict[str, list[float]]:
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.distributed.health import process_groups
    from torchtitan_like.trainer import Trainer

    trainer = Trainer(load_config(_argv(
        dump, "--training.steps", "2",
        "--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2",
        "--comm.init_timeout_seconds", str(INIT_TIMEOUT_S),
        "--checkpoint.enable", "--checkpoint.interval", "100",
    )))
    try:
        groups = [g._get_backend(CPU).options._timeout.total_seconds() for g in process_groups(trainer.parallel_dims)]
        pg = trainer.checkpointer._pg
        ckpt = [pg._get_backend(CPU).options._timeout.total_seconds()] if pg is not None else []
    finally:
        trainer.close()
    return {"groups": groups, "checkpoint": ckpt}


@pytest.mark.multiprocess  # 4 ranks
def test_init_timeout_applies_to_every_group_until_the_first_step(tmp_path):
    results = run_on_ranks(
        timeouts_after_start_up, world_size=4, tmp_path=tmp_path, args=(str(tmp_path / "out"),),
        timeout_s=INIT_TIMEOUT_S,
    )
    for rank, r in enumerate(results):
        # The default group, this rank's dp_shard group and its tp group; then the checkpoint group.
        assert len(r["groups"]) == 3 and len(r["checkpoint"]) == 1, (rank, r)
        # (The mesh groups once had torch's 1800 s: groups [90.0, 1800.0, 1800.0].)
        assert r["groups"] == [INIT_TIMEOUT_S] * 3 and r["checkpoint"] == [INIT_TIMEOUT_S], (rank, r)


# --- 4. no profiler trace named after a step it did not record -----------------------


def test_no_trace_for_a_step_that_was_not_recorded(tmp_path):
    from torchtitan_like.components.profiling import maybe_enable_profiling
    from torchtitan_like.config.schema import Profiling

    cfg = Profiling(enable_profiling=True, profile_freq=3, profiler_warmup=1, profiler_active=1)
    with maybe_enable_profiling(cfg, dump_folder=str(tmp_path), rank=0, device=CPU, global_step=0) as prof:
        for step in range(1, 6):  # steps 1..5; step 3 is the only captured one (step 6 would be next)
            with torch.profiler.record_function(f"train_step_{step}"):
                torch.ones(8) @ torch.ones(8)
            prof.step()
    traces = sorted((tmp_path / "profile_traces").rglob("rank0_trace.json"))
    recorded = {
        p.parent.name: sorted(
            e["name"] for e in json.loads(p.read_text())["traceEvents"] if str(e.get("name", "")).startswith("train_step")
        )
        for p in traces
    }
    # (Once: {"iteration_3": ["train_step_3"], "iteration_5": []}.)
    assert recorded == {"iteration_3": ["train_step_3"]}


# --- 5. in a world of one the launcher's line has the error too --------------------------------------------


def test_error_file_is_written_in_a_world_of_one(tmp_path, monkeypatch):
    import logging

    from torchtitan_like import train
    from torchtitan_like.trainer import InjectedFault

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with pytest.raises(InjectedFault):
            train.main(_argv(tmp_path / "out", "--training.steps", "3", "--debug.fail_at_step", "2"))
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert error_file.exists()
    assert "debug.fail_at_step=2: injected failure on rank 0" in error_file.read_text()


# --- 6. a pre-emption signal during the final (async) save does not kill the process -------------------------

_CLOSE_SIGNAL_SCRIPT = r"""
import os, signal, sys
from torchtitan_like import train
from torchtitan_like.components.checkpoint import CheckpointManager

original = CheckpointManager.close

def close(self):
    os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's signal arrives while the final save uploads
    return original(self)

CheckpointManager.close = close
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_signal_during_the_final_async_save_does_not_lose_it(tmp_path):
    import os
    import subprocess
    import sys

    dump = tmp_path / "out"
    args = _argv(dump, "--training.steps", "2", "--checkpoint.enable", "--checkpoint.interval", "100",
                 "--checkpoint.async_mode", "async")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _CLOSE_SIGNAL_SCRIPT, *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=180)
    # (Once: returncode -15, killed by SIGTERM, only checkpoint/step-2.tmp-* left.)
    assert r.returncode in (0, 75), (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert (dump / "checkpoint" / "step-2" / "manifest.json").exists(), sorted(os.listdir(dump / "checkpoint"))
