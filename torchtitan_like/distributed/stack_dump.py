"""Where a rank was when it was told to stop: its Python stacks at SIGTERM/SIGUSR1, in a file.

When one rank hangs (in a collective, in a blocking call) and another fails or times out, torchrun
SIGTERMs every worker and SIGKILLs them after its shutdown timeout. The Python pre-emption handler
(preemption.py) only runs between two bytecodes, so a rank blocked inside a C++ call never runs it and
dies leaving no trace of where it was stuck. `faulthandler.register(..., chain=True)` dumps every
thread's Python stack at C level, in the signal handler itself, and then calls the handler it replaced
(the Python one, which still records the signal for a pre-emption stop).

The stacks go to `<dump_folder>/stacks/rank{R}.txt` (`rank{R}_restart{N}.txt` after N torchrun restarts,
so a restart does not overwrite the stuck attempt's file), never to the console. A rank that then stops
at a step boundary (pre-emption, exit 75), finishes, or fails or is interrupted (Ctrl-C) without having
been signalled removes its file: what stays is the stack of a rank that got the signal and did not stop in time (torchrun killed it,
or it failed afterwards). Under the launcher (launch.py) each rank also names its file in the launcher's
status folder, so the launcher's summary lists the stacks that were kept.

Order matters: `signal.signal` replaces the C-level handler, faulthandler's included, so `arm()` comes
after the Python handlers are installed and `disarm()` before they are replaced again (disarming puts
back the handler that arming found).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
from pathlib import Path
from typing import TextIO

logger = logging.getLogger(__name__)

STACKS_FOLDER = "stacks"
"""Folder of the stack files, relative to the job's output folder."""
STACKS_STATUS_PREFIX = "stacks."
"""Name prefix of the files in the launcher's status folder that hold a rank's stack-file path."""


def stack_file(folder: Path, rank: int, restart: int = 0) -> Path:
    """`folder`/stacks/rank{R}.txt, or rank{R}_restart{N}.txt in torchrun's N-th restart."""
    suffix = f"_restart{restart}" if restart > 0 else ""
    return folder / STACKS_FOLDER / f"rank{rank}{suffix}.txt"


class StackDumps:
    """Dumps every thread's Python stack to `path` whenever one of `signals` arrives, while armed."""

    def __init__(self, path: Path, signals: tuple[signal.Signals, ...], *, status_dir: str | None = None) -> None:
        self.path = path
        self.signals = signals
        self.status_dir = status_dir
        """The launcher's status folder (train.EXIT_STATUS_DIR_ENV), where this rank names its file; None outside it."""
        self._file: TextIO | None = None
        self._registered: list[signal.Signals] = []

    @property
    def armed(self) -> bool:
        return self._file is not None

    def _status_path(self) -> Path | None:
        if not self.status_dir:
            return None
        return Path(self.status_dir) / f"{STACKS_STATUS_PREFIX}{self.path.name}"

    def arm(self) -> bool:
        """After the Python handlers of `signals` are installed (main thread only). False when the file cannot be
        created: a job must not fail for want of a debugging aid (the log says so)."""
        if self._file is not None or threading.current_thread() is not threading.main_thread():
            return False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w")  # (faulthandler writes to its descriptor, unbuffered)
        except OSError as e:
            logger.warning("stack dumps: cannot create %s (%s): a stuck rank's stacks will not be saved", self.path, e)
            return False
        for sig in self.signals:
            # A registration left by an earlier run in this process (never disarmed) would make register() only
            # swap the file, not reinstall its C handler over the Python one installed since: drop it first,
            # putting the current Python handler back over whatever that registration had saved.
            current = signal.getsignal(sig)
            if faulthandler.unregister(sig) and current is not None:
                signal.signal(sig, current)
            faulthandler.register(sig, file=self._file, all_threads=True, chain=True)
            self._registered.append(sig)
        status = self._status_path()
        if status is not None:
            try:
                status.write_text(f"{self.path.resolve()}\n")
            except OSError:  # the launcher then only misses the file's name
                pass
        return True

    def disarm(self, *, keep: bool) -> Path | None:
        """Put the replaced handlers back and close the file. The file stays only when `keep` and a signal wrote
        into it; returns its path then, else None. Before `signal.signal` replaces the Python handlers."""
        if self._file is None:
            return None
        for sig in self._registered:
            faulthandler.unregister(sig)
        self._registered = []
        self._file.close()
        self._file = None
        try:
            kept = keep and self.path.stat().st_size > 0
        except OSError:
            kept = False
        if kept:
            return self.path
        for path in (self.path, self._status_path()):
            if path is not None:
                try:
                    path.unlink()
                except OSError:
                    pass
        try:
            self.path.parent.rmdir()  # (only when no other rank's file is left in it)
        except OSError:
            pass
        return None


def collect_stack_files(status_dir: str) -> dict[str, str]:
    """For the launcher, once the workers are gone: {file name: path} of the stack files the workers named in
    `status_dir` that hold a dump. An empty one (its rank was killed without a signal first, by the kernel's
    OOM killer say) is removed."""
    found = {}
    for name in sorted(os.listdir(status_dir)):
        if not name.startswith(STACKS_STATUS_PREFIX):
            continue
        try:
            with open(os.path.join(status_dir, name)) as f:
                path = f.read().strip()
            if os.path.getsize(path) > 0:
                found[name[len(STACKS_STATUS_PREFIX):]] = path
            else:
                os.unlink(path)
                os.rmdir(os.path.dirname(path))  # (only when no other rank's file is left in it)
        except OSError:
            continue
    return found
