"""The stack dump on SIGTERM/SIGUSR1 (torchtitan_like/distributed/stack_dump.py), in one process: it writes
every thread's stack at C level, still lets the pre-emption handler record the signal, and gives the
handlers back; the launcher's collection keeps only the files that hold a dump."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from torchtitan_like.distributed.preemption import PreemptionWatcher
from torchtitan_like.distributed.stack_dump import StackDumps, collect_stack_files, stack_file


def test_stack_file_names_the_rank_and_the_restart(tmp_path):
    assert stack_file(tmp_path, 3) == tmp_path / "stacks" / "rank3.txt"
    assert stack_file(tmp_path, 3, restart=2) == tmp_path / "stacks" / "rank3_restart2.txt"


def _blocked_helper(started: threading.Event, release: threading.Event) -> None:
    started.set()
    release.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_dumps_every_thread_and_the_stop_is_still_recorded(tmp_path, sig):
    before = signal.getsignal(sig)
    watcher = PreemptionWatcher()
    dumps = StackDumps(stack_file(tmp_path, 0), (sig,), status_dir=str(tmp_path))
    started, release = threading.Event(), threading.Event()
    helper = threading.Thread(target=_blocked_helper, args=(started, release), daemon=True)
    helper.start()
    started.wait()
    watcher.install()
    try:
        assert dumps.arm()  # after install(): its signal.signal would replace faulthandler's handler
        os.kill(os.getpid(), sig)
        assert watcher.received == sig  # chained: the Python handler ran too
        text = dumps.path.read_text()
        assert "in test_a_signal_dumps_every_thread_and_the_stop_is_still_recorded" in text, text
        assert "in _blocked_helper" in text, text  # all threads
        assert collect_stack_files(str(tmp_path)) == {"rank0.txt": str(dumps.path.resolve())}
        assert dumps.disarm(keep=True) == dumps.path
    finally:
        release.set()
        dumps.disarm(keep=False)
        watcher.restore()
    assert signal.getsignal(sig) == before
    assert dumps.path.exists()  # kept: a signal wrote into it


def test_disarm_removes_the_file_unless_kept_with_a_dump(tmp_path):
    watcher = PreemptionWatcher()
    watcher.install()
    try:
        kept_empty = StackDumps(stack_file(tmp_path, 0), (signal.SIGUSR1,), status_dir=str(tmp_path))
        assert kept_empty.arm()
        assert kept_empty.disarm(keep=True) is None  # no signal: nothing to keep
        assert not (tmp_path / "stacks").exists()
        assert collect_stack_files(str(tmp_path)) == {}

        dropped = StackDumps(stack_file(tmp_path, 0), (signal.SIGUSR1,), status_dir=str(tmp_path))
        assert dropped.arm()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert dropped.path.stat().st_size > 0
        assert dropped.disarm(keep=False) is None  # a clean stop: the dump says nothing
        assert not (tmp_path / "stacks").exists()
        assert collect_stack_files(str(tmp_path)) == {}
    finally:
        watcher.restore()


def test_the_launcher_removes_the_empty_file_of_a_rank_killed_without_a_signal(tmp_path):
    dumps = StackDumps(stack_file(tmp_path / "out", 1), (signal.SIGUSR1,), status_dir=str(tmp_path))
    watcher = PreemptionWatcher()
    watcher.install()
    try:
        assert dumps.arm()
        assert collect_stack_files(str(tmp_path)) == {}  # (as after a SIGKILL: the file is still armed, empty)
        assert not dumps.path.exists() and not dumps.path.parent.exists()
    finally:
        dumps.disarm(keep=False)
        watcher.restore()


def test_a_folder_that_cannot_be_created_only_warns(tmp_path, caplog):
    (tmp_path / "file").write_text("")
    dumps = StackDumps(stack_file(tmp_path / "file", 0), (signal.SIGUSR1,))
    assert not dumps.arm()
    assert "stack dumps: cannot create" in caplog.text
    assert dumps.disarm(keep=True) is None


def test_a_registration_left_by_an_earlier_run_does_not_stop_the_dump(tmp_path):
    """An earlier run in this process armed and was never disarmed (a test, a notebook); the pre-emption handler
    installed since replaced faulthandler's C handler. Arming again must dump and still chain to it."""
    earlier = StackDumps(stack_file(tmp_path / "earlier", 0), (signal.SIGUSR1,))
    watcher = PreemptionWatcher()
    watcher.install()
    assert earlier.arm()
    watcher.restore()  # (replaces the C handler under faulthandler's registration)
    watcher = PreemptionWatcher()
    watcher.install()
    dumps = StackDumps(stack_file(tmp_path / "now", 0), (signal.SIGUSR1,))
    try:
        assert dumps.arm()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watcher.received == signal.SIGUSR1
        assert "in test_a_registration_left_by_an_earlier_run_does_not_stop_the_dump" in dumps.path.read_text()
    finally:
        dumps.disarm(keep=False)
        watcher.restore()
        earlier.disarm(keep=False)
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_a_distributed_rank_stopped_by_ctrl_c_closes_its_stack_dump(tmp_path, monkeypatch):
    """A rank of a distributed job that Ctrl-C stops leaves at once (train._exit_now, no close()): its stack dump
    stayed armed, with the file open and an empty stacks/rank0.txt left in the output folder (fail-fast disarmed
    it; this path did not)."""
    import faulthandler

    from test_signals_and_faults import argv, signal_self_at

    from torchtitan_like import train
    from torchtitan_like.distributed.preemption import PREEMPTION_SIGNALS
    from torchtitan_like.trainer import Trainer

    made: list[Trainer] = []
    original_init = Trainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        made.append(self)

    seen = {}

    def exit_now(code):  # (the real one is os._exit: no finally, no close(); what it leaves is seen here)
        seen.update(armed=made[0].stack_dumps.armed, left=(tmp_path / "stacks").exists())
        raise SystemExit(code)

    monkeypatch.setattr(Trainer, "__init__", init)
    monkeypatch.setattr(train, "_distributed", lambda: True)
    monkeypatch.setattr(train, "_exit_now", exit_now)
    signal_self_at(monkeypatch, 2, signal.SIGINT)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, *PREEMPTION_SIGNALS)}
    try:
        with pytest.raises(SystemExit) as exited:
            train.main(argv(tmp_path))
        assert exited.value.code == 130
        assert seen == {"armed": False, "left": False}
    finally:
        for sig, handler in before.items():
            faulthandler.unregister(sig)
            signal.signal(sig, handler)
