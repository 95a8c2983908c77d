"""Calibrate the parallelism planner: measure this machine and write a hardware profile JSON.

    python benchmarks/calibrate.py                                  # -> benchmarks/profiles/<device>.json
    python benchmarks/calibrate.py --quick --out /tmp/p.json        # small sizes, a smoke run
    python benchmarks/calibrate.py --nproc 4 --inter-node-gbps 40 --json outputs/calibrate.json

The written file is what `torchtitan_like.planner.hardware.load_profile(path)` reads. Measured here,
each timed after warm-up between device synchronizations (CUDA events on GPU, perf_counter on CPU),
the median of several repeats:

- GEMM throughput of the three matmuls of a training MLP projection, (tokens x dim) @ (dim x 4dim)
  forward, its input gradient and its weight gradient: bf16 on CUDA, fp32 on CPU (the CPU runs train
  in fp32); fp8 (`torch._scaled_mm`, e4m3, tensorwise scales) on CUDA GPUs of compute capability 8.9+;
- causal `scaled_dot_product_attention`, forward + backward, in TFLOPS;
- memory bandwidth: one large tensor copy, read + write bytes over time;
- collective bus bandwidth of `all_gather_into_tensor` and `reduce_scatter_tensor` among `--nproc`
  local processes (NCCL on GPU, gloo on CPU), NCCL-tests convention: bytes * (n-1)/n / time;
- memory capacity: the GPU's total memory, or the machine's RAM on CPU.

The profile: on GPU the peaks come from the datasheet table (components/flops.py) and each efficiency
is measured / peak. These are kernel rates of large, back-to-back calls: upper bounds of the step-level
efficiencies the built-in profiles carry (fitted to published step times, launch gaps and small shapes
included; see planner/hardware.py CALIBRATION), so a calibrated GPU profile predicts faster steps. A CPU has no datasheet peak, so the measured GEMM rate is the peak
(gemm_efficiency 1.0) and attention_efficiency is the attention rate over it. Bandwidths are written
as measured (achieved) values with link_efficiency 1.0. Inter-node bandwidth cannot be measured on one
machine: it comes from `--inter-node-gbps`, else a default that is printed as not measured.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from torchtitan_like.components.flops import peak_tflops_of  # noqa: E402
from torchtitan_like.planner.hardware import BUILTIN_PROFILES, HardwareProfile  # noqa: E402

GIB = 2**30
MIB = 2**20

# A collective that has not finished in this time is a hang (a dead peer), not a slow link.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
# The whole multi-process measurement, start-up (a torch import per process) included.
COLLECTIVE_DEADLINE_S = 180.0


@dataclass(frozen=True)
class Timing:
    """How one measurement is repeated: untimed calls first, then `repeats` timed runs of `iters` calls."""

    warmup: int
    repeats: int
    iters: int


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one calibration run (per device kind, full or --quick)."""

    tokens: int
    """Rows of the GEMM activations (local batch x sequence of one rank)."""
    dim: int
    """Model width; the MLP projection is dim -> 4 * dim."""
    attn: tuple[int, int, int, int]
    """Attention (batch, heads, seq_len, head_dim)."""
    copy_mib: int
    """Size of the tensor copied for the memory bandwidth."""
    collective_mib: int
    """Full (gathered / unreduced) buffer of one collective, all ranks together."""
    compute: Timing
    collective: Timing


SIZES: dict[tuple[str, bool], Sizes] = {
    # (device type, quick)
    ("cuda", False): Sizes(tokens=8192, dim=4096, attn=(2, 32, 4096, 128), copy_mib=1024, collective_mib=1024,
                           compute=Timing(10, 5, 20), collective=Timing(5, 5, 10)),
    ("cuda", True): Sizes(tokens=4096, dim=2048, attn=(1, 16, 2048, 128), copy_mib=256, collective_mib=64,
                          compute=Timing(3, 3, 5), collective=Timing(2, 3, 5)),
    ("cpu", False): Sizes(tokens=1024, dim=1024, attn=(1, 8, 2048, 64), copy_mib=512, collective_mib=64,
                          compute=Timing(1, 5, 2), collective=Timing(2, 5, 4)),
    ("cpu", True): Sizes(tokens=256, dim=512, attn=(1, 4, 512, 64), copy_mib=64, collective_mib=4,
                         compute=Timing(1, 3, 2), collective=Timing(1, 3, 2)),
}

# The reduce-scatter and all-gather functions under their newest names: torch 2.13 deprecates
# all_gather_into_tensor / reduce_scatter_tensor for these (same arguments); older torch lacks them.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def seconds_per_call(fn: Callable[[], object], device: torch.device, timing: Timing) -> float:
    """Median over `timing.repeats` of the mean time of one call, after `timing.warmup` untimed calls."""
    for _ in range(timing.warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(timing.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(timing.iters):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / timing.iters)  # elapsed_time is in ms
    else:
        for _ in range(timing.repeats):
            t0 = time.perf_counter()
            for _ in range(timing.iters):
                fn()
            times.append((time.perf_counter() - t0) / timing.iters)
    return statistics.median(times)


def _say(label: str, value: str, detail: str = "") -> None:
    print(f"{label:<50} {value}" + (f"  ({detail})" if detail else ""), flush=True)


# ------------------------------------------------------------------------------------------------
# Compute and memory (one process)
# ------------------------------------------------------------------------------------------------


def gemm_shapes(tokens: int, dim: int) -> list[tuple[str, int, int, int]]:
    """(label, m, k, n) of the three GEMMs that train one dim -> 4*dim linear layer."""
    return [
        ("forward", tokens, dim, 4 * dim),  # (tokens, dim) @ (dim, 4dim)
        ("grad input", tokens, 4 * dim, dim),  # (tokens, 4dim) @ (4dim, dim)
        ("grad weight", dim, tokens, 4 * dim),  # (dim, tokens) @ (tokens, 4dim): reduces over tokens
    ]


def measure_gemm(device: torch.device, dtype: torch.dtype, sizes: Sizes, *, quiet: bool = False) -> dict[str, Any]:
    """TFLOPS of each training GEMM shape and of the three together (total FLOPs / total time)."""
    rows, flops, secs = [], 0.0, 0.0
    name = str(dtype).removeprefix("torch.")
    for label, m, k, n in gemm_shapes(sizes.tokens, sizes.dim):
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        t = seconds_per_call(functools.partial(torch.mm, a, b), device, sizes.compute)
        f = 2.0 * m * k * n
        rows.append({"shape": label, "m": m, "k": k, "n": n, "seconds": t, "tflops": f / t / 1e12})
        flops, secs = flops + f, secs + t
        if not quiet:
            _say(f"gemm {name} {label} ({m}x{k})@({k}x{n})", f"{f / t / 1e12:.4g} TFLOPS")
    total = flops / secs / 1e12
    if not quiet:
        _say(f"gemm {name} all three shapes", f"{total:.4g} TFLOPS")
    return {"dtype": name, "shapes": rows, "tflops": total}


def fp8_unsupported_reason(device: torch.device) -> str | None:
    """Why fp8 GEMMs cannot be measured here, or None when they can."""
    if device.type != "cuda":
        return "fp8 GEMMs are measured on CUDA only"
    if not hasattr(torch, "float8_e4m3fn"):
        return f"torch {torch.__version__} has no float8_e4m3fn"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return f"compute capability {cap[0]}.{cap[1]} < 8.9: no fp8 tensor cores"
    return None


def measure_fp8_gemm(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """TFLOPS of the same three shapes through `torch._scaled_mm` (e4m3 x e4m3 -> bf16, tensorwise scales).

    The GEMM alone: a float8 training linear adds the casts and amax reductions on top, so this is
    an upper bound of what the float8 recipes reach.
    """
    rows, flops, secs = [], 0.0, 0.0
    scale = torch.ones((), device=device, dtype=torch.float32)
    for label, m, k, n in gemm_shapes(sizes.tokens, sizes.dim):
        a = torch.randn(m, k, device=device).to(torch.float8_e4m3fn)
        # _scaled_mm wants the second operand column-major: a (n, k) row-major tensor, transposed.
        b = torch.randn(n, k, device=device).to(torch.float8_e4m3fn).t()
        mm = functools.partial(torch._scaled_mm, a, b, scale, scale, out_dtype=torch.bfloat16)
        t = seconds_per_call(mm, device, sizes.compute)
        f = 2.0 * m * k * n
        rows.append({"shape": label, "m": m, "k": k, "n": n, "seconds": t, "tflops": f / t / 1e12})
        flops, secs = flops + f, secs + t
        _say(f"gemm float8_e4m3fn {label} ({m}x{k})@({k}x{n})", f"{f / t / 1e12:.4g} TFLOPS")
    total = flops / secs / 1e12
    _say("gemm float8_e4m3fn all three shapes", f"{total:.4g} TFLOPS", "_scaled_mm only, no casts")
    return {"dtype": "float8_e4m3fn", "shapes": rows, "tflops": total}


# FLOPs convention for attention (the planner divides the same count by this rate, so they must agree):
# forward = QK^T + PV = 2 matmuls of 2*b*h*s*s*d each = 4*b*h*s*s*d, halved under a causal mask (kernels
# skip the upper triangle). Forward + backward = 3x forward: the backward's matmuls are twice the
# forward's, the "6 FLOPs per weight" training count that components/flops.py `model_flops_per_token`
# uses for its attention score term (12*L*h*s = 3 x 4*L*h*s). The backward's recompute of QK^T
# (FlashAttention's own benchmarks count fwd+bwd = 3.5x) is work the kernel does on top: it lowers the
# measured efficiency, as it lowers the training step's MFU.
ATTENTION_FWD_BWD_OVER_FWD = 3.0


def attention_flops(b: int, h: int, s: int, d: int, *, causal: bool = True) -> float:
    """Forward + backward FLOPs of one attention call (see ATTENTION_FWD_BWD_OVER_FWD)."""
    forward = 4.0 * b * h * s * s * d
    if causal:
        forward /= 2
    return ATTENTION_FWD_BWD_OVER_FWD * forward


def measure_attention(device: torch.device, dtype: torch.dtype, sizes: Sizes) -> dict[str, Any]:
    """TFLOPS of causal scaled_dot_product_attention, forward + backward."""
    b, h, s, d = sizes.attn
    # (batch, heads, seq_len, head_dim): the layout SDPA takes
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(b, h, s, d, device=device, dtype=dtype)

    def step() -> None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(out, (q, k, v), grad_out)  # no .grad accumulation between calls

    t = seconds_per_call(step, device, sizes.compute)
    flops = attention_flops(b, h, s, d)
    name = str(dtype).removeprefix("torch.")
    _say(f"attention {name} causal fwd+bwd b{b} h{h} s{s} d{d}", f"{flops / t / 1e12:.4g} TFLOPS",
         f"fwd+bwd = {ATTENTION_FWD_BWD_OVER_FWD:g}x forward")
    return {"dtype": name, "batch": b, "heads": h, "seq_len": s, "head_dim": d, "seconds": t, "flops": flops,
            "tflops": flops / t / 1e12, "fwd_bwd_over_fwd": ATTENTION_FWD_BWD_OVER_FWD}


def measure_copy(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """GB/s of one large device-to-device copy, counting the bytes read and the bytes written."""
    numel = sizes.copy_mib * MIB // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = seconds_per_call(lambda: dst.copy_(src), device, sizes.compute)
    nbytes = 2 * src.numel() * src.element_size()
    _say(f"memory copy {sizes.copy_mib} MiB", f"{nbytes / t / 1e9:.4g} GB/s", "read + write")
    return {"bytes_moved": nbytes, "seconds": t, "gbps": nbytes / t / 1e9}


# ------------------------------------------------------------------------------------------------
# Collectives (N local processes)
# ------------------------------------------------------------------------------------------------


def _time_collective(op: Callable[[], object], device: torch.device, timing: Timing) -> float:
    """Median over repeats of the slowest rank's time per call (every rank must have finished)."""
    for _ in range(timing.warmup):
        op()
    times = torch.zeros(timing.repeats, dtype=torch.float64, device=device)
    for r in range(timing.repeats):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(timing.iters):
            op()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times[r] = (time.perf_counter() - t0) / timing.iters
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return statistics.median(times.tolist())


def _collective_worker(rank: int, port: int, world: int, device_type: str, nbytes: int, timing: Timing,
                       result_path: str) -> None:
    """One rank: join the group through the parent's store, time the collectives, rank 0 writes the JSON."""
    if device_type == "cuda":
        device, backend, dtype = torch.device("cuda", rank), "nccl", torch.bfloat16
        torch.cuda.set_device(device)
    else:
        # One thread per rank: the ranks share the cores, as in the CPU training runs.
        device, backend, dtype = torch.device("cpu"), "gloo", torch.float32
        torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT,
                            device_id=device if device.type == "cuda" else None)

    elem = torch.empty((), dtype=dtype).element_size()
    shard_numel = max(1, nbytes // elem // world)
    full = torch.randn(shard_numel * world, device=device).to(dtype)
    shard = torch.randn(shard_numel, device=device).to(dtype)
    size = full.numel() * elem  # NCCL-tests "size": the gathered output / the unreduced input
    bus = (world - 1) / world
    result: dict[str, Any] = {"backend": backend, "world_size": world, "dtype": str(dtype).removeprefix("torch."),
                              "bytes": size}

    t = _time_collective(lambda: _all_gather(full, shard), device, timing)
    result["all_gather"] = {"op": "all_gather_into_tensor", "seconds": t, "algbw_gbps": size / t / 1e9,
                            "busbw_gbps": size * bus / t / 1e9}
    try:
        t = _time_collective(lambda: _reduce_scatter(shard, full), device, timing)
        result["reduce_scatter"] = {"op": "reduce_scatter_tensor", "seconds": t, "algbw_gbps": size / t / 1e9,
                                    "busbw_gbps": size * bus / t / 1e9}
    except (RuntimeError, NotImplementedError) as e:
        # Some gloo builds have no reduce_scatter_tensor. An all-reduce is a reduce-scatter then an
        # all-gather; NCCL-tests' all-reduce bus bandwidth (factor 2(n-1)/n) is its per-link rate.
        t = _time_collective(lambda: dist.all_reduce(full), device, timing)
        result["reduce_scatter"] = {"op": "all_reduce", "seconds": t, "algbw_gbps": size / t / 1e9,
                                    "busbw_gbps": size * 2 * bus / t / 1e9,
                                    "note": f"reduce_scatter_tensor unavailable on {backend} ({e}); "
                                            "measured all_reduce instead"}
    if rank == 0:
        _write_atomic(Path(result_path), json.dumps(result))
    # Teardown that does not flake on gloo (see shared/CPU_NOTES.md): barrier, destroy, flush, then
    # _exit, which skips the interpreter shutdown where gloo's threads sometimes abort.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def measure_collectives(device_type: str, world: int, sizes: Sizes) -> dict[str, Any]:
    """All-gather and reduce-scatter bus bandwidth among `world` freshly spawned local processes."""
    # The parent owns the rendezvous store on a port the OS picks: no free-port race, and the
    # children can never wait for a master that has not started.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=COLLECTIVE_TIMEOUT)
    nbytes = sizes.collective_mib * MIB
    with tempfile.TemporaryDirectory(prefix="calibrate_") as tmp:
        result_path = Path(tmp) / "collectives.json"
        ctx = mp.start_processes(
            _collective_worker,
            args=(store.port, world, device_type, nbytes, sizes.collective, str(result_path)),
            nprocs=world, join=False, start_method="spawn",
        )
        deadline = time.monotonic() + COLLECTIVE_DEADLINE_S
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise SystemExit(f"error: the collective measurement ({world} processes) did not finish in "
                                     f"{COLLECTIVE_DEADLINE_S:.0f} s; rerun, or lower --nproc")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        result = json.loads(result_path.read_text())
    del store
    mib = result["bytes"] / MIB
    for key in ("all_gather", "reduce_scatter"):
        r = result[key]
        _say(f"{r['op']} {world} ranks {mib:.0f} MiB {result['backend']}", f"busbw {r['busbw_gbps']:.4g} GB/s",
             f"algbw {r['algbw_gbps']:.4g} GB/s")
        if "note" in r:
            print(f"  note: {r['note']}", flush=True)
    return result


# ------------------------------------------------------------------------------------------------
# Machine facts
# ------------------------------------------------------------------------------------------------


def _meminfo_gib() -> dict[str, float]:
    """/proc/meminfo fields (kB) in GiB."""
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[-1] == "kB":
            out[key] = int(parts[0]) * 1024 / GIB
    return out


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def builtin_profile_for(device_name: str) -> HardwareProfile | None:
    """The built-in profile whose key names this GPU ("NVIDIA H200" -> H200), if any."""
    for key, profile in BUILTIN_PROFILES.items():
        if re.search(rf"\b{key}\b", device_name):
            return profile
    return None


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "device"


def _write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and rename it: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes the file private (0600); give it the usual mode
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sig(x: float, digits: int = 4) -> float:
    """Round to significant digits: the profile's numbers are measurements, not exact."""
    return float(f"{x:.{digits}g}")


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="profile JSON to write (default benchmarks/profiles/<device>.json)")
    p.add_argument("--json", help="also write every measurement (shapes, times, notes) to this JSON file")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not a calibration")
    p.add_argument("--nproc", type=int, help="processes for the collectives (default: the GPUs here; 2 on CPU)")
    p.add_argument("--inter-node-gbps", type=float,
                   help="achieved inter-node bus bandwidth per GPU, GB/s: cannot be measured on one machine "
                        "(default: the built-in profile's NIC value x its link efficiency; on CPU the intra-node "
                        "measurement)")
    p.add_argument("--peak-bf16-tflops", type=float, help="dense bf16 peak of a GPU the peak table does not know")
    p.add_argument("--peak-fp8-tflops", type=float, help="dense fp8 peak of a GPU the peak table does not know")
    a = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    sizes = SIZES[(device.type, a.quick)]
    n_local = torch.cuda.device_count() if cuda else 2
    nproc = a.nproc if a.nproc is not None else n_local
    for flag, value in (("--inter-node-gbps", a.inter_node_gbps), ("--peak-bf16-tflops", a.peak_bf16_tflops),
                        ("--peak-fp8-tflops", a.peak_fp8_tflops)):
        if value is not None and not (math.isfinite(value) and value > 0):
            p.error(f"{flag}={value} must be a positive number")
    if cuda and not 1 <= nproc <= n_local:
        p.error(f"--nproc={nproc} must be between 1 and the {n_local} GPU(s) of this machine")
    if not cuda and nproc < 2:
        p.error(f"--nproc={nproc}: a collective needs at least 2 processes (try --nproc 2)")

    notes: list[str] = []
    # Checked before anything is measured: a missing input must not cost a calibration run.
    if cuda:
        name = torch.cuda.get_device_name(device)
        builtin = builtin_profile_for(name)
        peak_bf16 = a.peak_bf16_tflops or peak_tflops_of(name, "bf16")
        peak_fp8 = a.peak_fp8_tflops or peak_tflops_of(name, "fp8")
        if peak_bf16 is None:
            p.error(f"{name!r} is not in the peak TFLOPS table (components/flops.py): give --peak-bf16-tflops "
                    "(its dense bf16 datasheet peak), and --peak-fp8-tflops if it has fp8 tensor cores")
        if a.inter_node_gbps is None and builtin is None:
            p.error(f"no built-in profile for {name!r} to take the inter-node bandwidth from: give --inter-node-gbps")
        if nproc < 2 and builtin is None:
            p.error(f"one GPU: the intra-node bandwidth cannot be measured and there is no built-in profile for "
                    f"{name!r}; run on a machine with 2 or more GPUs")
        threads = None
        stem = _slug(name)
        print(f"device: {name}, {n_local} GPU(s); collectives on {nproc}", flush=True)
    else:
        name = cpu_model_name()
        stem = _slug("cpu " + name)
        builtin, peak_bf16, peak_fp8 = None, None, None
        # Each rank of a CPU run gets its share of the cores: measure one rank's share.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // nproc)
        torch.set_num_threads(threads)
        print(f"device: cpu, {name}, {cores} core(s); {threads} thread(s) per rank, as {nproc} ranks share them",
              flush=True)

    # Memory capacity, read before this process allocates anything.
    if cuda:
        free, total = torch.cuda.mem_get_info(device)
        mem_gib = torch.cuda.get_device_properties(device).total_memory / GIB
        in_use = (total - free) / GIB
        default_reserved = next(f.default for f in fields(HardwareProfile) if f.name == "reserved_gib")
        reserved = max(float(default_reserved), in_use)
        _say("memory (torch.cuda.get_device_properties)", f"{mem_gib:.4g} GiB",
             f"{in_use:.2f} GiB in use after CUDA init; reserved_gib {reserved:.2f} also covers NCCL and kernel "
             "workspaces, not created here")
    else:
        mem = _meminfo_gib()
        mem_gib = mem["MemTotal"]
        reserved = mem_gib - mem.get("MemAvailable", mem["MemFree"])
        _say("memory (/proc/meminfo MemTotal)", f"{mem_gib:.4g} GiB",
             f"shared by the {nproc} ranks; {reserved:.2f} GiB not available now -> reserved_gib")

    t_start = time.perf_counter()
    compute_dtype = torch.bfloat16 if cuda else torch.float32
    results: dict[str, Any] = {"gemm": measure_gemm(device, compute_dtype, sizes)}
    if not cuda:
        # Information only: CPU runs train in fp32, so the profile uses the fp32 rate. Some CPUs have
        # bf16 matrix units (AMX), others emulate bf16: this line shows which.
        bf16 = measure_gemm(device, torch.bfloat16, sizes, quiet=True)
        _say("gemm bfloat16 all three shapes", f"{bf16['tflops']:.4g} TFLOPS", "information only, not in the profile")
        results["gemm_bf16_info"] = bf16
    reason = fp8_unsupported_reason(device)
    if reason is None:
        results["gemm_fp8"] = measure_fp8_gemm(device, sizes)
    else:
        _say("gemm float8", "not measured", reason)
        results["gemm_fp8"] = {"not_measured": reason}
    results["attention"] = measure_attention(device, compute_dtype, sizes)
    results["memory_copy"] = measure_copy(device, sizes)
    if cuda:
        torch.cuda.empty_cache()  # the spawned ranks need the memory of GPU 0 too

    if nproc >= 2:
        results["collectives"] = measure_collectives(device.type, nproc, sizes)
        ag, rs = (results["collectives"][k]["busbw_gbps"] for k in ("all_gather", "reduce_scatter"))
        # FSDP moves equal bytes through both: the time per byte is the mean of the two, so the
        # bandwidth of the mix is their harmonic mean.
        intra = 2 / (1 / ag + 1 / rs)
        _say("intra-node bus bandwidth", f"{intra:.4g} GB/s", "harmonic mean of all-gather and reduce-scatter")
    else:
        assert builtin is not None
        intra = builtin.intra_node_gbps * builtin.link_efficiency
        notes.append(f"intra-node bandwidth not measured (one GPU): built-in {builtin.name} "
                     f"{builtin.intra_node_gbps:g} GB/s x link efficiency {builtin.link_efficiency:g}")
        _say("intra-node bus bandwidth", f"{intra:.4g} GB/s", "NOT MEASURED: " + notes[-1])
    # The node the profile describes: the one measured, or with one GPU the built-in node whose links it
    # borrows (a node of 1 would leave the planner no TP and price every collective at the NIC rate).
    gpus_per_node = n_local if cuda else nproc
    if cuda and nproc < 2 and builtin is not None:
        gpus_per_node = builtin.gpus_per_node
        notes.append(f"gpus_per_node {gpus_per_node} from built-in {builtin.name} (this machine has {n_local} GPU)")

    if a.inter_node_gbps is not None:
        inter = a.inter_node_gbps
        how = "from --inter-node-gbps"
    elif builtin is not None:
        inter = builtin.inter_node_gbps * builtin.link_efficiency
        how = (f"built-in {builtin.name} {builtin.inter_node_gbps:g} GB/s x link efficiency "
               f"{builtin.link_efficiency:g}; give --inter-node-gbps for your network")
    else:
        inter = intra
        how = "the intra-node measurement: a CPU run has no network of its own"
    notes.append(f"inter-node bandwidth not measured (one machine): {how}")
    _say("inter-node bus bandwidth", f"{inter:.4g} GB/s", "NOT MEASURED: " + how)

    gemm_tflops = results["gemm"]["tflops"]
    attn_tflops = results["attention"]["tflops"]
    fp8_tflops = results["gemm_fp8"].get("tflops")
    extra: dict[str, float] = {}
    if cuda:
        gemm_eff = gemm_tflops / peak_bf16
        attn_eff = attn_tflops / peak_bf16
        if fp8_tflops is not None and peak_fp8 is not None:
            extra["fp8_gemm_efficiency"] = _sig(fp8_tflops / peak_fp8)
        elif fp8_tflops is not None:
            notes.append(f"fp8 measured {fp8_tflops:.4g} TFLOPS but the peak table has no fp8 peak for {name!r}: "
                         "peak_fp8_tflops stays None (give --peak-fp8-tflops to use it)")
            print(f"  note: {notes[-1]}", flush=True)
        elif peak_fp8 is not None:
            notes.append(f"fp8 peak {peak_fp8:g} TFLOPS is known but fp8 was not measured ({reason}): "
                         "fp8_gemm_efficiency keeps its default")
    else:
        # No datasheet peak for a CPU: the measured GEMM rate is the peak, and the other rates are
        # fractions of it. fp8_gemm_efficiency keeps its default; it is unused without an fp8 peak.
        peak_bf16, peak_fp8 = gemm_tflops, None
        gemm_eff, attn_eff = 1.0, attn_tflops / gemm_tflops
        name = f"{name} ({threads} thread{'s' if threads > 1 else ''} per rank)"

    profile = HardwareProfile(
        name=name,
        peak_bf16_tflops=_sig(peak_bf16),
        peak_fp8_tflops=None if peak_fp8 is None else _sig(peak_fp8),
        hbm_gib=_sig(mem_gib),
        hbm_gbps=_sig(results["memory_copy"]["gbps"]),
        intra_node_gbps=_sig(intra),
        inter_node_gbps=_sig(inter),
        gpus_per_node=gpus_per_node,
        gemm_efficiency=_sig(gemm_eff),
        attention_efficiency=_sig(attn_eff),
        link_efficiency=1.0,  # the bandwidths above are achieved values already
        reserved_gib=_sig(reserved, 3),
        device="cuda" if cuda else "cpu",
        **extra,
    )
    _say("efficiency: gemm / attention / fp8 gemm",
         f"{profile.gemm_efficiency:g} / {profile.attention_efficiency:g} / "
         f"{profile.fp8_gemm_efficiency:g}" + ("" if "fp8_gemm_efficiency" in extra else " (default, unmeasured)"))

    out = Path(a.out) if a.out else ROOT / "benchmarks" / "profiles" / f"{stem}.json"
    _write_atomic(out, profile.to_json())
    print(f"profile written: {out}  ({time.perf_counter() - t_start:.1f} s of measurements)", flush=True)
    if a.json:
        report = {
            "device": name, "device_type": device.type, "torch": torch.__version__, "quick": a.quick,
            "nproc": nproc, "threads_per_rank": threads, "sizes": asdict(sizes),
            "measurements": results, "notes": notes, "profile": asdict(profile), "profile_path": str(out),
        }
        _write_atomic(Path(a.json), json.dumps(report, indent=1) + "\n")
        print(f"measurements written: {a.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
