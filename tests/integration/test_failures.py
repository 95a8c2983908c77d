"""A rank that raises ends the whole job quickly, with that rank's error in the log; a rank stuck meanwhile
leaves its Python stacks.

The failing rank is made to raise with the test-only `[debug] fail_at_step / fail_rank` keys. The
collective timeouts are set far above the test's own time limit: if the job only ended because a
collective timed out, the test would fail on its limit instead of passing slowly.
"""

from __future__ import annotations

import pickle
import signal

from jobs import RunningJob, read_metrics

COLLECTIVE_TIMEOUT_S = 900
JOB_LIMIT_S = 120  # start-up 10-25 s on 2 cores, then the failure must end it at once


def fsdp2_job_args(dump, *faults: str) -> list[str]:
    """A 50-step FSDP job on 2 ranks, a metrics row per step, long collective timeouts, and `faults` (debug.*)."""
    return [
        "--job.dump_folder", str(dump),
        "--training.steps", "50",
        "--training.seq_len", "32",
        "--training.local_batch_size", "2",
        "--metrics.log_freq", "1",
        "--metrics.no_enable_tensorboard",
        "--parallelism.data_parallel_shard_degree", "2",
        "--comm.init_timeout_seconds", str(COLLECTIVE_TIMEOUT_S),
        "--comm.train_timeout_seconds", str(COLLECTIVE_TIMEOUT_S),
        *faults,
    ]


def test_a_rank_that_raises_ends_the_job_with_its_error(tmp_path):
    dump = tmp_path / "out"
    args = fsdp2_job_args(dump, "--debug.fail_at_step", "3", "--debug.fail_rank", "1")
    # LOG_RANK=0 hides rank 1's own output: its error must still reach the log, through the launcher.
    with RunningJob(tmp_path / "job.log", args, env={"NGPU": "2", "LOG_RANK": "0"}) as job:
        rc = job.wait(JOB_LIMIT_S)
        out = job.output()
    assert rc == 1, out[-6000:]
    assert (
        "run_train: rank 1 exited with code 1: InjectedFault: debug.fail_at_step=3: injected failure on rank 1" in out
    ), out[-6000:]
    # Rank 0 did not wait for the timeout: it failed on its next collective with the dead peer.
    assert "rank 0 failed:" in out, out[-6000:]
    assert [row["step"] for row in read_metrics(dump)] == [1, 2]
    # Both failing ranks wrote their flight recorder (comm.trace_buf_size is on by default): the last
    # collectives each issued, in torch's format; rank 0's log names its last one.
    assert "flight recorder: rank 0's last collectives written to" in out and "; the last: gloo:" in out, out[-6000:]
    for rank in (0, 1):
        trace = pickle.loads((dump / "comm_traces" / f"rank_{rank}").read_bytes())
        names = {entry["profiling_name"] for entry in trace["entries"]}
        assert "gloo:all_reduce" in names, (rank, names)


def stuck_job_args(dump) -> list[str]:
    """Rank 0 blocks for good at step 3 (`debug.hang_at_step`: as in a collective its peer never joins)."""
    return fsdp2_job_args(dump, "--debug.hang_at_step", "3", "--debug.hang_rank", "0")


def test_a_stuck_rank_leaves_its_python_stacks_when_another_fails(tmp_path):
    """Rank 0 blocks for good at step 3, rank 1 raises there. torchrun SIGTERMs rank 0, whose Python handler
    cannot stop it, and SIGKILLs it after its grace: the stacks written at the SIGTERM are what is left of
    where it was stuck. Nothing here depends on timing: rank 0 blocks whenever rank 1 fails, and the dump
    is taken in the signal handler, before any kill."""
    dump = tmp_path / "out"
    args = [*stuck_job_args(dump), "--debug.fail_at_step", "3", "--debug.fail_rank", "1"]
    # (torchrun's failure path gives the survivors a fixed 30 s after SIGTERM, whatever SHUTDOWN_TIMEOUT says.)
    with RunningJob(tmp_path / "job.log", args, env={"NGPU": "2", "LOG_RANK": "0,1"}) as job:
        rc = job.wait(JOB_LIMIT_S + 60)
        out = job.output()
    assert rc == 1, out[-6000:]
    assert "run_train: rank 1 exited with code 1: InjectedFault" in out, out[-6000:]
    assert "run_train: rank 0 exited with code -9 (signal SIGKILL)" in out, out[-6000:]
    stacks = dump / "stacks" / "rank0.txt"
    text = stacks.read_text()
    assert "Current thread" in text and "in maybe_inject_hang" in text and "in _train" in text, text
    assert "in _produce" in text, text  # every thread: the data prefetcher's too
    assert f"run_train: Python stacks of a rank that was signalled and did not stop at a step boundary: {stacks}" in out, (
        out[-4000:]
    )
    assert not (dump / "stacks" / "rank1.txt").exists()  # failed on its own, never signalled: nothing to keep
    assert "most recent call first" not in out  # in the file, not on the console


def test_a_preemption_that_finds_a_rank_stuck_keeps_every_ranks_stacks(tmp_path):
    """The scheduler's SIGTERM comes while rank 0 is stuck: rank 1 waits in a collective rank 0 never joins, so
    neither reaches a step boundary, torchrun kills both after SHUTDOWN_TIMEOUT, and both stack files stay.
    The signal is sent once rank 0 has logged that it blocks, so where rank 0 was is known."""
    dump = tmp_path / "out"
    env = {"NGPU": "2", "LOG_RANK": "0", "SHUTDOWN_TIMEOUT": "5"}
    with RunningJob(tmp_path / "job.log", stuck_job_args(dump), env=env) as job:
        job.wait_for_text("debug.hang_at_step=3: rank 0 blocks here", JOB_LIMIT_S)
        job.send(signal.SIGTERM)
        rc = job.wait(JOB_LIMIT_S)
        out = job.output()
    # (Which summary the launcher gives depends on the order of torchrun's kills: rank 1 may still fail on its
    # lost peer, between rank 0's SIGKILL and its own. Either way it did not stop at a step boundary.)
    assert rc == 75 and "run_train: got SIGTERM; " in out and "every rank stopped after step" not in out, out[-6000:]
    assert "in maybe_inject_hang" in (dump / "stacks" / "rank0.txt").read_text()
    assert "in _train" in (dump / "stacks" / "rank1.txt").read_text()  # somewhere in step 3, before or in its wait
    for rank in (0, 1):
        path = dump / "stacks" / f"rank{rank}.txt"
        assert f"run_train: Python stacks of a rank that was signalled and did not stop at a step boundary: {path}" in (
            out
        ), out[-4000:]
    assert "most recent call first" not in out
