"""The launcher's torchrun arguments: run_train.sh's options must parse on every supported torch."""

from __future__ import annotations

import argparse

from torchtitan_like import launch

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
