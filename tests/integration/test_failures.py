"""A rank that raises ends the whole job quickly, with that rank's error in the log.

The failing rank is made to raise with the test-only `[debug] fail_at_step / fail_rank` keys. The
collective timeouts are set far above the test's own time limit: if the job only ended because a
collective timed out, the test would fail on its limit instead of passing slowly.
"""

from __future__ import annotations

import pickle

from jobs import RunningJob, read_metrics

COLLECTIVE_TIMEOUT_S = 900
JOB_LIMIT_S = 120  # start-up 10-25 s on 2 cores, then the failure must end it at once


def test_a_rank_that_raises_ends_the_job_with_its_error(tmp_path):
    dump = tmp_path / "out"
    args = [
        "--job.dump_folder", str(dump),
        "--training.steps", "50",
        "--training.seq_len", "32",
        "--training.local_batch_size", "2",
        "--metrics.log_freq", "1",
        "--metrics.no_enable_tensorboard",
        "--parallelism.data_parallel_shard_degree", "2",
        "--comm.init_timeout_seconds", str(COLLECTIVE_TIMEOUT_S),
        "--comm.train_timeout_seconds", str(COLLECTIVE_TIMEOUT_S),
        "--debug.fail_at_step", "3",
        "--debug.fail_rank", "1",
    ]
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
