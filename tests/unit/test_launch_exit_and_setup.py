"""Operations: the launcher names the rank that failed first (and its exit status) when a user error and
its consequences land in the same second; a successful distributed run's exit barrier waits for rank 0's
close under the start-up timeout; setup.sh keeps exactly the torch builds pip keeps."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from test_profiling import argv  # the debug model at seq 32, batch 2
from tests.distributed.harness import run_on_ranks

ROOT = Path(__file__).resolve().parents[2]


# --- 1. launch.py: a rank's user error (exit 2) loses to a peer's fail-fast (exit 1) of the same second ------


def _failure(tmp_path: Path, local_rank: int, exitcode: int, message: str, timestamp: int):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    error_file = tmp_path / f"error{local_rank}.json"
    # What train.py's _record_for_launcher writes (ErrorHandler.record_exception): whole-second timestamps.
    error_file.write_text(json.dumps({
        "message": {"message": message, "extraInfo": {"py_callstack": "...", "timestamp": str(timestamp)}}
    }))
    return ProcessFailure(local_rank=local_rank, pid=1000 + local_rank, exitcode=exitcode, error_file=str(error_file))


def test_a_data_error_on_one_rank_is_exit_2_when_a_peer_fails_fast_in_the_same_second(tmp_path, monkeypatch, capsys):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from torchtitan_like import launch

    t = int(time.time())
    # Rank 1 hit a data error (train.py: "error: ..." and exit 2) and recorded it first; rank 0's next
    # collective with it then failed and train.py's _fail_fast ended rank 0 with 1 a few milliseconds later:
    # the same second, and torchrun's 0.1 s poll saw both exits.
    root = _failure(tmp_path, 1, 2, "DataError: training.dataset_path 'shard-7.jsonl' line 3 is not JSON", t)
    time.sleep(0.05)
    consequence = _failure(tmp_path, 0, 1, "RuntimeError: [gloo] Connection closed by peer [127.0.0.1]:12345", t)
    failures = {0: consequence, 1: root}  # (torchrun lists them by local rank)

    def run(args):
        raise ChildFailedError(name="torchtitan_like.train", failures=failures)

    monkeypatch.setattr(launch, "run", run)
    code = launch.main(["--nproc-per-node=2", "-m", "torchtitan_like.train"])
    err = capsys.readouterr().err
    # The job's status is the root cause's: the README's 2 ("config or data error"), and it is named first.
    assert code == 2, err
    assert "first failure: rank 1" in err, err


def test_a_worker_killed_from_outside_is_the_first_failure_not_the_peer_that_lost_it(tmp_path, monkeypatch, capsys):
    """A worker SIGKILLed mid-run (the OOM killer; seen with kill -9 on rank 1 of an NGPU=2 run) records no
    error; rank 0's next collective fails with gloo's "Connection reset by peer" and records that. The
    launcher named rank 0 as the first failure, pointing the user at a consequence."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from torchtitan_like import launch

    t = int(time.time())
    consequence = _failure(tmp_path, 0, 1, "RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error "
                           "[127.0.0.1]:27521: Connection reset by peer. This is typically caused by ...", t)
    killed = ProcessFailure(local_rank=1, pid=1001, exitcode=-9, error_file=str(tmp_path / "none.json"))
    failures = {0: consequence, 1: killed}

    def run(args):
        raise ChildFailedError(name="torchtitan_like.train", failures=failures)

    monkeypatch.setattr(launch, "run", run)
    assert launch.main(["--nproc-per-node=2", "-m", "torchtitan_like.train"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "run_train: rank 1 exited with code -9 (signal SIGKILL)", err
    assert err[-1] == "run_train: job failed (first failure: rank 1); the full error is above", err


# --- 2. train._exit: the success barrier runs under the training timeout while rank 0 is still closing ------


class _Exited(BaseException):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def exit_barrier_run(dump: str) -> dict:
    """train.main then train._exit, as `python -m torchtitan_like.train` ends, with os._exit intercepted.

    Rank 0's purge of the oldest checkpoint (keep_latest_k) takes longer than comm.train_timeout_seconds,
    as deleting a large checkpoint on a network file system does; Trainer.close() waits for it on rank 0
    while rank 1 already waits in _exit's barrier."""

    import torchtitan_like.components.checkpoint as ckpt
    from torchtitan_like import train

    if dist.get_rank() == 0:
        original = ckpt._rmtree_quietly

        def slow_rmtree(path):
            time.sleep(12.0)
            original(path)

        ckpt._rmtree_quietly = slow_rmtree
    real_exit = os._exit

    def fake_exit(code: int) -> None:
        raise _Exited(code)

    os._exit = fake_exit
    result: dict = {}
    try:
        code = train.main(argv(
            Path(dump), "--training.steps", "2", "--training.prefetch_batches", "0",
            "--parallelism.data_parallel_shard_degree", "2",
            "--checkpoint.enable", "--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "1",
            "--comm.train_timeout_seconds", "5",
        ))
        result["main"] = code
        try:
            train._exit(code)
        except _Exited as e:
            result["exit"] = e.code
        except Exception as e:  # in a real run: a traceback and status 1 for a job that trained fine
            result["exit_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        os._exit = real_exit
        if dist.is_initialized() and "exit" not in result:  # (the harness's own closing barrier would fail too)
            dist.destroy_process_group()
    return result


def test_a_successful_run_exits_0_when_rank_0_closes_slower_than_the_train_timeout(tmp_path):
    results = run_on_ranks(exit_barrier_run, world_size=2, tmp_path=tmp_path, args=(str(tmp_path / "out"),),
                           timeout_s=150)
    assert [r.get("main") for r in results] == [0, 0], results
    assert [r.get("exit") for r in results] == [0, 0], results


# --- 3. tools/setup.sh keeps a torch that pip then replaces (a 2.11 pre-release build, as containers ship) -------


def _setup_sh_keeps(tmp_path: Path, version: str) -> bool:
    """Run setup.sh's own "is the installed torch in range?" snippet against a torch reporting `version`."""
    import subprocess
    import sys

    text = (ROOT / "tools" / "setup.sh").read_text()
    snippet = text.split("<<'PY'", 1)[1].split("\n", 1)[1].split("\nPY\n", 1)[0]
    fake = tmp_path / version.replace("+", "_")
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    r = subprocess.run([sys.executable, "-"], input=snippet, text=True, capture_output=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(fake)})
    return r.returncode == 0


def _pip_keeps(version: str) -> bool:
    """Whether pip, installing this package, leaves an installed torch of `version` alone: pip checks an
    installed distribution against the requirement with pre-releases allowed (resolvelib is_satisfied_by)."""
    import tomllib

    try:
        from packaging.requirements import Requirement
    except ImportError:  # (pip's vendored copy)
        from pip._vendor.packaging.requirements import Requirement
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    return req.specifier.contains(version, prereleases=True)


def test_setup_sh_keeps_exactly_the_torch_builds_that_pip_keeps(tmp_path):
    versions = ["2.11.0", "2.12.0a0+nv26.01", "2.13.0+cpu", "2.14.0a0", "2.10.1", "2.11.0a0+git5a1b2c3"]
    differ = [v for v in versions if _setup_sh_keeps(tmp_path, v) != _pip_keeps(v)]
    # (Today: ['2.11.0a0+git5a1b2c3']: setup.sh prints nothing and skips its pinned install, then
    # `pip install -e .` finds torch>=2.11 unmet and pulls torch 2.13 from the index into .venv.)
    assert differ == [], differ


def test_a_worker_error_whose_message_starts_on_its_second_line_is_still_named() -> None:
    from torchtitan_like.launch import _first_line

    # torch's pipelining errors begin with a newline: the 'rank R exited' line said only "RuntimeError:".
    recorded = {"message": "RuntimeError: \n        Failed to run stage backward input:\n        Stage output: (...)"}
    assert _first_line(recorded) == "RuntimeError: Failed to run stage backward input:"
    assert _first_line({"message": "ValueError: bad value\nmore"}) == "ValueError: bad value"
    assert _first_line({"message": "  \n"}) == "" and _first_line(None) == ""


def test_setup_sh_refuses_an_unknown_argument_before_doing_anything():
    """`tools/setup.sh --devv` (or --help) started a plain install without the test dependencies."""
    import subprocess

    r = subprocess.run(["bash", str(ROOT / "tools" / "setup.sh"), "--devv"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "error: tools/setup.sh takes no arguments, or --dev (also the test dependencies); got: --devv\n"
