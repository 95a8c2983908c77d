"""The launcher's torchrun arguments: run_train.sh's options must parse on every supported torch."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from torchtitan_like import launch
from torchtitan_like.train import EXIT_STATUS_DIR_ENV

ROOT = Path(__file__).resolve().parents[2]

RUN_TRAIN_ARGS = ["--nnodes=1", "--nproc-per-node=2", "--shutdown-timeout=60", "-m", "torchtitan_like.train", "--x", "1"]


def test_this_torchs_torchrun_takes_the_shutdown_timeout(capsys):
    args = launch.torchrun_parser().parse_args(RUN_TRAIN_ARGS)
    launch.warn_fixed_shutdown_timeout(args)
    if hasattr(args, "shutdown_timeout"):  # torch >= 2.12: torchrun's own option
        assert args.shutdown_timeout == 60
        assert capsys.readouterr().err == ""
    assert args.training_script == "torchtitan_like.train" and args.training_script_args == ["--x", "1"]


def test_a_torchrun_without_the_option_accepts_it_and_warns(monkeypatch, capsys):
    def old_torchrun_parser() -> argparse.ArgumentParser:  # torch 2.11's torchrun: no --shutdown-timeout
        p = argparse.ArgumentParser()
        for opt in ("--nnodes", "--nproc-per-node"):
            p.add_argument(opt)
        p.add_argument("-m", "--module", action="store_true")
        p.add_argument("training_script")
        p.add_argument("training_script_args", nargs=argparse.REMAINDER)
        return p

    monkeypatch.setattr(launch, "get_args_parser", old_torchrun_parser)
    args = launch.torchrun_parser().parse_args(RUN_TRAIN_ARGS)
    assert args.training_script_args == ["--x", "1"]
    launch.warn_fixed_shutdown_timeout(args)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no --shutdown-timeout" in err
    assert "fixed 30 s" in err and "SHUTDOWN_TIMEOUT=60" in err
    # Its fixed value asked for: nothing to warn about.
    launch.warn_fixed_shutdown_timeout(launch.torchrun_parser().parse_args(["--shutdown-timeout=30", "-m", "x"]))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("worker_codes, expected", [([0, 0], 0), ([75, 75], 75), ([], 75)])
def test_a_signal_after_the_workers_finished_is_exit_0_not_pre_empted(monkeypatch, capsys, worker_codes, expected):
    """torchrun raises SignalException whenever the launcher is signalled, also after the workers finished
    training (SIGTERM during the last save or the exit): that job is done and must not exit 75 (requeued)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    seen = {}

    def run(args):
        status_dir = seen["dir"] = os.environ[EXIT_STATUS_DIR_ENV]
        for rank, code in enumerate(worker_codes):  # real workers leaving through train.py's exit path
            done = subprocess.run(
                [sys.executable, "-c", f"from torchtitan_like.train import _exit; _exit({code})"],
                cwd=ROOT, env={**os.environ, "RANK": str(rank)}, timeout=120,
            )
            assert done.returncode == code
        seen["written"] = sorted(os.listdir(status_dir))
        raise SignalException("got SIGTERM", sigval=signal.SIGTERM)

    monkeypatch.setattr(launch, "run", run)
    monkeypatch.delenv(EXIT_STATUS_DIR_ENV, raising=False)
    code = launch.main(["--nproc-per-node=2", "-m", "torchtitan_like.train"])
    err = capsys.readouterr().err
    assert code == expected, err
    assert seen["written"] == [f"rank{r}" for r in range(len(worker_codes))]
    if expected == 0:
        assert "after the workers had finished training; exit 0" in err
    else:
        assert "exit 75: run the same command again to resume" in err
        # Workers that wrote no status were killed by torchrun after the grace period: not "stopped at a
        # step boundary" (a checkpoint may be missing), and the message says which setting gives more time.
        stopped = "the workers stopped at a step boundary" in err
        killed = "no worker reached a step boundary, so nothing was saved" in err and "SHUTDOWN_TIMEOUT" in err
        assert (stopped, killed) == ((True, False) if worker_codes else (False, True)), err
    assert not os.path.exists(seen["dir"]) and EXIT_STATUS_DIR_ENV not in os.environ


@pytest.mark.parametrize("exit_call, code", [("_exit", 2), ("_exit_now", 1)])
def test_workers_that_failed_while_stopping_are_not_reported_as_killed(monkeypatch, capsys, exit_call, code):
    """A pre-empted job whose workers reached the step boundary and then failed (the pre-emption save on a
    full disk: CheckpointError, exit 2; an unexpected error: fail-fast, exit 1) used to be reported as
    "no worker reached a step boundary ... the signal came before training started, or ... took longer than
    torchrun's shutdown timeout", sending the user after SHUTDOWN_TIMEOUT instead of the workers' error."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    def run(args):
        for rank in range(2):
            done = subprocess.run(
                [sys.executable, "-c", f"from torchtitan_like.train import {exit_call}; {exit_call}({code})"],
                cwd=ROOT, env={**os.environ, "RANK": str(rank)}, timeout=120,
            )
            assert done.returncode == code
        raise SignalException("got SIGTERM", sigval=signal.SIGTERM)

    monkeypatch.setattr(launch, "run", run)
    monkeypatch.delenv(EXIT_STATUS_DIR_ENV, raising=False)
    assert launch.main(["--nproc-per-node=2", "-m", "torchtitan_like.train"]) == 75
    err = capsys.readouterr().err
    assert err == (
        f"run_train: got SIGTERM; the workers failed before they could stop (exit status {code}: their error is "
        "above), so nothing was saved after the latest complete checkpoint; exit 75: run the same command again "
        "to resume from the latest complete checkpoint (the workers' lines above say which; with "
        "checkpoint.enable=false it starts over)\n"
    )


@pytest.mark.parametrize("visible, local_rank, devices, torchrun, expected", [
    (4, 3, "0,1,2,3", True, "cuda:3"),
    (1, 5, "5", False, "cuda:0"),  # a launcher that binds one GPU per process: each sees only its own
    (1, 0, "5", True, "cuda:0"),  # torchrun --virtual-local-rank: one GPU per worker, LOCAL_RANK 0
    (4, 5, "0,1,2,3", True, None),  # NGPU=8 on a node with 4 GPUs: ranks 4..7 would share GPUs 0..3
    (1, 1, None, True, None),  # NGPU=2 on a one-GPU machine, nothing bound: both on GPU 0
    (1, 1, "0", True, None),  # CUDA_VISIBLE_DEVICES=0 NGPU=2: torchrun gives both workers that GPU
])
def test_each_rank_gets_its_own_gpu_or_a_one_line_error(monkeypatch, visible, local_rank, devices, torchrun, expected):
    import torch

    from torchtitan_like.distributed.utils import local_device
    from torchtitan_like.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    for var, value in (("CUDA_VISIBLE_DEVICES", devices), ("TORCHELASTIC_RUN_ID", "job" if torchrun else None)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    if expected is not None:
        assert str(local_device()) == expected
        return
    with pytest.raises(ConfigError) as e:
        local_device()
    shared = ", as every torchrun worker on this node does" if devices is not None else ""
    assert str(e.value) == (
        f"LOCAL_RANK={local_rank}, but this process sees {visible} GPU{'s' if visible > 1 else ''} (CUDA_VISIBLE_DEVICES="
        f"{devices or 'unset'}{shared}): two ranks would share a GPU; start at most {visible} "
        f"process{'es' if visible > 1 else ''} per node (NGPU={visible}), or give each process its own GPU"
    )


@pytest.mark.parametrize("var", ["SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"])
def test_one_of_several_tasks_started_without_torchrun_is_refused(monkeypatch, var):
    import torch.distributed as dist

    from torchtitan_like.distributed.utils import _LAUNCHER_TASK_COUNTS, init_distributed
    from torchtitan_like.errors import ConfigError

    assert not dist.is_initialized() and var in _LAUNCHER_TASK_COUNTS
    monkeypatch.delenv("RANK", raising=False)
    for other in _LAUNCHER_TASK_COUNTS:
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(var, "1")  # a single task: a world of one, as before
    assert init_distributed() == (0, 1)
    monkeypatch.setenv(var, "8")  # `srun --ntasks=8 python -m torchtitan_like.train ...`
    with pytest.raises(ConfigError, match=rf"RANK is unset, but this process is one of 8 tasks .*\({var}=8\).*"
                                          r"start the job through run_train.sh / torchrun"):
        init_distributed()
