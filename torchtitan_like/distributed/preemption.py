"""Pre-emption: SIGTERM or SIGUSR1 stops the job at the next step boundary that every rank agrees on.

Slurm (and most schedulers) warn a job it is about to be pre-empted with SIGTERM, or with a signal
the job asks for (`#SBATCH --signal=USR1@120`). Through torchrun the signal reaches the launcher
(the torchrun agent), which forwards it to every worker's process group (run_train.sh lists SIGUSR1
in `--signals-to-handle`; torchrun's default list has SIGTERM but not SIGUSR1, and an unhandled
SIGUSR1 kills the agent and orphans the workers). The agent then waits `--shutdown-timeout`
seconds before it kills the workers.

A signal can reach some ranks and not others, or reach them in different steps, so no rank acts on
its own: the handler only records the signal, and at every step boundary the ranks all-reduce it
(MAX) so they all see the same answer in the same step. The trainer then saves a full checkpoint and
leaves with EXIT_PREEMPTED.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""Exit status of a job stopped by SIGTERM/SIGUSR1 (EX_TEMPFAIL): run the same command again to resume."""

PREEMPTION_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatcher:
    """Records SIGTERM/SIGUSR1 while installed; `agreed_signal()` is the per-step collective check.

    `install()` / `restore()` replace and put back the process's handlers (main thread only: Python
    delivers signals there, and `signal.signal` refuses other threads).
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS) -> None:
        self.signals = signals
        self._received = 0  # the first signal number received; 0 = none
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def received(self) -> signal.Signals | None:
        """The signal this process received (not yet agreed with the others), if any."""
        return signal.Signals(self._received) if self._received else None

    def install(self) -> None:
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def restore(self, *, ignore: bool = False) -> None:
        """Put back the handlers that install() replaced. With `ignore`, ignore the signals from now on
        instead: for a process whose run has ended and that only has to exit, a signal has nothing left
        to save, and being killed by it would report a finished job as pre-empted (exit 75, requeued)."""
        if ignore and threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                signal.signal(sig, signal.SIG_IGN)
        else:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the handler runs between two bytecodes of whatever the main thread was doing
        # (possibly inside a collective's Python wrapper), so it must not log, save or communicate.
        if not self._received:
            self._received = signum

    def agreed_signal(self, device: torch.device, group: dist.ProcessGroup | None = None) -> signal.Signals | None:
        """Collective over `group` (default: the world): the signal some rank received, on every rank.

        Call it at the same point of every step on every rank. With several signals, the highest
        signal number wins, so every rank names the same one.
        """
        value = self._received
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            flag = torch.tensor([value], dtype=torch.int64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            value = int(flag.item())
        return signal.Signals(value) if value else None
