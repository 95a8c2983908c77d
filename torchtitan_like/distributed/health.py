"""Health of a distributed job: who runs where, do the collectives work, who is slow, how long to wait.

- `log_ranks`: at start-up rank 0 logs every rank's host, device name and memory (one line each).
- `check_collectives`: an all_reduce of known values on every named mesh dim; a broken or stuck
  collective fails at start-up naming the dim, instead of hanging in the first FSDP all-gather.
- `straggler_stats`: the slowest rank's host time per step against the median (all_gather). Host
  time is what a rank spends before the step's first collective (its data, GC, Python): wall-clock
  step times are equal on every rank, since all wait for the slowest inside the collectives.
- `set_pg_timeouts`: the process-group timeout of the default group and of every mesh group
  (comm.train_timeout_seconds once the first step, which may compile, is over).
- `configure_flight_recorder` / `dump_flight_recorder`: torch's flight recorder keeps the last
  comm.trace_buf_size collectives of every process group (NCCL and gloo); a rank that fails writes
  them to comm.save_traces_folder (NCCL's watchdog also does on a collective timeout), where
  `python -m torch.distributed.flight_recorder.fr_trace FOLDER` finds the collective the ranks
  disagree on.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import statistics
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _set_pg_timeout

from torchtitan_like.distributed.parallel_dims import ParallelDims
from torchtitan_like.errors import ConfigError

logger = logging.getLogger(__name__)

_GIB = 1024**3
# 1D meshes that ParallelDims may build: the dims, then the flattened views over several dims.
MESH_NAMES = ("pp", "dp_replicate", "dp_shard", "cp", "tp", "dp", "dp_shard_cp", "dp_cp")


class CollectiveCheckError(RuntimeError):
    """A collective on one mesh dim returned a wrong value, raised, or did not finish in time."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# --- start-up: who runs where ----------------------------------------------------------------------


@dataclass(frozen=True)
class RankInfo:
    rank: int
    host: str
    device: str
    """Device name: the GPU's name, or the CPU model and the cores this process may use."""
    memory_total_gib: float
    memory_free_gib: float | None

    def line(self) -> str:
        free = "" if self.memory_free_gib is None else f", {self.memory_free_gib:.1f} GiB free"
        return f"rank {self.rank}: host {self.host}, {self.device}, {self.memory_total_gib:.1f} GiB{free}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _meminfo_bytes(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rank_info(device: torch.device) -> RankInfo:
    """This process's host, device name and device memory (GPU memory, or the host's RAM on CPU)."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    host = socket.gethostname()
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return RankInfo(rank, host, f"{device} ({torch.cuda.get_device_name(device)})", total / _GIB, free / _GIB)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    free = _meminfo_bytes("MemAvailable")
    return RankInfo(
        rank, host, f"cpu ({_cpu_name()}, {cores} cores, {torch.get_num_threads()} threads)", total / _GIB,
        None if free is None else free / _GIB,
    )


def log_ranks(device: torch.device) -> list[RankInfo]:
    """Gather every rank's RankInfo (collective on the world); rank 0 logs one line per rank."""
    mine = rank_info(device)
    infos = [mine]
    if _distributed():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        infos = gathered
    if mine.rank == 0:
        for info in infos:
            logger.info("%s", info.line())
    return infos


# --- start-up: do the collectives work ---------------------------------------------------------------


def named_meshes(parallel_dims: ParallelDims) -> dict[str, Any]:
    """The 1D meshes the job built (name -> DeviceMesh); empty in a world of one."""
    meshes = {}
    for name in MESH_NAMES:
        mesh = parallel_dims.get_mesh(name)
        if mesh is not None:
            meshes[name] = mesh
    return meshes


def check_collectives(meshes: dict[str, Any], device: torch.device, *, timeout_s: float) -> None:
    """All-reduce (local rank + 1) on the world and on every named mesh; expect n(n+1)/2 everywhere.

    Every rank runs the same checks in the same order. A wrong sum, an error or a collective that
    does not finish within `timeout_s` raises CollectiveCheckError naming the mesh dim.
    """
    if not _distributed():
        return
    checks: list[tuple[str, dist.ProcessGroup | None, int, int]] = [
        ("world", None, dist.get_rank(), dist.get_world_size())
    ]
    for name, mesh in meshes.items():
        checks.append((name, mesh.get_group(), mesh.get_local_rank(), mesh.size()))
    for name, group, local_rank, size in checks:
        value = torch.tensor([float(local_rank + 1)], dtype=torch.float64, device=device)
        try:
            work = dist.all_reduce(value, group=group, async_op=True)
            work.wait(timeout=timedelta(seconds=timeout_s))
        except Exception as e:
            raise CollectiveCheckError(
                f"collective check on mesh dim {name!r} ({size} ranks) failed on rank {dist.get_rank()}: "
                f"all_reduce raised or did not finish within {timeout_s:g} s ({type(e).__name__}: {e}); "
                f"check the network between the ranks of this dim (NCCL_DEBUG=INFO / GLOO_SOCKET_IFNAME)"
            ) from e
        expected = size * (size + 1) / 2
        got = float(value.item())
        if got != expected:
            raise CollectiveCheckError(
                f"collective check on mesh dim {name!r} ({size} ranks) failed on rank {dist.get_rank()}: "
                f"all_reduce of (local rank + 1) returned {got:g}, expected {expected:g}"
            )
    logger.info("collective check passed on %s", ", ".join(f"{n} ({s})" for n, _, _, s in checks))


# --- training: stragglers and timeouts -----------------------------------------------------------------


def straggler_stats(host_s: float, device: torch.device) -> dict[str, float]:
    """Collective on the world: every rank's mean host seconds per step -> {host_time_max,
    host_time_median, slowest_rank} (the same on every rank). Empty in a world of one."""
    if not _distributed():
        return {}
    mine = torch.tensor([host_s], dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    times = [float(t.item()) for t in gathered]
    slowest = max(range(len(times)), key=times.__getitem__)
    return {"host_time_max": times[slowest], "host_time_median": statistics.median(times), "slowest_rank": slowest}


def process_groups(parallel_dims: ParallelDims) -> list[dist.ProcessGroup]:
    """The default group and every mesh group of the job (each once)."""
    groups: dict[int, dist.ProcessGroup] = {}
    default = dist.distributed_c10d._get_default_group()
    groups[id(default)] = default
    for name in (*MESH_NAMES, "hsdp"):
        mesh = parallel_dims.get_mesh(name)
        if mesh is None:
            continue
        for dim in range(mesh.ndim):
            group = mesh.get_group(dim)
            groups.setdefault(id(group), group)
    return list(groups.values())


def set_pg_timeouts(parallel_dims: ParallelDims, timeout_s: float) -> int:
    """Set the collective timeout of the default group and of every mesh group; returns how many.

    torch has no public setter; `_set_pg_timeout` (torch 2.13) covers gloo and NCCL backends.
    """
    if not _distributed():
        return 0
    groups = process_groups(parallel_dims)
    for group in groups:
        _set_pg_timeout(timedelta(seconds=timeout_s), group)
    return len(groups)


# --- hangs: torch's flight recorder ----------------------------------------------------------------

# torch reads each setting under two names, the first of each pair winning; its buffer default is 2000.
FR_BUFFER_ENV = "TORCH_FR_BUFFER_SIZE"
FR_BUFFER_ENV_NCCL = "TORCH_NCCL_TRACE_BUFFER_SIZE"
FR_FILE_ENV = "TORCH_FR_DUMP_TEMP_FILE"
FR_FILE_ENV_NCCL = "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"
NCCL_DUMP_ON_TIMEOUT_ENV = "TORCH_NCCL_DUMP_ON_TIMEOUT"
_FR_BUFFER = (FR_BUFFER_ENV, FR_BUFFER_ENV_NCCL)
_FR_FILE = (FR_FILE_ENV, FR_FILE_ENV_NCCL)

_SET_HERE: dict[str, str] = {}
"""The variables configure_flight_recorder set in this process: an earlier Trainer's, not the job's own."""


def _env_first(names: tuple[str, ...]) -> tuple[str, str] | None:
    """(name, value) of the first of `names` set in the environment, in torch's order of precedence."""
    return next(((k, os.environ[k]) for k in names if k in os.environ), None)


def _buffer_size() -> int | None:
    found = _env_first(_FR_BUFFER)
    if found is None:
        return None
    try:
        return int(found[1])
    except ValueError:
        raise ConfigError(
            f"{found[0]}={found[1]!r} in the environment is not a number of flight-recorder entries: unset it (and "
            "use comm.trace_buf_size) or give an integer"
        ) from None


def configure_flight_recorder(buffer_size: int, prefix: Path) -> str | None:
    """Before the process groups exist: record the last `buffer_size` collectives of each (0 = off, which
    torch's own default of 2000 is not), to be dumped as `{prefix}{rank}`. Variables the job's environment
    already sets win (and are named). Returns a line for the log, or None when the recorder is off.

    torch sizes the recorder once per process, at its first process group: a second Trainer in the same
    process gets its own dump file, not a new size."""
    for k, v in _SET_HERE.items():  # a second Trainer in this process configures afresh
        if os.environ.get(k) == v:
            del os.environ[k]
    _SET_HERE.clear()
    given = {k: os.environ[k] for k in (*_FR_BUFFER, *_FR_FILE) if k in os.environ}
    ours = {NCCL_DUMP_ON_TIMEOUT_ENV: "1"}
    if _env_first(_FR_BUFFER) is None:
        ours[FR_BUFFER_ENV] = str(buffer_size)
    if _env_first(_FR_FILE) is None:
        ours[FR_FILE_ENV] = str(prefix)
    for k, v in ours.items():
        if k not in os.environ:
            os.environ[k] = _SET_HERE[k] = v
    size = _buffer_size()
    if not size or size <= 0:
        return None
    name, file_prefix = _env_first(_FR_FILE)  # type: ignore[misc]
    folder = Path(file_prefix).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        where = f"{name} in the environment" if name in given else "comm.save_traces_folder"
        raise ConfigError(
            f"flight recorder: cannot create {folder} ({where}): {e.strerror or e}; choose a writable folder, or set "
            "comm.trace_buf_size = 0"
        ) from None
    note = f" (from the environment: {', '.join(f'{k}={v}' for k, v in given.items())})" if given else ""
    return (f"flight recorder: the last {size} collectives of each process group; a failing rank writes them to "
            f"{file_prefix}<rank>{note}")


def dump_flight_recorder(rank: int) -> str | None:
    """Write this rank's flight-recorder ring (torch's pickle format, as NCCL's own dumps) to the file
    configure_flight_recorder named. Returns a line for the log naming the file and this rank's last
    recorded collective (ranks that stopped at different ones show who fell behind), or None when the
    recorder is off or the dump failed: a failing rank's report must never fail on this."""
    found = _env_first(_FR_FILE)
    try:
        size = _buffer_size()
    except ConfigError:
        return None
    if found is None or not size or size <= 0:
        return None
    path = Path(f"{found[1]}{rank}")
    try:
        raw = _fr_trace_bytes()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(raw)
        os.replace(tmp, path)
        last = _last_collective(raw)
    except Exception:  # noqa: BLE001 (private API; the rank is already failing with its own error)
        logger.warning("flight recorder: could not write %s", path, exc_info=True)
        return None
    return (f"flight recorder: rank {rank}'s last collectives written to {path}{last} (torch's "
            f"python -m torch.distributed.flight_recorder.fr_trace {path.parent} compares NCCL ranks' files)")


def _fr_trace_bytes() -> bytes:
    """This process's flight-recorder pickle. torch keeps one recorder per kind of backend: NCCL's
    collectives are in ProcessGroupNCCL's own (`_dump_nccl_trace`, what NCCL's timeout dumps write), gloo's
    in the generic one (`_dump_fr_trace`). Seen on an H200 with torch 2.11: the generic dump of an NCCL job
    holds none of its NCCL collectives. A job whose default group has NCCL dumps NCCL's."""
    c10d = torch._C._distributed_c10d
    if _default_group_uses_nccl():
        return c10d._dump_nccl_trace(includeCollectives=True, includeStackTraces=True, onlyActive=False)
    return c10d._dump_fr_trace(includeCollectives=True, includeStackTraces=True)


def _default_group_uses_nccl() -> bool:
    import torch.distributed as dist

    # ("cuda:nccl,cpu:gloo" where the trainer gives every group gloo for CPU tensors too.)
    return dist.is_available() and dist.is_initialized() and "nccl" in str(dist.get_backend()).lower()


def _last_collective(raw: bytes) -> str:
    import pickle

    entries = pickle.loads(raw).get("entries") or []
    if not entries:
        return ""
    e = entries[-1]
    group = e.get("process_group") or ("?", "?")
    name = str(e.get("profiling_name"))
    # (gloo's entries stay "scheduled" even once complete, in torch 2.11 and 2.13: only NCCL's state means anything.)
    state = f", {e.get('state')}" if name.startswith("nccl:") else ""
    return f"; the last: {name} #{e.get('collective_seq_id')} on process group {group[0]} ({group[1]}){state}"
