"""./run_train.sh with NGPU > 1 end to end, as a user runs it (torchrun, CPU, gloo): FSDP x TP, PP x DP
and CP train like one process, every rank exits 0, and an impossible layout is one error line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

STEPS = 6
# The same global batch (8 x 64 tokens) on every layout: one process accumulates 2 microbatches of
# 4, FSDP(2) x TP(2) gives each of its 2 data-parallel ranks one microbatch of 4.
SHORT_RUN = (
    "--training.steps", str(STEPS),
    "--model.n_layers", "2",  # the debug model's width, fewer blocks: a third of the CPU time per step
    "--training.seq_len", "64",
    "--training.local_batch_size", "4",
    "--training.global_batch_size", "8",
    "--metrics.no_enable_tensorboard",
    "--debug.deterministic",
)
RTOL = 1e-4  # per-step loss and grad norm, fp32 (see tests/distributed/test_trainer_parity.py)


def run_train(dump: Path, *args: str, ngpu: int, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, NGPU=str(ngpu), CONFIG_FILE="train_configs/debug_model.toml", PYTHON=sys.executable)
    return subprocess.run(
        [str(ROOT / "run_train.sh"), "--job.dump_folder", str(dump), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_fsdp2_tp2_pp2_dp2_and_cp2_train_like_one_process(tmp_path):
    runs = {}
    for name, ngpu, layout, shape in [
        ("one", 1, (), "grad accumulation 2, world 1"),
        (
            "fsdp2xtp2", 4,
            ("--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2"),
            "grad accumulation 1, world 4",
        ),
        (
            "pp2xdp2", 4,
            ("--parallelism.pipeline_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "2"),
            "pipeline: schedule 1F1B, p=2, v=1 stage(s) per rank, m=4 microbatches of 1",
        ),
        (
            # NGPU=2 ./run_train.sh --parallelism.context_parallel_degree 2: both ranks share one batch.
            "cp2", 2,
            ("--parallelism.context_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1"),
            "device mesh {'cp': 2}",
        ),
    ]:
        r = run_train(tmp_path / name, *SHORT_RUN, *layout, ngpu=ngpu)
        # 0, not merely "trained": a rank dying in teardown after a good run fails the job (CPU_NOTES).
        assert r.returncode == 0, f"{name}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        assert "Traceback" not in r.stdout + r.stderr, f"{name}:\n{r.stderr[-3000:]}"
        assert shape in r.stdout, f"{name}: {r.stdout[-3000:]}"
        rows = read_metrics(tmp_path / name)
        assert [row["step"] for row in rows] == list(range(1, STEPS + 1)), name
        runs[name] = rows

    for layout in ("fsdp2xtp2", "pp2xdp2", "cp2"):
        for key in ("loss", "grad_norm"):
            got = [row[key] for row in runs[layout]]
            want = [row[key] for row in runs["one"]]
            assert got == pytest.approx(want, rel=RTOL, abs=0), (layout, key)
        assert [row["lr"] for row in runs[layout]] == [row["lr"] for row in runs["one"]], layout
    # The pipeline's measured waiting share is in the metrics (a share of the step: 0..1).
    assert all(0 <= row["pp_wait_share_max"] < 1 for row in runs["pp2xdp2"])


def test_tensor_parallel_degree_that_does_not_fit_the_world_is_one_error_line(tmp_path):
    r = run_train(tmp_path / "out", "--parallelism.tensor_parallel_degree", "3", ngpu=2)
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    errors = [line for line in (r.stdout + r.stderr).splitlines() if "error:" in line]
    assert len(errors) == 1, r.stdout[-2000:] + r.stderr[-2000:]
    # The key (in its section), the value, and the rule it breaks.
    assert "parallelism" in errors[0] and "tensor_parallel_degree(3)" in errors[0], errors[0]
    assert "does not divide world size 2" in errors[0], errors[0]
    assert "Traceback" not in r.stdout + r.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
