"""One run per output folder: rank 0 holds a lock on `<folder>/.run.lock` for the whole run.

Two jobs writing one dump folder (a Slurm job submitted twice, or requeued while the first still runs)
would resume from each other's checkpoints, replace them, and interleave their metrics rows. The second
job is refused at start instead, with the holder's host and pid.

The lock is a POSIX record lock (`fcntl.lockf`): the kernel drops it when the holding process ends, however
it ends (a crash or SIGKILL leaves nothing to clean up), it is not inherited by forked children (data loader
workers, compile workers), and NFS carries it to the server. A file system that cannot lock (ENOLCK,
EOPNOTSUPP, e.g. some parallel file systems mounted without lock support) is said in a warning: the run
goes on, undetected twice.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from torchtitan_like.errors import ConfigError

logger = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"


class RunLock:
    """The lock on one output folder; `release()` (or the process's end) lets the next run in."""

    def __init__(self, fd: int | None, path: Path):
        self._fd, self.path = fd, path

    @classmethod
    def acquire(cls, folder: Path, *, key: str) -> RunLock:
        """Create `folder` (parents too) and lock it; ConfigError naming `key` when another live process
        holds it or the folder cannot be made. key: the config key the folder comes from, for messages."""
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create {folder} ({key}): {e.strerror or e}; choose a writable folder") from None
        path = folder / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot write {path} ({key}): {e.strerror or e}; choose a writable folder") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                holder = _read_holder(fd)
                os.close(fd)
                raise ConfigError(
                    f"{folder} ({key}) is in use by another run ({holder}): two runs in one folder would resume from "
                    f"and replace each other's checkpoints and metrics; wait for it to end, stop it, or set another {key}"
                ) from None
            logger.warning(
                "cannot lock %s (%s): this file system does not support locks, so a second run started in %s "
                "would not be detected", path, e.strerror or e, folder,
            )
            return cls(fd, path)
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        return cls(fd, path)

    def release(self) -> None:
        """Unlock (safe to call twice). The file stays: deleting it could race a starting run's lock."""
        if self._fd is not None:
            os.close(self._fd)  # (closing drops the POSIX lock)
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"
