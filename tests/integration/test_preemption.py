"""Pre-emption and restarts through ./run_train.sh: signals, exit 75, checkpoints, resume, torchrun restarts.

One job is stopped by SIGTERM, resumed and stopped by SIGUSR1, resumed again under MAX_RESTARTS=1
and has a worker SIGKILLed, and finishes. It is the same deterministic 2-process FSDP job every
time, so it must log exactly the losses of the uninterrupted reference run, each step once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import ROOT, RunningJob, read_metrics

STEPS = 12
INTERVAL = 3
EXIT_PREEMPTED = 75
TIMEOUT_S = 150  # per launch; a healthy one takes 10-25 s on 2 cores


def job_args(dump: Path) -> list[str]:
    return [
        "--job.dump_folder", str(dump),
        "--training.steps", str(STEPS),
        "--model.n_layers", "2",  # the debug model's width, fewer blocks: a third of the CPU time per step
        "--training.seq_len", "32",
        "--training.local_batch_size", "2",
        "--training.global_batch_size", "4",
        "--metrics.log_freq", "1",
        "--metrics.no_enable_tensorboard",
        "--parallelism.data_parallel_shard_degree", "2",
        "--checkpoint.enable",
        "--checkpoint.interval", str(INTERVAL),
        "--debug.deterministic",
    ]


ENV = {"NGPU": "2", "LOG_RANK": "0"}


def run_to_end(tmp_path: Path, name: str, dump: Path, env: dict[str, str] | None = None) -> str:
    with RunningJob(tmp_path / f"{name}.log", job_args(dump), env={**ENV, **(env or {})}) as job:
        rc = job.wait(TIMEOUT_S)
        out = job.output()
    assert rc == 0, out[-6000:]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """step -> loss of the uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    run_to_end(tmp, "reference", tmp / "out")
    rows = read_metrics(tmp / "out")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return {r["step"]: r["loss"] for r in rows}


def interrupt(tmp_path: Path, name: str, dump: Path, sig: signal.Signals, after_step: int) -> tuple[str, int]:
    """Start the job, send `sig` to the launcher once `after_step` is logged; (output, step it stopped at)."""
    with RunningJob(tmp_path / f"{name}.log", job_args(dump), env=ENV) as job:
        job.wait_for_step(dump, after_step, TIMEOUT_S)
        job.send(sig)
        rc = job.wait(TIMEOUT_S)
        out = job.output()
    assert rc == EXIT_PREEMPTED, out[-6000:]
    stopped = read_metrics(dump)[-1]["step"]
    assert after_step <= stopped < STEPS, (after_step, stopped)
    assert f"pre-empted by {sig.name}: every rank stopped after step {stopped}" in out, out[-4000:]
    assert f"checkpoint step-{stopped} saved (full state)" in out
    assert f"exit {EXIT_PREEMPTED}" in out  # the launcher's closing line names the status
    # Every rank stopped at the boundary: the stacks its signal dumped are removed, none reached the console.
    assert not (dump / "stacks").exists() and "most recent call first" not in out and "Python stacks" not in out
    return out, stopped


def verify_full_checkpoint(folder: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "checkpoint.py"), "verify", str(folder)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model_only"] is False
    assert manifest["contents"] == ["dataloader", "lr_scheduler", "model", "optimizer", "train_state"]


def assert_same_curve(dump: Path, reference: dict[int, float]) -> None:
    rows = read_metrics(dump)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "a step was lost or repeated"
    assert {r["step"]: r["loss"] for r in rows} == reference


def loaded_steps(out: str) -> list[int]:
    """Steps of the checkpoints the run loaded, in order (one per start of the workers)."""
    lines = [line for line in out.splitlines() if "components.checkpoint: loaded " in line]
    return [int(line.rsplit("step-", 1)[1].split()[0]) for line in lines]


def test_signals_and_a_killed_worker_resume_the_same_curve(tmp_path, reference):
    dump = tmp_path / "out"

    # SIGTERM (what Slurm sends on pre-emption) to torchrun: forwarded, agreed, saved, exit 75.
    _, first_stop = interrupt(tmp_path, "sigterm", dump, signal.SIGTERM, after_step=2)
    verify_full_checkpoint(dump / "checkpoint" / f"step-{first_stop}")

    # The same command resumes there; SIGUSR1 (#SBATCH --signal=USR1@...) stops it the same way.
    out, second_stop = interrupt(tmp_path, "sigusr1", dump, signal.SIGUSR1, after_step=first_stop + 2)
    assert loaded_steps(out) == [first_stop], out[-4000:]
    verify_full_checkpoint(dump / "checkpoint" / f"step-{second_stop}")

    # With MAX_RESTARTS=1, a worker killed mid-run makes torchrun restart both; they resume from the
    # newest complete checkpoint and finish.
    with RunningJob(tmp_path / "restart.log", job_args(dump), env={**ENV, "MAX_RESTARTS": "1"}) as job:
        job.wait_for_step(dump, second_stop + 1, TIMEOUT_S)
        workers = job.workers()
        assert len(workers) == 2, workers
        killed_at = read_metrics(dump)[-1]["step"]
        job.kill_worker(workers[-1])
        rc = job.wait(TIMEOUT_S)
        out = job.output()
    assert rc == 0, out[-6000:]
    first, restarted = loaded_steps(out)
    assert first == second_stop and second_stop <= restarted <= killed_at + 1, (second_stop, restarted, killed_at)
    assert_same_curve(dump, reference)
