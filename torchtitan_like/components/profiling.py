"""[profiling]: torch.profiler traces and CUDA memory snapshots, written per rank under the dump folder.

Traces: every `profile_freq` steps the profiler records `profiler_active` steps after
`profiler_warmup` warm-up steps and writes a Chrome trace (opens in Perfetto, chrome://tracing or
TensorBoard) to `<dump_folder>/<save_traces_folder>/iteration_N/rank{R}_trace.json`, N being the
last recorded step. Step numbers are absolute, so a resumed run profiles the same steps.

Memory snapshots (CUDA only): `torch.cuda.memory._record_memory_history` from the start, a snapshot
every `profile_freq` steps to `<dump_folder>/<save_memory_snapshot_folder>/iteration_N/
rank{R}_memory_snapshot.pickle`, and one more in `iteration_N_exit/` when a step runs out of memory
(open them with https://pytorch.org/memory_viz).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import time
from collections.abc import Iterator

import torch

from torchtitan_like.config.schema import Profiling
from torchtitan_like.errors import ConfigError

logger = logging.getLogger(__name__)

MEMORY_HISTORY_MAX_ENTRIES = 100_000


def trace_path(folder: str, step: int, rank: int) -> str:
    return os.path.join(folder, f"iteration_{step}", f"rank{rank}_trace.json")


@contextlib.contextmanager
def maybe_enable_profiling(
    cfg: Profiling, *, dump_folder: str, rank: int, device: torch.device, global_step: int = 0
) -> Iterator[torch.profiler.profile | None]:
    """A running torch.profiler.profile (call `.step()` after every train step), or None when disabled."""
    if not cfg.enable_profiling:
        yield None
        return
    folder = os.path.join(dump_folder, cfg.save_traces_folder)
    wait = cfg.profile_freq - (cfg.profiler_warmup + cfg.profiler_active)
    if wait < 0:  # validate.py rejects this; kept as an invariant for direct callers
        raise ConfigError(
            f"profiling.profile_freq={cfg.profile_freq} must be >= profiler_warmup({cfg.profiler_warmup}) + "
            f"profiler_active({cfg.profiler_active})"
        )

    # Step numbers are absolute: the profiler counts its steps from 0 in this process, so a resumed run
    # shifts the schedule (and the trace names) by the step it resumed from. (Setting prof.step_num
    # once the profiler has started is too late: its first action was already taken for step 0.)
    base_schedule = torch.profiler.schedule(wait=wait, warmup=cfg.profiler_warmup, active=cfg.profiler_active)

    def schedule(step: int) -> torch.profiler.ProfilerAction:
        return base_schedule(step + global_step)

    recording = (torch.profiler.ProfilerAction.RECORD, torch.profiler.ProfilerAction.RECORD_AND_SAVE)

    def on_trace_ready(prof: torch.profiler.profile) -> None:
        # Also called when the profiler stops: a run that ended (or was pre-empted) just before a capture
        # has already started recording a step that never ran; its trace would hold no training step.
        if schedule(prof.step_num - 1) not in recording:
            # (step_num steps ran here: the capture in progress was of the next one.)
            logger.info("profiler: the run ended before the capture at step %d; no trace",
                        prof.step_num + global_step + 1)
            return
        step = prof.step_num + global_step
        path = trace_path(folder, step, rank)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        t0 = time.perf_counter()
        prof.export_chrome_trace(path)
        logger.info("profiler trace of step %d written to %s in %.2f s", step, path, time.perf_counter() - t0)

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    logger.info(
        "profiling every %d steps (%d warm-up, %d recorded); traces go to %s",
        cfg.profile_freq, cfg.profiler_warmup, cfg.profiler_active, folder,
    )
    with torch.profiler.profile(
        activities=activities, schedule=schedule, on_trace_ready=on_trace_ready, record_shapes=True
    ) as prof:
        yield prof


class MemorySnapshotter:
    """Dumps CUDA memory snapshots every `freq` steps, and once more (`on_oom=True`) when a step runs out of memory."""

    def __init__(self, folder: str, *, rank: int, freq: int, global_step: int) -> None:
        self.folder, self.rank, self.freq, self.step_num = folder, rank, freq, global_step
        torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_MAX_ENTRIES)
        logger.info("recording CUDA memory history; snapshots every %d steps go to %s", freq, folder)

    def step(self, *, on_oom: bool = False) -> None:
        """Call after every train step; with on_oom=True, dump now, for the step that ran out of memory."""
        if not on_oom:
            self.step_num += 1
            if self.step_num % self.freq != 0:
                return
        name = f"iteration_{self.step_num + 1}_exit" if on_oom else f"iteration_{self.step_num}"
        path = os.path.join(self.folder, name, f"rank{self.rank}_memory_snapshot.pickle")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump(torch.cuda.memory._snapshot(), f)
        logger.info("CUDA memory snapshot written to %s", path)

    def close(self) -> None:
        torch.cuda.memory._record_memory_history(enabled=None)


def check_memory_snapshot(cfg: Profiling, device: torch.device) -> None:
    """enable_memory_snapshot needs CUDA: refuse it elsewhere, before anything is built."""
    if cfg.enable_memory_snapshot and device.type != "cuda":
        raise ConfigError(
            f"profiling.enable_memory_snapshot=true records CUDA memory snapshots and needs a GPU, but this run is "
            f"on {device.type}: set profiling.enable_memory_snapshot=false (profiling.enable_profiling works on CPU)"
        )


@contextlib.contextmanager
def maybe_enable_memory_snapshot(
    cfg: Profiling, *, dump_folder: str, rank: int, device: torch.device, global_step: int = 0
) -> Iterator[MemorySnapshotter | None]:
    """A MemorySnapshotter while the block runs, or None when disabled; ConfigError off CUDA."""
    if not cfg.enable_memory_snapshot:
        yield None
        return
    check_memory_snapshot(cfg, device)
    snapshotter = MemorySnapshotter(
        os.path.join(dump_folder, cfg.save_memory_snapshot_folder), rank=rank, freq=cfg.profile_freq,
        global_step=global_step,
    )
    try:
        yield snapshotter
    finally:
        snapshotter.close()
