"""A ./run_train.sh job running in the background, for tests that signal, kill or wait on it.

    with RunningJob(log_path, args, env={"NGPU": "2"}) as job:
        job.wait_for_step(metrics_jsonl, 3)
        job.send(signal.SIGTERM)
        rc = job.wait(timeout=120)

run_train.sh execs the launcher, so `job.pid` is torchrun's agent. torchrun starts every worker in a
session of its own, so killing the launcher's process group would not reach them: on exit (normal
or not) the job kills the workers' groups, then the launcher's, with SIGKILL. Nothing outlives the
test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from multiprocess_group import require_group

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port that was free a moment ago (bound to port 0 on loopback, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its closing parenthesis.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _is_trainer(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"torchtitan_like.train" in f.read()
    except OSError:
        return False


class RunningJob:
    def __init__(self, log_path: Path, args: list[str], *, env: dict[str, str]) -> None:
        self.log_path = log_path
        full_env = dict(os.environ, PYTHON=sys.executable, **env)
        # NNODES may be an elastic range, "1:2"; each of its nodes is a job of NGPU ranks running at once.
        ranks = int(full_env.get("NGPU", "1")) * int(full_env.get("NNODES", "1").split(":")[-1])
        require_group(ranks, "run_train.sh (NGPU x NNODES)")
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [str(ROOT / "run_train.sh"), *args],
            cwd=ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self._seen_workers: set[int] = set()

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def workers(self) -> list[int]:
        """The launcher's worker processes now (remembered, so kill() finds them even once orphaned)."""
        found = children(self.pid) if self.proc.poll() is None else []
        self._seen_workers.update(found)
        return found

    def send(self, sig: signal.Signals) -> None:
        """Signal the launcher (torchrun's agent), as a scheduler does."""
        os.kill(self.pid, sig)

    def kill_worker(self, pid: int) -> None:
        assert pid in self._seen_workers, f"{pid} is not a worker of this job"
        os.kill(pid, signal.SIGKILL)

    def wait(self, timeout: float) -> int:
        """Exit status of run_train.sh; on timeout, everything is killed and the test fails."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"job did not end within {timeout:.0f} s; its output:\n{self.output()[-6000:]}") from None

    def wait_for_step(self, dump_folder: Path, step: int, timeout: float) -> None:
        """Block until metrics.jsonl lists `step` (the job must still be running)."""
        self._wait_until(lambda: any(row["step"] >= step for row in read_metrics(dump_folder)), f"step {step}",
                         "reach", timeout)

    def wait_for_text(self, text: str, timeout: float) -> None:
        """Block until the job's output holds `text` (the job must still be running)."""
        self._wait_until(lambda: text in self.output(), repr(text), "print", timeout)

    def _wait_until(self, done, what: str, verb: str, timeout: float) -> None:
        """Poll `done()` while the job runs; fail (killing it) if it ends first or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.workers()
            if done():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"job ended (status {self.proc.returncode}) before {what}:\n{self.output()[-6000:]}")
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"job did not {verb} {what} within {timeout:.0f} s:\n{self.output()[-6000:]}")

    def kill(self) -> None:
        self.workers()
        for pid in sorted(self._seen_workers):
            if not _is_trainer(pid):
                continue  # gone (or the pid now belongs to something else)
            try:
                os.killpg(pid, signal.SIGKILL)  # a worker leads its own session and process group
            except (ProcessLookupError, PermissionError):
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> RunningJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self._log.close()
