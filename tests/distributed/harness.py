"""Run a function on N ranks (CPU, gloo, one process each) from inside pytest; collect what each returns.

    results = run_on_ranks(fn, world_size=4, tmp_path=tmp_path, args=(...,))

`fn` must be picklable (a module-level function of an importable module, e.g. the test module).
Each rank gets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE in its environment, one CPU thread,
and (by default) the default process group already initialised over a FileStore in `tmp_path`: no
TCP ports, so parallel test jobs cannot collide, and code that calls
`torchtitan_like.distributed.utils.init_distributed()` finds the group and uses it.

Return values come back through pickle files in `tmp_path` (keep them plain: tensors, floats,
dicts; no DTensors). If any rank raises, the test fails with that rank's traceback; a rank that
hangs fails the test after `timeout_s`, with every rank killed.

Shutdown is a barrier, destroy_process_group, a flush, then `os._exit`: gloo sometimes aborts a
finished process in its destructors ("terminate called without an active exception"), and
skipping the interpreter's teardown is what made that go away (see /work/shared/CPU_NOTES.md).
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import pickle
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Imported once by the fork server; every rank starts with them loaded.
_PRELOAD = [
    "torch",
    "torch.distributed.tensor",
    "torch.distributed.tensor.parallel",
    "torch.distributed.fsdp",
    "torchtitan_like.models.llama3.parallelize",
    # torch.use_deterministic_algorithms imports dynamo and inductor (~0.7 s of CPU per rank, every run).
    "torch._dynamo",
    "torch._inductor",
    "torchtitan_like.trainer",
]


def run_on_ranks(
    fn: Callable[..., Any],
    *,
    world_size: int,
    tmp_path: Path,
    args: tuple = (),
    kwargs: dict | None = None,
    env: dict[str, str] | None = None,
    init_process_group: bool = True,
    timeout_s: float = 180.0,
) -> list[Any]:
    """Call `fn(*args, **kwargs)` on `world_size` ranks; return the per-rank results, rank order.

    env: extra environment variables for the ranks. Pass them here, not through os.environ: the
    ranks are forked from a server started once per session, with the environment of that moment.
    """
    from multiprocess_group import require_group  # tests/, which conftest.py puts on sys.path

    require_group(world_size, "run_on_ranks")
    run_dir = Path(tmp_path) / f"ranks_{time.monotonic_ns()}"
    run_dir.mkdir(parents=True)
    # forkserver instead of spawn: the server imports torch once, then each rank is a fork of it
    # (spawn costs ~3 s of imports per rank on 2 cores). Ranks still never inherit pytest's state.
    multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    ctx = mp.start_processes(
        _rank_main,
        args=(fn, world_size, str(run_dir), args, kwargs or {}, env or {}, init_process_group, timeout_s),
        nprocs=world_size,
        join=False,
        start_method="forkserver",
    )
    deadline = time.monotonic() + timeout_s
    failure: str | None = None
    try:
        while not ctx.join(timeout=0.2):
            if time.monotonic() > deadline:
                failure = f"timed out after {timeout_s:.0f} s"
                break
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:  # join() ended the other ranks
        failure = str(e)
    if failure is not None:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        for p in ctx.processes:
            p.join(timeout=10)
        errors = [
            f"--- rank {r} ---\n{(run_dir / f'rank{r}.err').read_text()}"
            for r in range(world_size)
            if (run_dir / f"rank{r}.err").exists()
        ] + [
            f"--- rank {r}: native crash ---\n{fault.read_text()}"
            for r in range(world_size)
            if (fault := run_dir / f"rank{r}.fault").exists() and fault.stat().st_size
        ] + [
            f"--- rank {r}: native stderr, last lines ---\n{_tail(native)}"
            for r in range(world_size)
            if not (run_dir / f"rank{r}.err").exists() and (native := run_dir / f"rank{r}.stderr").exists()
            and native.stat().st_size
        ]
        pytest.fail(
            f"{getattr(fn, '__name__', fn)} on {world_size} ranks failed: {failure}\n" + "\n".join(errors),
            pytrace=False,
        )
    results = []
    for r in range(world_size):
        with open(run_dir / f"rank{r}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _rank_main(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    run_dir: str,
    args: tuple,
    kwargs: dict,
    env: dict[str, str],
    init_process_group: bool,
    timeout_s: float,
) -> None:
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(1)
    out = Path(run_dir)
    # A native crash (SIGSEGV, SIGABRT) leaves no Python traceback: write every thread's stack, and
    # keep what C++ printed on the way down ("terminate called after throwing ... what(): ...") by
    # pointing this process's file descriptor 2 at a file (it is the fork server's otherwise, whose
    # output went to whichever test started it).
    native = os.open(out / f"rank{rank}.stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(native, 2)
    os.close(native)
    faulthandler.enable(file=open(out / f"rank{rank}.fault", "w"), all_threads=True)
    status = 0
    try:
        if init_process_group:
            store = dist.FileStore(str(out / "store"), world_size)
            dist.init_process_group(
                "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
            )
        result = fn(*args, **kwargs)
        tmp = out / f"rank{rank}.pkl.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(result, f)
        tmp.rename(out / f"rank{rank}.pkl")
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        status = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
