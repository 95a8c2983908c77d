"""One run per output folder (components/run_lock.py): a second job started in a folder a live job uses
is refused, naming the holder; the lock ends with its process however it ends (no stale lock after a
crash), is not kept alive by forked children, and an uncreatable dump folder is one error line, as are a
disk that fills up (a save's partial folder is deleted at once: test_checkpoint.py), running out of
memory and Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from test_signals_and_faults import argv
from torchtitan_like import train
from torchtitan_like.components.run_lock import RunLock
from torchtitan_like.errors import ConfigError

pytestmark = pytest.mark.usefixtures("restore_root_logger")  # (tests/conftest.py)

# A process that locks the folder, says so, then (fork=1) forks a child that outlives it, or waits.
HOLDER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from torchtitan_like.components.run_lock import RunLock
    lock = RunLock.acquire(Path(sys.argv[1]), key="job.dump_folder")
    if sys.argv[2] == "1":
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
        sys.exit(0)
    print("locked", flush=True)
    time.sleep(60)
""")


def _holder(folder, fork: bool) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), "1" if fork else "0"], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None
    p.first_line = p.stdout.readline().strip()  # type: ignore[attr-defined]
    return p


def test_a_second_run_in_a_live_runs_folder_is_refused_and_a_dead_holder_leaves_no_lock(tmp_path):
    holder = _holder(tmp_path, fork=False)
    try:
        assert holder.first_line == "locked"
        with pytest.raises(ConfigError) as e:
            RunLock.acquire(tmp_path, key="job.dump_folder")
        assert str(e.value).startswith(f"{tmp_path} (job.dump_folder) is in use by another run (host ")
        assert f"pid {holder.pid} since " in str(e.value)
        assert str(e.value).endswith("wait for it to end, stop it, or set another job.dump_folder")
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: nothing runs to unlock
        holder.wait(timeout=30)
    RunLock.acquire(tmp_path, key="job.dump_folder").release()


def test_a_checkpoint_folder_outside_the_dump_folder_is_locked_too(tmp_path, capsys):
    # Two jobs with dump folders of their own and one absolute checkpoint.folder would resume from and
    # replace each other's checkpoints as surely as two jobs in one dump folder.
    shared = tmp_path / "shared_ckpt"
    holder = _holder(shared, fork=False)
    try:
        assert holder.first_line == "locked"
        run = argv(tmp_path / "b", "--training.steps", "1", "--checkpoint.enable", "--checkpoint.folder", str(shared))
        assert train.main(run) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {shared} (checkpoint.folder) is in use by another run"), err
        assert err[0].endswith("or set another checkpoint.folder")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # The refused run let go of its dump folder; a checkpoint folder inside the dump folder gets no lock file.
    assert train.main(argv(tmp_path / "b", "--training.steps", "1", "--checkpoint.enable")) == 0
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoint").iterdir()) == ["step-1"]
    assert train.main(run) == 0
    assert sorted(p.name for p in shared.iterdir()) == [".run.lock", "step-1"]


def test_a_forked_child_does_not_keep_its_dead_parents_lock(tmp_path):
    # Data loader or compile workers forked by a run must not block its restart after the run died.
    holder = _holder(tmp_path, fork=True)
    child = int(holder.first_line)
    try:
        assert holder.wait(timeout=30) == 0
        os.kill(child, 0)  # (still alive)
        RunLock.acquire(tmp_path, key="job.dump_folder").release()
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_dump_folder_that_cannot_be_created_is_one_error_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert train.main(argv(tmp_path / "afile" / "sub", "--training.steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot create {tmp_path / 'afile' / 'sub'} (job.dump_folder): Not a directory; choose a writable folder"]


def test_a_full_disk_is_one_error_line_and_exit_1(tmp_path, monkeypatch, capsys):
    from torchtitan_like.components.metrics import MetricsLogger

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "metrics.jsonl"))

    monkeypatch.setattr(MetricsLogger, "log", full)
    assert train.main(argv(tmp_path, "--training.steps", "1")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: No space left on device writing {tmp_path / 'metrics.jsonl'}: free space there or point "
        "job.dump_folder at another disk (complete checkpoints are intact; a rerun resumes from the newest)"
    ]


@pytest.mark.parametrize("error, advice", [
    # A full disk logged only its traceback and "OSError: [Errno 28] No space left on device" (seen with the
    # dump folder on a full 40 MB tmpfs, NGPU=2), without the advice a single process prints.
    (OSError(28, "No space left on device"), "rank 0: No space left on device: free space there or point "
     "job.dump_folder at another disk (complete checkpoints are intact; a rerun resumes from the newest)"),
    # A collective timeout named neither its cause nor the keys that set it (seen with rank 1 stuck at step 3
    # and comm.train_timeout_seconds=5, NGPU=2).
    (RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
                  "waiting 5000ms for recv operation to complete"),
     "rank 0: a collective waited longer than its timeout (comm.train_timeout_seconds once the first step has "
     "ended; comm.init_timeout_seconds before it and for checkpoint saves): another rank is stuck or far slower "
     "(its log says where; the launcher's lines name the ranks that failed); raise the key only if that work "
     "really takes so long"),
    # NCCL's watchdog says it in its own words (torch's ProcessGroupNCCL; DistBackendError is a RuntimeError).
    (RuntimeError("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE, "
                  "NumelIn=1, NumelOut=1, Timeout(ms)=600000) ran for 600042 milliseconds before timing out."),
     "rank 0: a collective waited longer than its timeout (comm.train_timeout_seconds once the first step has "
     "ended; comm.init_timeout_seconds before it and for checkpoint saves): another rank is stuck or far slower "
     "(its log says where; the launcher's lines name the ranks that failed); raise the key only if that work "
     "really takes so long"),
], ids=["full_disk", "collective_timeout", "nccl_watchdog_timeout"])
def test_a_distributed_rank_that_fails_fast_logs_what_to_do(monkeypatch, caplog, error, advice):
    """A rank of a distributed job fails fast (train._fail_fast): after its traceback, one line says what to
    do, as for running out of memory."""
    import logging

    import torch.distributed as dist

    def exit_now(code):
        raise SystemExit(code)

    monkeypatch.setattr(train, "_exit_now", exit_now)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}  # (_fail_fast ignores them)
    try:
        with caplog.at_level(logging.ERROR, logger="torchtitan_like"), pytest.raises(SystemExit) as exited:
            try:
                raise error
            except Exception as e:
                train._fail_fast(e)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert exited.value.code == 1
    assert advice in caplog.messages


def test_ctrl_c_is_one_line_and_exit_130_and_leaves_the_checkpoints(tmp_path, monkeypatch, capsys):
    from test_signals_and_faults import signal_self_at

    from torchtitan_like.components.manifest import complete_steps

    signal_self_at(monkeypatch, 3, signal.SIGINT)  # Python's default handler: KeyboardInterrupt
    assert train.main(argv(tmp_path, "--checkpoint.enable", "--checkpoint.interval", "2")) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: interrupted by SIGINT after step 3: stopped without saving (a rerun resumes from the newest complete "
        "checkpoint; SIGTERM or SIGUSR1 stop at a step boundary and save first)"
    ]
    assert sorted(complete_steps(tmp_path / "checkpoint")) == [2]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # (put back)
    # Alone, the interrupted trainer is closed: its SIGTERM handler is put back.
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("error, where", [
    (lambda: RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
        "123 bytes. Error code 12 (Cannot allocate memory)"), "host"),
    (lambda: __import__("torch").OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"), "GPU"),
])
def test_out_of_memory_is_one_line_with_what_to_change(tmp_path, monkeypatch, capsys, error, where):
    from torchtitan_like.trainer import Trainer

    def train_step(self, batches):
        raise error()

    monkeypatch.setattr(Trainer, "train_step", train_step)
    assert train.main(argv(tmp_path, "--training.steps", "1")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: out of {where} memory (")
    assert "lower training.local_batch_size" in err[0] and "tools/plan.py" in err[0]


@pytest.mark.parametrize("key, switch", [
    ("metrics.save_tb_folder", "--metrics.enable_tensorboard"),
    ("profiling.save_traces_folder", "--profiling.enable_profiling"),
])
def test_an_output_subfolder_that_cannot_be_created_is_one_error_line_at_start(tmp_path, capsys, key, switch):
    """The TensorBoard and profiler folders were first made when written: a traceback steps into the run,
    and a segmentation fault inside the profiler's trace handler."""
    (tmp_path / "afile").write_text("")
    args = ["--training.steps", "2", "--profiling.profile_freq", "2", "--profiling.profiler_warmup", "0",
            switch, f"--{key}", str(tmp_path / "afile")]
    assert train.main(argv(tmp_path / "run", *args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot create {tmp_path / 'afile'} ({key}): File exists; choose a writable folder"]
    assert not list((tmp_path / "run").glob("metrics.jsonl"))  # (refused before training)
