"""Pre-emption, fault injection and restart bookkeeping in one process (the torchrun paths are in
tests/integration/test_preemption.py and test_failures.py)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from torchtitan_like import train
from torchtitan_like.components.metrics import MetricsLogger
from torchtitan_like.config.loader import load_config
from torchtitan_like.config.schema import Metrics
from torchtitan_like.distributed.preemption import EXIT_PREEMPTED, PreemptionWatcher
from torchtitan_like.errors import ConfigError
from torchtitan_like.trainer import InjectedFault, Trainer

ROOT = Path(__file__).resolve().parents[2]


def argv(dump: Path, *overrides: str) -> list[str]:
    return [
        "--job.config_file", str(ROOT / "train_configs/debug_model.toml"),
        "--job.dump_folder", str(dump),
        "--training.seq_len", "32",
        "--training.local_batch_size", "2",
        "--training.steps", "6",
        "--metrics.no_enable_tensorboard",
        *overrides,
    ]


pytestmark = pytest.mark.usefixtures("restore_root_logger")  # (tests/conftest.py)


def test_exit_status_is_the_same_everywhere():
    assert train.EXIT_PREEMPTED == EXIT_PREEMPTED == 75


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_watcher_records_the_signal_and_restores_the_handler(sig):
    before = signal.getsignal(sig)
    watcher = PreemptionWatcher()
    watcher.install()
    try:
        assert watcher.agreed_signal(torch.device("cpu")) is None
        os.kill(os.getpid(), sig)  # handled (not fatal) while installed
        assert watcher.received == sig
        assert watcher.agreed_signal(torch.device("cpu")) == sig
    finally:
        watcher.restore()
    assert signal.getsignal(sig) == before


def signal_self_at(monkeypatch, step: int, sig: signal.Signals) -> None:
    """Make the trainer's `step`-th train_step send `sig` to this process (as a scheduler would)."""
    original = Trainer.train_step

    def train_step(self, batches):
        out = original(self, batches)
        if self.step == step:
            os.kill(os.getpid(), sig)
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_sigterm_stops_at_the_step_boundary_with_a_full_checkpoint(tmp_path, monkeypatch, capsys):
    signal_self_at(monkeypatch, 2, signal.SIGTERM)
    code = train.main(argv(tmp_path, "--checkpoint.enable", "--checkpoint.interval", "4"))
    assert code == EXIT_PREEMPTED
    out = capsys.readouterr().out
    assert "pre-empted by SIGTERM: every rank stopped after step 2; checkpoint step-2 saved (full state)" in out
    manifest = json.loads((tmp_path / "checkpoint" / "step-2" / "manifest.json").read_text())
    assert manifest["model_only"] is False and "optimizer" in manifest["contents"]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers are back after train()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_preemption_stop_leaves_no_stack_dump_behind(tmp_path, monkeypatch, capfd, sig):
    """The signal dumps every thread's stack to a file at once (a stuck rank could never write it later); a
    rank that then stops at the step boundary removes it, and nothing reaches the console."""
    original = Trainer.train_step
    dumped = []

    def train_step(self, batches):
        out = original(self, batches)
        if self.step == 2:
            os.kill(os.getpid(), sig)
            dumped.append((tmp_path / "stacks" / "rank0.txt").read_text())
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)
    assert train.main(argv(tmp_path)) == EXIT_PREEMPTED
    assert "in train_step" in dumped[0] and "most recent call first" in dumped[0], dumped
    assert not (tmp_path / "stacks").exists()
    out, err = capfd.readouterr()
    assert f"pre-empted by {sig.name}: every rank stopped after step 2" in out
    assert "most recent call first" not in out + err
    assert signal.getsignal(sig) is signal.SIG_DFL


def test_a_signal_in_the_last_step_is_an_ordinary_finish(tmp_path, monkeypatch):
    signal_self_at(monkeypatch, 6, signal.SIGUSR1)
    try:
        # As `python -m torchtitan_like.train` runs it: the process exits next.
        assert train.main(argv(tmp_path), exiting=True) == 0
        # A later SIGTERM (torchrun forwarding the scheduler's) must not kill the finished process on its
        # way out: the launcher would report the job as pre-empted (exit 75) and Slurm would requeue it.
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
    finally:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)


def test_without_checkpointing_the_stop_says_nothing_was_saved(tmp_path, monkeypatch, capsys):
    signal_self_at(monkeypatch, 1, signal.SIGUSR1)
    assert train.main(argv(tmp_path)) == EXIT_PREEMPTED
    assert "pre-empted by SIGUSR1: every rank stopped after step 1; checkpoint.enable=false, so nothing was saved" in (
        capsys.readouterr().out
    )


def test_fail_at_step_raises_on_the_named_rank(tmp_path):
    trainer = Trainer(load_config(argv(tmp_path, "--debug.fail_at_step", "3", "--debug.fail_rank", "0")))
    try:
        with pytest.raises(InjectedFault, match="debug.fail_at_step=3: injected failure on rank 0"):
            trainer.train()
        # Until close(), a SIGTERM (torchrun's, once a peer has died) is recorded, not fatal: the
        # failing rank still gets to report its own error.
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
        os.kill(os.getpid(), signal.SIGTERM)
        assert trainer.preemption.received == signal.SIGTERM
    finally:
        trainer.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert [h["step"] for h in trainer.history] == [1, 2]
    # The signal came to a run that did not end cleanly: where this rank was then stays on disk.
    stacks = (tmp_path / "stacks" / "rank0.txt").read_text()
    assert "in test_fail_at_step_raises_on_the_named_rank" in stacks, stacks


def test_hang_rank_outside_the_world_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"debug.hang_rank=2 is not a rank of this world of 1: use -1 \(every rank\) or 0..0"):
        Trainer(load_config(argv(tmp_path, "--debug.hang_at_step", "2", "--debug.hang_rank", "2")))


def test_fail_rank_outside_the_world_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"debug.fail_rank=1 is not a rank of this world of 1: use -1 \(every rank\) or 0..0"):
        Trainer(load_config(argv(tmp_path, "--debug.fail_at_step", "2", "--debug.fail_rank", "1")))


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path):
    metrics = MetricsLogger(
        Metrics(), str(tmp_path), enabled=True, flops_per_token=1.0, peak_flops_per_s=None,
        device=torch.device("cpu"), world_size=1,
    )
    for step in range(1, 6):
        metrics.log(step, loss=1.0, grad_norm=1.0, lr=1.0, tokens=1, elapsed_s=1.0, data_wait_s=0.0, steps=1)
    assert metrics.drop_after(3) == 2
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert metrics.drop_after(3) == 0
    # Nothing is lost: a folder reused by a new run without checkpoints keeps the old rows aside.
    assert metrics.drop_after(0) == 3
    aside = [json.loads(line)["step"] for line in (tmp_path / "metrics.dropped.jsonl").read_text().splitlines()]
    assert aside == [4, 5, 1, 2, 3]


def test_a_signal_during_a_long_validation_stops_it_and_saves_the_step(tmp_path, monkeypatch, capsys):
    """A SIGTERM in the middle of a validation (the whole held-out set can take minutes) ends it after
    the current held-out batch: the step's checkpoint is saved within the launcher's grace period,
    instead of the worker being killed mid-validation with nothing saved."""
    from torchtitan_like.components.validation import Validator

    seen: list[int] = []
    run = Validator._token_loss_sums

    def signalled_midway(self, model_parts, t0, **kwargs):
        model = model_parts[0]

        def count(_module, _inputs):
            seen.append(1)
            if len(seen) == 3:
                os.kill(os.getpid(), signal.SIGTERM)

        hook = model.register_forward_pre_hook(count)
        try:
            return run(self, model_parts, t0, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(Validator, "_token_loss_sums", signalled_midway)
    code = train.main(argv(
        tmp_path, "--checkpoint.enable", "--checkpoint.interval", "100",
        "--validation.enable", "--validation.dataset", "synthetic", "--validation.steps", "1000",
        "--validation.freq", "2", "--validation.local_batch_size", "2",
    ))
    assert code == EXIT_PREEMPTED
    out = capsys.readouterr().out
    assert "validation: stopped after 3 global batches" in out and "no val_loss this step" in out
    assert "pre-empted by SIGTERM: every rank stopped after step 2; checkpoint step-2 saved (full state)" in out
    assert len(seen) == 3  # not the 1000 batches asked for
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "val_loss" not in rows[-1]


def test_the_last_steps_validation_is_never_cut_short(tmp_path, monkeypatch):
    """The run ends with the last step anyway, and a resume could not compute that val_loss again."""
    from torchtitan_like.components.validation import Validator

    run = Validator._token_loss_sums

    def signalled(self, model_parts, t0, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # before its first batch
        return run(self, model_parts, t0, **kwargs)

    monkeypatch.setattr(Validator, "_token_loss_sums", signalled)
    code = train.main(argv(
        tmp_path, "--training.steps", "2", "--validation.enable", "--validation.dataset", "synthetic",
        "--validation.steps", "3", "--validation.freq", "2", "--validation.local_batch_size", "2",
    ))
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and "val_loss" in rows[-1]


def test_a_validation_that_read_its_last_batch_is_kept():
    """The stop check runs between global batches once the next one exists: a signal during the last
    batch of the set does not throw the finished validation away."""
    import contextlib

    from torchtitan_like.components.validation import Validator
    from torchtitan_like.config.schema import Validation

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.calls = 0

        def forward(self, tokens):
            self.calls += 1
            return torch.zeros(*tokens.shape, 8) + self.w

    data = [(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))] * 3
    checks: list[int] = []

    def validator(stop_after: int) -> Validator:
        def stop_requested() -> bool:
            checks.append(1)
            return model.calls >= stop_after

        return Validator(
            Validation(enable=True, steps=-1, seq_len=4, local_batch_size=2), data, device=torch.device("cpu"),
            loss_group=None, loss_context=contextlib.nullcontext, amp_context=contextlib.nullcontext,
            stop_requested=stop_requested,
        )

    model = Model()
    assert "val_loss" in validator(stop_after=3).validate([model])  # the signal came in the last batch
    assert model.calls == 3 and len(checks) == 2  # between batches 1-2 and 2-3 only
    model, checks[:] = Model(), []
    assert validator(stop_after=1).validate([model]) == {}  # in the first batch: stops before the second
    assert model.calls == 1
    model, checks[:] = Model(), []
    assert "val_loss" in validator(stop_after=1).validate([model], interruptible=False)
    assert model.calls == 3 and checks == []
