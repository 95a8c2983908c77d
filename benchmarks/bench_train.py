"""Training throughput of one named config: N timed steps after warm-up, optionally beside torchtitan.

    python benchmarks/bench_train.py --list
    python benchmarks/bench_train.py --name 1B_compile_f8_rowwise                # ours only
    python benchmarks/bench_train.py --name 1B_compile_f8_rowwise --peer-site /tmp/site   # + torchtitan
    python benchmarks/bench_train.py --matrix --peer-site /tmp/site              # the whole matrix
    python benchmarks/bench_train.py --name debug_cpu --steps 3 --warmup 1      # smoke run on CPU

Each run is a fresh `torchrun --standalone --nproc_per_node=NGPU` process (clean memory, its own
compile), training on synthetic tokens, with checkpoints off and one metrics log at the end. Every
train step is timed between two device synchronizations; the first `--warmup` steps (compile,
allocator warm-up) are dropped. Printed and written as JSON (one file per run, plus summary.json):

- tokens/s per device (tokens of one device's step / median step time; the mean too);
- TFLOPS per device and MFU, two ways: the NeMo formula `model_flops_per_token(args, seq)` (what
  torchtitan and Megatron report), and the causal-discounted one (causal=True: the attention score
  work halved, what causal kernels actually do); MFU against the device's dense bf16 peak (float8
  runs too, the usual convention);
- peak memory (GPU: max allocated and reserved; CPU: peak RSS);
- step time min / median / max / mean / std.

Side by side (`--peer-site DIR`, where `shared/gpu/fetch_wheels.sh --peer` installs torchtitan
0.2.2): the same shape, batch, sequence and features run in torchtitan through
benchmarks/torchtitan_peer.py, timed the same way, and the ratio ours / torchtitan is reported
with the torchtitan version that ran.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark row: a model shape and the features it trains with (ours and torchtitan alike)."""

    flavor: str
    seq_len: int
    local_batch_size: int = 1
    compile: bool = False
    float8: str | None = None
    """float8 recipe (tensorwise, rowwise, rowwise_with_gw_hp) or None for bf16."""
    ac: str = "none"
    """none, full, selective_op or selective_N (every N-th block)."""
    dtype: str = "bfloat16"
    """training.mixed_precision_param (float32 for the CPU smoke runs)."""
    extra: tuple[str, ...] = field(default=())
    """More overrides for our trainer only (not mirrored to torchtitan)."""
    variant: str | None = None
    """An experiment on our trainer only (VARIANTS): applied in the worker before the model is built."""

    def features(self) -> str:
        parts = ["compile" if self.compile else "eager", self.dtype]
        if self.float8:
            parts.append(f"float8 {self.float8}")
        if self.ac != "none":
            parts.append(f"AC {self.ac}")
        if self.extra:
            parts.append(" ".join(self.extra))
        if self.variant:
            parts.append(f"variant {self.variant}")
        return ", ".join(parts)

    def _ac_args(self) -> list[str]:
        if self.ac == "none" or self.ac == "full":
            return ["--activation_checkpoint.mode", self.ac]
        option = self.ac.removeprefix("selective_")
        return ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", option]

    def ours_args(self, *, steps: int, dump: str, profile_steps: int = 0) -> list[str]:
        args = [
            "--model.flavor", self.flavor,
            "--training.seq_len", str(self.seq_len),
            "--training.local_batch_size", str(self.local_batch_size),
            "--training.steps", str(steps),
            "--training.dataset", "synthetic",
            "--training.mixed_precision_param", self.dtype,
            "--lr_scheduler.warmup_steps", "1",
            "--metrics.log_freq", str(steps),
            "--metrics.no_enable_tensorboard",
            "--job.dump_folder", dump,
            *self._ac_args(),
        ]
        if self.compile:
            args += ["--compile.enable", "--compile.components", "model,loss"]
        if self.float8:
            args += ["--model.converters", "float8", "--quantize.linear.float8.recipe_name", self.float8]
        return args + profile_args(total=steps, profile_steps=profile_steps) + list(self.extra)

    def peer_args(self, *, steps: int, dump: str, profile_steps: int = 0) -> list[str]:
        """torchtitan 0.2.2's CLI for the same run (its TOML schema is ours; its defaults are not)."""
        args = [
            "--model.name", "llama3_bench",  # torchtitan's llama3 spec + our flavors + synthetic data (torchtitan_peer.py)
            "--model.flavor", self.flavor,
            "--training.seq_len", str(self.seq_len),
            "--training.local_batch_size", str(self.local_batch_size),
            "--training.steps", str(steps),
            "--training.mixed_precision_param", self.dtype,
            "--lr_scheduler.warmup_steps", "1",
            "--metrics.log_freq", str(steps),
            "--job.dump_folder", dump,
            *self._ac_args(),  # explicit: torchtitan's default is selective AC every 2nd block
        ]
        if self.compile:
            args += ["--compile.enable", "--compile.components", "model,loss"]
        if self.float8:
            # torchtitan's filter_fqns defaults to nothing; ours to ["output"]: say it.
            args += ["--model.converters", "quantize.linear.float8",
                     "--quantize.linear.float8.recipe_name", self.float8,
                     "--quantize.linear.float8.filter_fqns", "output"]
        return args + profile_args(total=steps, profile_steps=profile_steps)


TRACES = "bench_traces"
"""profiling.save_traces_folder of a profiled run (both trainers: <dump>/<folder>/iteration_N/rank0_trace.json)."""
PROFILER_WARMUP = 1
"""Steps the profiler runs, and discards, before the profiled ones."""


def profile_args(*, total: int, profile_steps: int) -> list[str]:
    """The profiling keys (the same in both trainers' schema) that trace the last `profile_steps` of `total`
    steps, after the timed ones: the profiler waits (records nothing) until then, so the timing is untouched."""
    if profile_steps <= 0:
        return []
    return ["--profiling.enable_profiling", "--profiling.save_traces_folder", TRACES,
            "--profiling.profile_freq", str(total), "--profiling.profiler_warmup", str(PROFILER_WARMUP),
            "--profiling.profiler_active", str(profile_steps)]


def total_steps(*, warmup: int, steps: int, profile_steps: int) -> int:
    """Steps a run trains: warm-up, timed, then (profiling) the profiler's warm-up and its traced steps."""
    return warmup + steps + (PROFILER_WARMUP + profile_steps if profile_steps > 0 else 0)


def collect_trace(dump: str | Path, dest: Path) -> Path | None:
    """Copy rank 0's trace of the last profiled iteration under `dump`, gzipped, to `dest` (None: no trace)."""
    import gzip
    import shutil

    found = sorted(Path(dump).glob(f"{TRACES}/iteration_*/rank0_trace.json"),
                   key=lambda p: int(p.parent.name.removeprefix("iteration_")))
    if not found:
        return None
    with open(found[-1], "rb") as src, gzip.open(dest, "wb", compresslevel=6) as out:
        shutil.copyfileobj(src, out)
    return dest


_1B = BenchConfig(flavor="1B", seq_len=8192)
# The 8B-width slice trains without activation checkpointing (the issue asks for AC only where needed to fit):
# the planner puts its peak at 62.5 GiB eager and 49.7 GiB compiled on an 80 GB H100 (tools/plan.py --model
# llama3:8B_slice8 --ngpu 1 --hardware H100 --seq-len 8192 --global-batch 1 --no-compile / --compile), and
# the H200 run of 2026-12-04, with selective op AC, peaked at 42.6 GiB. `--ac selective_op` reruns that
# setting (the rows of that day in benchmarks/RESULTS.md), `--ac full` is the fallback for a smaller GPU.
_8B = BenchConfig(flavor="8B_slice8", seq_len=8192)

CONFIGS: dict[str, BenchConfig] = {
    "1B_eager_bf16": _1B,
    "1B_compile_bf16": replace(_1B, compile=True),
    "1B_compile_f8_rowwise": replace(_1B, compile=True, float8="rowwise"),
    "1B_compile_f8_tensorwise": replace(_1B, compile=True, float8="tensorwise"),
    "8B_slice8_eager_bf16": _8B,
    "8B_slice8_compile_bf16": replace(_8B, compile=True),
    "8B_slice8_compile_f8_rowwise": replace(_8B, compile=True, float8="rowwise"),
    "8B_slice8_compile_f8_tensorwise": replace(_8B, compile=True, float8="tensorwise"),
    # Issue 7's long-sequence baseline on one GPU (context_parallel_degree 1): full AC, and the loss
    # computed 8192 positions at a time (the 128K logits alone would take 63 GiB in float32).
    **{
        f"1B_long{seq // 1024}k_fullac": replace(
            _1B, seq_len=seq, compile=True, ac="full", extra=("--training.loss_chunk_size", "8192")
        )
        for seq in (131072, 32768, 8192)  # the most wanted first: a session's time cap may cut the last
    },
    # Document masking (ours only), beside 1B_compile_bf16. Synthetic tokens hit bos/eos about once per
    # 64K positions, so the mask is nearly causal: these measure each kernel's own cost (the dense mask for
    # SDPA; FlexAttention's compiled kernel), not the tiles that short documents would let flex skip.
    **{
        f"doc_1B_{kernel}": replace(
            _1B, compile=True, extra=("--model.attn_mask_type", "block_causal", "--model.attn_type", kernel)
        )
        for kernel in ("flex", "sdpa")
    },
    # training.dtype = bfloat16 (ours only), beside 1B_compile_bf16: its memory and speed with no fp32 state.
    "store_1B_bf16": replace(_1B, compile=True, extra=("--training.dtype", "bfloat16")),
    # Rowwise float8 experiments (ours only), beside 8B_slice8_compile_f8_rowwise of the same session: the two
    # ways torchtitan's rowwise run differs from ours, and two inductor settings (VARIANTS).
    **{f"8B_slice8_compile_f8_rowwise_{v}": replace(_8B, compile=True, float8="rowwise", variant=v)
       for v in ("rope_complex", "emulate_precision_casts", "max_autotune_gemm", "realize_opcount_50")},
    # CPU smoke runs (no GPU needed): they exercise the harness, not the numbers.
    "debug_cpu": BenchConfig(flavor="debugmodel", seq_len=256, local_batch_size=2, dtype="float32"),
    # CPU float8 matmuls are emulated: oneDNN's reference fp8 kernel takes minutes per step.
    "debug_cpu_compile_f8": BenchConfig(
        flavor="debugmodel", seq_len=256, local_batch_size=2, dtype="float32", compile=True, float8="tensorwise",
        extra=("--quantize.linear.float8.emulate",),
    ),
    "debug_cpu_rope_complex": BenchConfig(flavor="debugmodel", seq_len=256, local_batch_size=2, dtype="float32",
                                          variant="rope_complex"),
    "debug_cpu_doc": BenchConfig(
        flavor="debugmodel", seq_len=256, local_batch_size=2, dtype="float32", extra=("--model.attn_mask_type", "block_causal"),
    ),
}
MATRIX = [name for name, cfg in CONFIGS.items()
          if not name.startswith(("debug_", "1B_long", "doc_", "store_")) and cfg.variant is None]
DOC_MASK = [name for name in CONFIGS if name.startswith("doc_")]
LONG_SEQUENCE = [name for name in CONFIGS if name.startswith("1B_long")]


# ------------------------------------------------------------------------------------------------
# Timing (shared with torchtitan_peer.py)
# ------------------------------------------------------------------------------------------------


class StepTimer:
    """Wraps a train-step callable: device sync before and after, wall time and peak memory per step."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.times: list[float] = []
        self.peak_allocated = 0
        self.peak_reserved = 0

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self._sync()
            self.times.append(time.perf_counter() - t0)
            self._sample_memory()
            return out

        return timed

    def _sample_memory(self) -> None:
        # Sampled after every step: the trainers' own metrics reset the CUDA peaks when they log.
        import torch

        if self.device.type == "cuda":
            self.peak_allocated = max(self.peak_allocated, torch.cuda.max_memory_allocated(self.device))
            self.peak_reserved = max(self.peak_reserved, torch.cuda.max_memory_reserved(self.device))
        else:
            from torchtitan_like.components.metrics import cpu_memory

            self.peak_allocated = self.peak_reserved = max(self.peak_reserved, int(cpu_memory().secondary_gib * 2**30))

    def raw(self) -> dict[str, Any]:
        import torch

        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {
            "step_times_s": self.times,
            "peak_allocated_bytes": self.peak_allocated,
            "peak_reserved_bytes": self.peak_reserved,
            "device": device_name,
            "device_type": self.device.type,
            "torch": torch.__version__,
        }


def summarize(raw: dict[str, Any], cfg: BenchConfig, *, warmup: int, world_size: int, timed: int) -> dict[str, Any]:
    """Throughput, FLOPS, MFU, memory and step-time spread from one run's raw timings: the `timed` steps
    after the first `warmup` (a profiled run trains more steps after them)."""
    from torchtitan_like.components.flops import model_flops_per_token, peak_tflops_of
    from torchtitan_like.models import MODELS

    times = raw["step_times_s"][warmup:warmup + timed]
    if not times:
        raise SystemExit(f"no timed steps: {len(raw['step_times_s'])} steps ran, warm-up is {warmup}")
    median = statistics.median(times)
    tokens = cfg.local_batch_size * cfg.seq_len  # one device's tokens per step (data parallel only)
    tps = tokens / median
    args = MODELS["llama3"].flavors[cfg.flavor]
    flops = {
        "nemo": model_flops_per_token(args, cfg.seq_len, causal=False),
        "causal": model_flops_per_token(args, cfg.seq_len, causal=True),
    }
    # By the name of the device that ran (not this process's GPU 0: asking would open a CUDA context
    # here that stays for the peer's run).
    peak = peak_tflops_of(raw["device"], "bf16") if raw["device_type"] == "cuda" else None
    tflops = {k: tps * f / 1e12 for k, f in flops.items()}
    gib = 2**30
    return {
        "device": raw["device"],
        "world_size": world_size,
        "timed_steps": len(times),
        "warmup_steps": warmup,
        "tokens_per_step_per_device": tokens,
        "tokens_per_s_per_device": tps,
        "tokens_per_s_per_device_mean": tokens * len(times) / sum(times),
        "flops_per_token": flops,
        "tflops_per_device": tflops,
        "peak_bf16_tflops": peak,
        "mfu_pct": {k: (None if peak is None else 100 * v / peak) for k, v in tflops.items()},
        "peak_memory_gib": {"allocated": raw["peak_allocated_bytes"] / gib, "reserved": raw["peak_reserved_bytes"] / gib},
        "step_time_s": {
            "min": min(times),
            "median": median,
            "max": max(times),
            "mean": statistics.fmean(times),
            "std": statistics.stdev(times) if len(times) > 1 else 0.0,
        },
        "first_step_s": raw["step_times_s"][0],
    }


# ------------------------------------------------------------------------------------------------
# Variants: experiments on our trainer, for the benchmark only
# ------------------------------------------------------------------------------------------------


def _complex_rotary_emb(xq: Any, xk: Any, freqs_cis: Any) -> tuple[Any, Any]:
    """Our RoPE (the same rotation of interleaved pairs) in complex arithmetic, as torchtitan 0.2.2 computes
    it: inductor leaves complex ops out of its kernels, so the rotation's backward is no longer fused into
    the float8 casts of the q and k gradients."""
    import torch

    rot = torch.view_as_complex(freqs_cis.float().contiguous()).view(1, xq.shape[1], 1, -1)

    def rotate(x: Any) -> Any:
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * rot).flatten(3).type_as(x)

    return rotate(xq), rotate(xk)


def _variant_rope_complex() -> None:
    from torchtitan_like.models.llama3 import model

    model.apply_rotary_emb = _complex_rotary_emb


def _variant_emulate_precision_casts() -> None:
    import torch._inductor.config

    torch._inductor.config.emulate_precision_casts = True  # what torchtitan sets for rowwise float8


def _variant_max_autotune_gemm() -> None:
    import torch._inductor.config

    # Inductor then times its Triton templates against the ATen kernel for every matmul of a compiled block
    # and keeps the fastest. For a rowwise _scaled_mm that is the CUTLASS rowwise kernel (forward) or cuBLAS
    # with unit scales followed by torchao's separate rescaling multiply (both backward matmuls): a Triton
    # template can take the scales, or the multiply, into its epilogue. Costs compile time, not step time.
    torch._inductor.config.max_autotune_gemm = True


def _variant_realize_opcount_50() -> None:
    import torch._inductor.config

    # Inductor writes a fused expression out to memory (and reads it back in each consumer) once it exceeds
    # realize_opcount_threshold ops: 30 on torch 2.11, for CPU and GPU alike. Rowwise casts, with torchao's
    # power-of-two scales recomputed in every consumer, and SiLU's backward exceed it. Compiled on CPU with
    # torch 2.11 (Triton code generated, not run), one 1B block at seq 8192 moves 9.08 GB forward + backward
    # at 30, 7.73 GB at 50 (tensorwise 7.31 -> 7.14, bf16 4.26 either way); torch 2.13 moves 7.53 at 30
    # (benchmarks/inductor_bytes.py).
    torch._inductor.config.realize_opcount_threshold = 50


VARIANTS = {"rope_complex": _variant_rope_complex, "emulate_precision_casts": _variant_emulate_precision_casts,
            "max_autotune_gemm": _variant_max_autotune_gemm, "realize_opcount_50": _variant_realize_opcount_50}
"""Rowwise float8 experiments. The first two are the ways torchtitan 0.2.2's rowwise float8 run differs from
ours besides GQA (the compiled float8 graph is otherwise op for op the same): RoPE in complex arithmetic, and
inductor's emulate_precision_casts. The other two are neither project's default: inductor's GEMM autotuning,
and a higher threshold before inductor writes a fused expression out (torch 2.11's rowwise casts exceed 30)."""


# ------------------------------------------------------------------------------------------------
# Worker: our trainer, inside torchrun
# ------------------------------------------------------------------------------------------------


def run_ours(cfg: BenchConfig, *, steps: int, out: Path, profile_steps: int = 0, trace_out: Path | None = None) -> None:
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.trainer import Trainer

    if cfg.variant is not None:
        VARIANTS[cfg.variant]()
    with tempfile.TemporaryDirectory() as dump:
        trainer = Trainer(load_config(cfg.ours_args(steps=steps, dump=dump, profile_steps=profile_steps)))
        timer = StepTimer(trainer.device)
        trainer.train_step = timer.wrap(trainer.train_step)  # type: ignore[method-assign]
        try:
            trainer.train()
        finally:
            trainer.close()
        if profile_steps and trainer.rank == 0 and trace_out is not None and collect_trace(dump, trace_out) is None:
            # The timings below still count; the kernel report says which trace is missing.
            print(f"--profile-steps {profile_steps}: the run wrote no profiler trace under {dump}/{TRACES}",
                  file=sys.stderr, flush=True)
    if trainer.rank != 0:
        return
    raw = timer.raw()
    raw.update(
        implementation="torchtitan_like",
        version=_git_version(),
        torchao=_version("torchao"),
        compile_s=trainer.compile_monitor.compile_s if trainer.compile_monitor else None,
        recompiles=trainer.compile_monitor.recompiles if trainer.compile_monitor else None,
        final_loss=trainer.history[-1]["loss"] if trainer.history else None,
        world_size=trainer.world_size,
    )
    out.write_text(json.dumps(raw, indent=1))


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _git_version() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------
# Orchestration
# ------------------------------------------------------------------------------------------------


def _torchrun(ngpu: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ngpu}"]


def _launch(cmd: list[str], *, env: dict[str, str], log: Path) -> int:
    print(f"$ {' '.join(cmd)}", flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        print(f"  failed (exit {proc.returncode}); last lines of {log}:\n    " + "\n    ".join(tail), flush=True)
    return proc.returncode


def bench_one(name: str, cfg: BenchConfig, a: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    total = total_steps(warmup=a.warmup, steps=a.steps, profile_steps=a.profile_steps)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    result: dict[str, Any] = {"name": name, "config": asdict(cfg), "features": cfg.features()}

    ours_raw = out_dir / f"{name}.ours.raw.json"
    traces = {impl: out_dir / f"{name}.{impl}.trace.json.gz" for impl in ("ours", "torchtitan")}
    for trace in traces.values():
        trace.unlink(missing_ok=True)  # an earlier run's trace must not stand in for this one's
    cmd = [*_torchrun(a.ngpu), str(Path(__file__).resolve()), "--worker", "--name", name, "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--raw-out", str(ours_raw), *(["--ac", a.ac] if a.ac else []),
           *(["--profile-steps", str(a.profile_steps), "--trace-out", str(traces["ours"])] if a.profile_steps else [])]
    if _launch(cmd, env=env, log=out_dir / f"{name}.ours.log") == 0:
        raw = json.loads(ours_raw.read_text())
        result["ours"] = {**summarize(raw, cfg, warmup=a.warmup, world_size=raw["world_size"], timed=a.steps),
                          "version": raw["version"], "torch": raw["torch"], "torchao": raw["torchao"],
                          "compile_s": raw["compile_s"], "recompiles": raw["recompiles"], "final_loss": raw["final_loss"]}
    else:
        result["ours"] = {"error": f"see {name}.ours.log"}
    # On disk now: the peer run that follows may be killed at the session's step timeout.
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))

    if a.peer_site:
        peer_raw = out_dir / f"{name}.torchtitan.raw.json"
        peer_env = dict(env, PYTHONPATH=os.pathsep.join([a.peer_site, env["PYTHONPATH"]]))
        with tempfile.TemporaryDirectory() as dump:
            cmd = [*_torchrun(a.ngpu), str(ROOT / "benchmarks" / "torchtitan_peer.py"), "--raw-out", str(peer_raw),
                   "--", *cfg.peer_args(steps=total, dump=dump, profile_steps=a.profile_steps)]
            rc = _launch(cmd, env=peer_env, log=out_dir / f"{name}.torchtitan.log")
            if rc == 0 and a.profile_steps and collect_trace(dump, traces["torchtitan"]) is None:
                print(f"  torchtitan wrote no profiler trace under {dump}/{TRACES}", flush=True)
        if rc == 0:
            raw = json.loads(peer_raw.read_text())
            result["torchtitan"] = {**summarize(raw, cfg, warmup=a.warmup, world_size=raw["world_size"], timed=a.steps),
                                    "version": raw["version"], "torch": raw["torch"], "torchao": raw["torchao"],
                                    "final_loss": raw["final_loss"]}
        else:
            result["torchtitan"] = {"error": f"see {name}.torchtitan.log"}
        ours, peer = result.get("ours", {}), result["torchtitan"]
        if "error" not in ours and "error" not in peer:
            result["ratio_ours_over_torchtitan"] = {
                "tokens_per_s": ours["tokens_per_s_per_device"] / peer["tokens_per_s_per_device"],
                "peak_memory_reserved": ours["peak_memory_gib"]["reserved"] / max(peer["peak_memory_gib"]["reserved"], 1e-9),
            }
    if a.profile_steps:
        ran = [impl for impl in traces if impl in result and "error" not in result[impl]]
        result["kernels"] = kernel_report(name, {impl: traces[impl] for impl in ran}, out_dir)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result


def kernel_report(name: str, traces: dict[str, Path], out_dir: Path) -> dict[str, Any]:
    """Device time per kernel category of each profiled run (kernel_table.py), ours minus torchtitan's when
    both ran; printed, written to <name>.kernels.md, and returned for <name>.json. `traces`: the trace file
    of each run that trained; one that is missing or unreadable is reported, never fatal (the timings stand)."""
    import kernel_table

    summaries: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {"traces": {}, "trace_errors": {}}
    for impl, path in traces.items():
        try:
            summaries[impl] = kernel_table.summarize_trace(kernel_table.load_trace(path))
            report["traces"][impl] = path.name
        except SystemExit as e:  # kernel_table's one-line refusals: no trace, not a trace, no step annotation
            report["trace_errors"][impl] = str(e)
            print(f"  {impl}: no kernel table: {e}", flush=True)
    text = [kernel_table.format_one(s, impl) for impl, s in summaries.items()]
    if len(summaries) == 2:
        report["compare"] = kernel_table.compare(summaries["ours"], summaries["torchtitan"], ("ours", "torchtitan"))
        text.append(kernel_table.format_compare(report["compare"]))
    for s in summaries.values():
        s.pop("all_kernels_ms")
    report["summaries"] = summaries
    if text:
        body = f"# {name}: device time per profiled step\n\n" + "\n\n".join(text) + "\n"
        (out_dir / f"{name}.kernels.md").write_text(body)
        print(body, flush=True)
    return report


def _fmt(v: Any, spec: str = ".1f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return format(v, spec)


def table(results: list[dict[str, Any]]) -> str:
    head = ("| run | impl | tokens/s/device | TFLOPS (NeMo / causal) | MFU % (NeMo / causal) | peak mem GiB "
            "(alloc / reserved) | step s (min / median / max / std) | ours/tt |")
    lines = [head, "|" + "---|" * 8]
    for r in results:
        for impl in ("ours", "torchtitan"):
            m = r.get(impl)
            if m is None:
                continue
            if "error" in m:
                lines.append(f"| {r['name']} | {impl} | {m['error']} | | | | | |")
                continue
            st = m["step_time_s"]
            ratio = r.get("ratio_ours_over_torchtitan", {}).get("tokens_per_s") if impl == "ours" else None
            label = impl if impl == "ours" else f"torchtitan {m['version']}"
            lines.append(
                f"| {r['name']} | {label} | {_fmt(m['tokens_per_s_per_device'], ',.0f')} | "
                f"{_fmt(m['tflops_per_device']['nemo'])} / {_fmt(m['tflops_per_device']['causal'])} | "
                f"{_fmt(m['mfu_pct']['nemo'])} / {_fmt(m['mfu_pct']['causal'])} | "
                f"{_fmt(m['peak_memory_gib']['allocated'])} / {_fmt(m['peak_memory_gib']['reserved'])} | "
                f"{_fmt(st['min'], '.3f')} / {_fmt(st['median'], '.3f')} / {_fmt(st['max'], '.3f')} / "
                f"{_fmt(st['std'], '.3f')} | {_fmt(ratio, '.3f')} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", help="a named config (see --list)")
    p.add_argument("--matrix", action="store_true", help="run every GPU config: " + ", ".join(MATRIX))
    p.add_argument("--long", action="store_true",
                   help="run the one-GPU long-sequence baseline (no peer): " + ", ".join(LONG_SEQUENCE))
    p.add_argument("--list", action="store_true", help="list the named configs")
    p.add_argument("--steps", type=int, default=20, help="timed steps after warm-up (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first: compile, allocator (default 5)")
    p.add_argument("--ngpu", type=int, default=1, help="processes (GPUs) per run (default 1)")
    p.add_argument("--profile-steps", type=int, default=0, metavar="K",
                   help="after the timed steps, trace K more with torch.profiler (and torchtitan's too, with "
                        "--peer-site): <name>.<impl>.trace.json.gz and a kernel-time table per category, ours minus "
                        "torchtitan's (<name>.kernels.md; benchmarks/kernel_table.py)")
    p.add_argument("--ac", choices=["none", "full", "selective_op", "selective_2"],
                   help="override the config's activation checkpointing (e.g. full if a run OOMs)")
    p.add_argument("--peer-site", help="folder holding torchtitan 0.2.2 (fetch_wheels.sh --peer): run it side by side")
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench"), help="folder for the JSON and logs (default outputs/bench)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--raw-out", help=argparse.SUPPRESS)
    p.add_argument("--trace-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup < 0 or a.profile_steps < 0:
        p.error("--steps must be >= 1, --warmup and --profile-steps >= 0")

    if a.list:
        for name, cfg in CONFIGS.items():
            print(f"{name:34s} {cfg.flavor:10s} seq {cfg.seq_len:5d} batch {cfg.local_batch_size}  {cfg.features()}")
        return 0
    names = MATRIX if a.matrix else LONG_SEQUENCE if a.long else [a.name] if a.name else []
    if not names:
        p.error("give --name NAME, --matrix, --long or --list")
    if a.peer_site and any(CONFIGS[n].extra or CONFIGS[n].variant for n in names if n in CONFIGS):
        p.error("--peer-site: these configs use options torchtitan is not given the same way (CONFIGS extra or "
                "variant); run them without it")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown config {unknown[0]!r}; see --list")
    if a.peer_site:
        # The runs start from the repository root: a relative folder means the caller's.
        a.peer_site = str(Path(a.peer_site).resolve())
        if not Path(a.peer_site, "torchtitan").is_dir():
            p.error(f"--peer-site {a.peer_site}: no torchtitan package there (tools/fetch_gpu_wheels.sh --peer "
                    "installs it)")

    if a.worker:
        cfg = CONFIGS[a.name]
        if a.ac:
            cfg = replace(cfg, ac=a.ac)
        try:
            run_ours(cfg, steps=total_steps(warmup=a.warmup, steps=a.steps, profile_steps=a.profile_steps),
                     out=Path(a.raw_out), profile_steps=a.profile_steps,
                     trace_out=Path(a.trace_out) if a.trace_out else None)
        finally:
            from bench_checkpoint import leave_process_group

            leave_process_group()
        return 0

    out_dir = Path(a.out).resolve()  # the workers run from the repo root: pass them absolute paths
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        cfg = CONFIGS[name] if not a.ac else replace(CONFIGS[name], ac=a.ac)
        print(f"== {name}: {cfg.flavor}, seq {cfg.seq_len}, batch {cfg.local_batch_size}, {cfg.features()}", flush=True)
        results.append(bench_one(name, cfg, a, out_dir))
        print(table(results[-1:]), flush=True)
    summary = {"runs": results, "table": table(results)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n" + summary["table"])
    print(f"\nJSON: {out_dir}/<name>.json and {out_dir}/summary.json")
    failed = [r["name"] for r in results if any("error" in r.get(k, {}) for k in ("ours", "torchtitan"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
