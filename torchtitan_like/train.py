"""Entry point: `python -m torchtitan_like.train --job.config_file FILE [--section.key value ...]`.

Normally started by run_train.sh through torchrun. `--help` prints every config key with its default
and doc. A user-facing error (TrainerError) prints one line and exits 2 (3 for a diverged run). A run stopped by SIGTERM/SIGUSR1 (pre-emption) saves a
checkpoint and exits 75. Any other exception in a distributed run is logged and ends this rank at
once with status 1, without waiting on the other ranks (torchrun then stops them).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

from torchtitan_like.errors import DISK_FULL_ERRNOS, TrainerError, TrainingError

logger = logging.getLogger("torchtitan_like")

EXIT_CONFIG_OR_DATA = 2
EXIT_TRAINING = 3
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C), as a shell reports it
EXIT_PREEMPTED = 75  # torchtitan_like.distributed.preemption.EXIT_PREEMPTED (not imported: --help stays torch-free)
EXIT_STATUS_DIR_ENV = "TORCHTITAN_LIKE_EXIT_STATUS_DIR"
"""Set by the launcher (launch.py): each rank writes its exit status there as it leaves, so a launcher
that got SIGTERM can tell a finished job (exit 0) from a pre-empted one (75)."""
RANK_PREFIXED_ENV = "TORCHTITAN_LIKE_RANK_PREFIXED"
"""Set by the launcher when torchrun prefixes every console line with the global rank: the log lines then
leave out their own rank tag."""


def _setup_logging() -> None:
    tag = "" if os.environ.get(RANK_PREFIXED_ENV) else f"[rank{os.environ.get('RANK', '0')}] "
    logging.basicConfig(
        level=logging.INFO,
        format=f"{tag}%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )


def main(argv: list[str] | None = None, *, exiting: bool = False) -> int:
    """Train; returns the exit status. `exiting`: the process ends right after (the `__main__` path),
    so a finished run's close() leaves SIGTERM/SIGUSR1 ignored (Trainer.close)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        from torchtitan_like.config.reference import help_text

        print(help_text())
        return 0
    _setup_logging()
    _enable_faulthandler()
    trainer = finished = None
    try:
        from torchtitan_like.config.loader import load_config

        cfg = load_config(argv)
        if cfg.job.print_config:
            from torchtitan_like.config.loader import to_toml

            logger.info("resolved config:\n%s", to_toml(cfg))
        if cfg.job.description:
            logger.info("job: %s", cfg.job.description)
        from torchtitan_like.trainer import Trainer

        trainer = Trainer(cfg)
        trainer.train()
        # Closing waits for the final (async) save: its errors go through the handlers below too, as a
        # one-line error and exit 2 (or fail-fast), not a traceback out of `finally`.
        finished, trainer = trainer, None
        finished.close(exiting=exiting)
    except KeyboardInterrupt:
        # Ctrl-C reaches every rank (and torchrun, which forwards it again): stop now, in one line.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        run = trainer if trainer is not None else finished
        where = f"after step {run.step}" if run is not None else "at start-up"
        print(
            f"error: interrupted by SIGINT {where}: stopped without saving (a rerun resumes from the newest "
            "complete checkpoint; SIGTERM or SIGUSR1 stop at a step boundary and save first)",
            file=sys.stderr, flush=True,
        )
        if _distributed():  # no close(): it could wait on a save's collectives that interrupted ranks never join
            _disarm_stack_dumps(run)
            _exit_now(EXIT_INTERRUPTED)
        signal.signal(signal.SIGINT, previous)  # (alone, close() below finishes a save in flight and unlocks)
        return EXIT_INTERRUPTED
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        _record_for_launcher(e)
        return EXIT_TRAINING if isinstance(e, TrainingError) else EXIT_CONFIG_OR_DATA
    except Exception as e:
        if _distributed():
            _fail_fast(e, trainer)  # no close(): it could wait on collectives that the other ranks never join
        advice = _out_of_memory(e)
        if advice is not None:
            print(f"error: {advice}", file=sys.stderr, flush=True)
            _record_for_launcher(e)
            return EXIT_FAILURE
        advice = _disk_full(e)
        if advice is not None:
            # A full disk or quota, in one line: the traceback of whichever write hit it adds nothing.
            print(f"error: {advice}", file=sys.stderr, flush=True)
            _record_for_launcher(e)
            return EXIT_FAILURE
        _record_for_launcher(e)  # (a world of one under torchrun: the launcher's line shows it too)
        raise
    finally:
        if trainer is not None:  # after an error: release what it holds, without hiding that error
            try:
                trainer.close()
            except Exception:
                logger.exception("closing the trainer after the error above failed as well")
    if finished is not None and finished.stopped_by is not None:
        return EXIT_PREEMPTED
    logger.info("evaluation finished" if finished is not None and finished.evaluate_only else "training finished")
    return 0


def _enable_faulthandler() -> None:
    """A native crash (segfault, abort) prints every thread's Python stack to stderr."""
    try:
        faulthandler.enable(all_threads=True)
    except (AttributeError, ValueError, OSError):  # a stderr without a file descriptor (captured by a test)
        pass


def _distributed() -> bool:
    if "torch" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _fail_fast(e: Exception, trainer: object | None = None) -> NoReturn:
    """Log the error, hand it to torchrun (which prints it whatever LOG_RANK shows), exit 1 at once.

    Call inside the `except` block (the error file records the active traceback). Waiting here, on
    a barrier, a checkpoint or the process group's destructor, is what turns one rank's error into a
    job that hangs until the collective timeout. `trainer`: the failed run's, whose stack dump on
    SIGTERM/SIGUSR1 is disarmed first (kept only if a signal came before the error: where it was stuck).
    """
    import torch.distributed as dist

    from torchtitan_like.distributed.health import dump_flight_recorder
    from torchtitan_like.distributed.preemption import PREEMPTION_SIGNALS

    kept = _disarm_stack_dumps(trainer)  # (before signal.signal: see stack_dump.py)
    for sig in PREEMPTION_SIGNALS:  # torchrun's SIGTERM to the survivors must not cut the report short
        signal.signal(sig, signal.SIG_IGN)
    rank = dist.get_rank()
    logger.error(
        "rank %d failed: %s: %s; this rank exits now, torchrun stops the others", rank, type(e).__name__, e,
        exc_info=True,
    )
    advice = _out_of_memory(e) or _disk_full(e) or _collective_timeout(e)
    if advice is not None:
        logger.error("rank %d: %s", rank, advice)
    _record_for_launcher(e)
    trace = dump_flight_recorder(rank)
    if trace is not None:
        logger.error("%s", trace)
    if kept is not None:
        logger.error("rank %d: its Python stacks when it got SIGTERM/SIGUSR1, before this error: %s", rank, kept)
    _exit_now(EXIT_FAILURE)


def _disarm_stack_dumps(trainer: object | None) -> Path | None:
    """Before a rank leaves without close() (fail-fast, Ctrl-C): disarm `trainer`'s stack dump on SIGTERM/SIGUSR1,
    closing its file; the file stays, and its path is returned, only if a signal wrote a dump into it."""
    stacks = getattr(trainer, "stack_dumps", None)
    return stacks.disarm(keep=True) if stacks is not None else None


def _out_of_memory(e: BaseException) -> str | None:
    """What to change after an allocation failure (a GPU's OutOfMemoryError, or the CPU allocator's
    RuntimeError), in one line; None for any other error."""
    torch = sys.modules.get("torch")
    gpu = torch is not None and isinstance(e, torch.OutOfMemoryError)
    if not gpu and not (isinstance(e, RuntimeError) and "can't allocate memory" in str(e)):
        return None
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return (
        f"out of {'GPU' if gpu else 'host'} memory ({first}): lower training.local_batch_size (with "
        "training.global_batch_size set, gradient accumulation keeps the batch), set activation_checkpoint.mode = "
        "\"full\", shard more (parallelism.data_parallel_shard_degree, tensor_parallel_degree) or ask tools/plan.py "
        "for a layout that fits; profiling.enable_memory_snapshot records what held the memory"
    )


def _disk_full(e: BaseException) -> str | None:
    """What to do after a write hit a full disk or quota (metrics, TensorBoard, config.toml), in one line;
    None for any other error."""
    if not (isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS):
        return None
    where = f" writing {e.filename}" if e.filename else ""
    return (f"{e.strerror}{where}: free space there or point job.dump_folder at another disk (complete checkpoints "
            "are intact; a rerun resumes from the newest)")


COLLECTIVE_TIMEOUT_TEXTS = ("Timed out waiting", "Watchdog caught collective operation timeout")
"""How an error for a collective that outlived its process group's timeout reads: gloo's begins "[.../
unbound_buffer.cc:78] Timed out waiting 100000ms for recv operation to complete" (torch 2.13); NCCL's watchdog
reports "Watchdog caught collective operation timeout: WorkNCCL(...) ran for N milliseconds before timing out"
(torch 2.11-2.13; not seen here: no GPU)."""


def _collective_timeout(e: BaseException) -> str | None:
    """What a collective timeout means and which keys set it, in one line; None for any other error."""
    if not (isinstance(e, RuntimeError) and any(text in str(e) for text in COLLECTIVE_TIMEOUT_TEXTS)):
        return None
    return (
        "a collective waited longer than its timeout (comm.train_timeout_seconds once the first step has ended; "
        "comm.init_timeout_seconds before it and for checkpoint saves): another rank is stuck or far slower (its log "
        "says where; the launcher's lines name the ranks that failed); raise the key only if that work really takes "
        "so long"
    )


def _exit_now(code: int) -> NoReturn:
    """Flush and leave at once: no close(), no barrier, no process-group teardown (the others may be stuck)."""
    _record_exit_status(code)  # (the launcher, signalled meanwhile, then tells a failure from a kill)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _record_for_launcher(e: BaseException) -> None:
    """Write the error to the file torchrun names in TORCHELASTIC_ERROR_FILE (none outside torchrun):
    the launcher prints it on its 'rank R exited' line even when LOG_RANK hides this rank's output."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(e)
    except Exception:  # reporting must never replace the error or the exit
        pass


def _exit(code: int) -> None:
    """Leave the process group cleanly, then exit without interpreter teardown.

    gloo sometimes aborts ("terminate called without an active exception") while Python tears down a
    finished rank, which makes torchrun fail a successful job (see CPU_NOTES). A barrier, an explicit
    destroy, a flush and os._exit avoid it.
    """
    if "torch" in sys.modules:  # (--help never imports it)
        import torch.distributed as dist

        if dist.is_initialized():
            if code in (0, EXIT_PREEMPTED):  # every rank got here together
                dist.barrier()
            dist.destroy_process_group()
    _record_exit_status(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _record_exit_status(code: int) -> None:
    """Write `code` to rank<RANK> in the launcher's EXIT_STATUS_DIR_ENV folder (none outside launch.py).

    After the exit barrier: a 0 there means every rank finished training."""
    folder = os.environ.get(EXIT_STATUS_DIR_ENV)
    if not folder:
        return
    path = os.path.join(folder, f"rank{os.environ.get('RANK', '0')}")
    try:
        with open(path + ".tmp", "w") as f:
            f.write(f"{code}\n")
        os.replace(path + ".tmp", path)
    except OSError:  # reporting must never replace the exit
        pass


if __name__ == "__main__":
    _exit(main(exiting=True))
