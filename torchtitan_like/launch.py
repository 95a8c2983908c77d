"""torchrun, without the launcher's own traceback when a worker fails cleanly or the job is signalled.

`python -m torchtitan_like.launch <torchrun args> -m torchtitan_like.train ...` runs exactly
`torch.distributed.run` (torchrun). Two outcomes get a short message and a meaningful status:

- A worker exits non-zero: torchrun raises ChildFailedError and Python would print the launcher's
  stack. Here each failed rank gets one line, with the error it recorded (train.py writes it to
  torchrun's error file, so it shows even when LOG_RANK hides that rank's output), and the status
  is the first failure's exit code.
- The launcher gets SIGTERM or SIGUSR1 (pre-emption): torchrun forwards the signal to every worker,
  which checkpoint and stop at the next step boundary, and then raises SignalException. The status
  is 75 (EXIT_PREEMPTED: run the same command again to resume from the latest complete checkpoint).
  Other signals give 128 + the signal number, as a shell reports them. A signal that arrives after
  the workers finished training (the final save done, the ranks past their exit barrier) gives 0:
  each worker writes its exit status into a folder this launcher names (EXIT_STATUS_DIR_ENV), so a
  finished job is not reported, and requeued, as pre-empted.
  Workers that got the signal but did not stop at a step boundary (stuck in a collective, killed after the
  shutdown timeout) leave every thread's Python stack at the signal in a file (distributed/stack_dump.py):
  one `run_train: Python stacks of a rank ...: PATH` line names each, in both outcomes.
  Workers that failed while stopping (their pre-emption save on a full disk) are named as failed, with
  their exit status, not as killed by torchrun's shutdown timeout.

Before torchrun starts, the rendezvous endpoint is checked (`check_rendezvous_endpoint`): host[:port] with a
port in 0..65535 (without one, torchrun's 29400; an IPv6 address in brackets), a fixed port when the job
has several nodes, and a host that resolves here. torchrun itself would retry an unresolvable host until
its rendezvous timeout. A bad one is one `error:` line naming run_train.sh's variable, and status 2.

With `--tee` (run_train.sh passes it), torchrun prefixes each console line with the worker's local rank;
here the prefix is the global rank (`[rankN]:`, unless TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE is set), so
the lines of a multi-node job say which rank wrote them, and the workers leave their own rank tag out of
their log lines (RANK_PREFIXED_ENV).

torchrun of torch 2.11 (the oldest torch supported) has no `--shutdown-timeout`: there the option is
accepted and dropped with a warning naming the fixed grace period the workers get instead.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
import tempfile
from typing import Any

import torch
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint
from torch.distributed.run import get_args_parser, run

from torchtitan_like.distributed.preemption import EXIT_PREEMPTED, PREEMPTION_SIGNALS
from torchtitan_like.distributed.stack_dump import collect_stack_files
from torchtitan_like.errors import ConfigError
from torchtitan_like.train import EXIT_STATUS_DIR_ENV, RANK_PREFIXED_ENV


def _first_line(message: object) -> str:
    """The first line of a worker's recorded error; with the next one where the first is only a heading
    ("RuntimeError:", as torch's pipelining errors begin)."""
    text = message.get("message", "") if isinstance(message, dict) else str(message or "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}"
    return lines[0] if lines else ""


# torchrun's fixed grace period where it has no --shutdown-timeout (torch.distributed.elastic's
# PContext.close default, torch 2.11).
FIXED_SHUTDOWN_TIMEOUT_S = 30


def torchrun_parser() -> argparse.ArgumentParser:
    """torchrun's own argument parser, plus `--shutdown-timeout` where this torch's torchrun lacks it
    (it is newer than torch 2.11): there the option is accepted, and `warn_fixed_shutdown_timeout` says
    that it cannot be applied."""
    parser = get_args_parser()
    if "--shutdown-timeout" not in {opt for action in parser._actions for opt in action.option_strings}:
        parser.add_argument("--shutdown-timeout", "--shutdown_timeout", type=int, default=None,
                            dest="unsupported_shutdown_timeout")
    return parser


def warn_fixed_shutdown_timeout(args: argparse.Namespace) -> None:
    value = getattr(args, "unsupported_shutdown_timeout", None)
    if value is not None and value != FIXED_SHUTDOWN_TIMEOUT_S:
        print(
            f"run_train: warning: torch {torch.__version__}'s torchrun has no --shutdown-timeout: after SIGTERM/SIGUSR1 "
            f"the workers get its fixed {FIXED_SHUTDOWN_TIMEOUT_S} s to checkpoint and stop, not SHUTDOWN_TIMEOUT={value} "
            f"(a newer torch honours it)",
            file=sys.stderr,
        )


# torchrun's port for an endpoint without one (torch.distributed.elastic's c10d rendezvous handler).
DEFAULT_RDZV_PORT = 29400


def _endpoint_source(endpoint: str, *, port_at_fault: bool = False) -> str:
    """How the user spelled `endpoint`: run_train.sh's variable it came from, else torchrun's option. With
    `port_at_fault`, the variable that set the port (MASTER_PORT rather than MASTER_ADDR)."""
    if os.environ.get("RDZV_ENDPOINT", "").strip() == endpoint:
        return f"RDZV_ENDPOINT={endpoint}"
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and endpoint == f"{addr}:{port or 29500}":
        if port_at_fault and port:
            return f"MASTER_PORT={port} (rendezvous {endpoint})"
        return f"MASTER_ADDR={addr} (rendezvous {endpoint})"
    if not addr and port and endpoint == f"localhost:{port}":  # (run_train.sh: MASTER_PORT alone, on one node)
        return f"MASTER_PORT={port} (rendezvous {endpoint})"
    return f"--rdzv-endpoint={endpoint}"


def check_rendezvous_endpoint(endpoint: str, nnodes: str) -> None:
    """Raise ConfigError unless `endpoint` is host[:port] with a usable port and a host that resolves here."""
    endpoint = endpoint.strip()
    if not endpoint:
        return  # torchrun's own default (localhost:29400)
    name = _endpoint_source(endpoint)
    try:
        host, port = parse_rendezvous_endpoint(endpoint, default_port=DEFAULT_RDZV_PORT)
    except ValueError:
        raise ConfigError(
            f"{name} is not host[:port] with a port in 0..65535: use e.g. node0:29500 (an IPv6 address in "
            "brackets: [::1]:29500)"
        ) from None
    max_nodes = nnodes.rsplit(":", 1)[-1]
    if port == 0 and max_nodes.isdigit() and int(max_nodes) > 1:
        name = _endpoint_source(endpoint, port_at_fault=True)
        fix = "MASTER_PORT=29500" if name.startswith("MASTER_PORT=") else f"{host}:29500"
        raise ConfigError(
            f"{name}: port 0 (a free port picked on one node) cannot be found by the other nodes of NNODES={nnodes}: "
            f"name a fixed port every node uses, e.g. {fix}"
        )
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        hint = " (an IPv6 address goes in brackets: [::1]:29500)" if ":" in host and not endpoint.startswith("[") else ""
        raise ConfigError(
            f"{name}: host {host!r} does not resolve here ({reason}){hint}: name a host every node reaches (usually "
            "node 0's hostname or address), or on one node unset RDZV_ENDPOINT and MASTER_ADDR"
        ) from None


PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "remote process exited")
"""What gloo (and NCCL) say on a rank whose peer died: a consequence of another rank's failure, never its cause."""


def _peer_lost(failure: Any) -> bool:
    message = failure.message
    text = message.get("message", "") if isinstance(message, dict) else str(message or "")
    return any(s in text for s in PEER_LOST)


def _when(failure: Any) -> tuple[float, float]:
    try:
        return (failure.timestamp, os.stat(failure.error_file).st_mtime_ns)
    except (OSError, TypeError):
        return (failure.timestamp, float("inf"))


def _worker_exit_codes(status_dir: str) -> list[str]:
    """The exit statuses the workers wrote into `status_dir` (train.py's _record_exit_status, after the exit
    barrier for 0 and 75): one per worker that left through train.py's exit, none for a killed one."""
    codes = []
    for name in sorted(os.listdir(status_dir)):
        try:
            with open(os.path.join(status_dir, name)) as f:
                if name.startswith("rank"):
                    codes.append(f.read().strip())
        except OSError:
            continue
    return codes


def _workers_finished(status_dir: str) -> bool:
    """Whether a worker wrote exit status 0: it does so after the exit barrier, so every rank had finished
    training."""
    return "0" in _worker_exit_codes(status_dir)


AGAIN = ("run the same command again to resume from the latest complete checkpoint (the workers' lines above say "
         "which; with checkpoint.enable=false it starts over)")
"""The launcher's advice after a pre-emption (it cannot tell whether the job saves checkpoints; the workers can)."""


def _report_stacks(status_dir: str) -> None:
    """One line per worker that got SIGTERM/SIGUSR1 and did not then stop cleanly: where its Python stacks are
    (torchtitan_like.distributed.stack_dump; a rank stuck in a collective shows there where it was stuck)."""
    for path in collect_stack_files(status_dir).values():
        print(f"run_train: Python stacks of a rank that was signalled and did not stop at a step boundary: {path}",
              file=sys.stderr)


PREFIX_TEMPLATE_ENV = "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"
"""torchrun's template of the tee'd lines' prefix (${rank} is the global rank)."""


def main(argv: list[str] | None = None) -> int:
    args = torchrun_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.rdzv_backend != "static":  # (static reads --master-addr / --master-port instead)
        try:
            check_rendezvous_endpoint(args.rdzv_endpoint, args.nnodes)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    warn_fixed_shutdown_timeout(args)
    status_dir = tempfile.mkdtemp(prefix="torchtitan_like_exit_")
    env = {EXIT_STATUS_DIR_ENV: status_dir}  # inherited by the workers
    if args.tee not in ("", "0"):  # (torchrun prefixes the tee'd console lines only)
        env[RANK_PREFIXED_ENV] = "1"
        env[PREFIX_TEMPLATE_ENV] = os.environ.get(PREFIX_TEMPLATE_ENV) or "[rank${rank}]:"
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return _run(args, status_dir)
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(status_dir, ignore_errors=True)


def _run(args: argparse.Namespace, status_dir: str) -> int:
    try:
        run(args)
    except ChildFailedError as e:
        # torchrun's "first" failure compares whole-second timestamps: a rank that fails fast because a peer
        # failed (exit 1, same second) would win over the peer (a data error, exit 2) by its lower rank.
        # The error files' write times (ns) order them truly; a rank killed by a signal wrote none: last, but
        # before a rank whose error is that its peer died (the one killed from outside, the kernel's OOM killer
        # say, is what the others lost: its SIGKILL used to be listed after their "Connection reset by peer").
        order = sorted(e.failures.items(), key=lambda kv: (_peer_lost(kv[1]), _when(kv[1]), kv[0]))
        rank, failure = order[0]
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        for r, f in order:
            signal_text = f" (signal {f.signal_name()})" if f.exitcode < 0 else ""
            error = _first_line(f.message)
            detail = f": {error}" if error and f.exitcode > 0 and "To enable traceback see" not in error else ""
            print(f"run_train: rank {r} exited with code {f.exitcode}{signal_text}{detail}", file=sys.stderr)
        _report_stacks(status_dir)
        if code == EXIT_PREEMPTED:
            print(f"run_train: pre-empted; {AGAIN}", file=sys.stderr)
        else:
            print(f"run_train: job failed (first failure: rank {rank}); the full error is above", file=sys.stderr)
        return code
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        if _workers_finished(status_dir):
            print(f"run_train: got {name} after the workers had finished training; exit 0", file=sys.stderr)
            return 0
        _report_stacks(status_dir)
        if e.sigval in PREEMPTION_SIGNALS:
            codes = _worker_exit_codes(status_dir)
            failed = sorted({c for c in codes if c not in ("0", str(EXIT_PREEMPTED))}, key=lambda c: (len(c), c))
            if str(EXIT_PREEMPTED) in codes:
                what = ("the workers stopped at a step boundary (saving a checkpoint first when checkpoint.enable is "
                        "on: see the log)")
            elif failed:
                # (A worker that failed while stopping, e.g. its pre-emption save on a full disk, wrote its status.)
                what = (f"the workers failed before they could stop (exit status {', '.join(failed)}: their error is "
                        "above), so nothing was saved after the latest complete checkpoint")
            else:
                # (No status: the signal ended them before training started, when they do not handle it yet,
                # or torchrun killed them after its grace period.)
                what = ("no worker reached a step boundary, so nothing was saved after the latest complete checkpoint "
                        "(the signal came before training started, or a step, a validation or a save took longer "
                        "than torchrun's shutdown timeout: SHUTDOWN_TIMEOUT, --shutdown-timeout)")
            print(
                f"run_train: got {name}; {what}; exit {EXIT_PREEMPTED}: {AGAIN}",
                file=sys.stderr,
            )
            return EXIT_PREEMPTED
        print(f"run_train: got {name}; workers stopped", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
