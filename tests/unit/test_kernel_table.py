"""benchmarks/kernel_table.py (device time per kernel category from a profiler trace) and bench_train.py's
--profile-steps, which traces steps after the timed ones and tabulates ours against torchtitan's.

The GPU traces here are written by hand in the Chrome trace format torch.profiler exports (kernel names as
CUDA, cuBLAS, CUTLASS and inductor name them); the CPU one is a real trace of the debug model.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_train  # noqa: E402
import kernel_table  # noqa: E402


def _step(n: int, ts: float, dur: float) -> dict:
    return {"ph": "X", "cat": "user_annotation", "name": f"ProfilerStep#{n}", "pid": 1, "tid": 1, "ts": ts, "dur": dur}


def _kernel(name: str, ts: float, dur: float, *, cat: str = "kernel", stream: int = 7) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": stream, "ts": ts, "dur": dur}


ROWWISE_GEMM = "void cutlass::device_kernel<at::cuda::detail::f8f8bf16_rowwise_kernel<cutlass::float_e4m3_t>>(...)"
BF16_GEMM = "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN"


def _gpu_trace(*, cast_us: float) -> dict:
    """Two profiled steps of 1000 us each; `cast_us` of inductor's float8 cast kernel per step."""
    events = [{"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "GPU 0"}}]
    for n, t0 in ((7, 0.0), (8, 1000.0)):
        events += [
            _step(n, t0, 1000.0),
            {**_step(n, t0 + 5, 990.0), "cat": "gpu_user_annotation", "pid": 0},  # its copy on the device timeline
            _kernel(ROWWISE_GEMM, t0 + 10, 300),
            _kernel(BF16_GEMM, t0 + 320, 100),
            _kernel("triton_red_fused__to_copy_abs_amax_clamp_3" if n == 7 else "triton_red_fused__to_copy_abs_amax_clamp_5",
                    t0 + 430, cast_us),
            _kernel("triton_poi_fused_add_mul_silu_1", t0 + 430 + cast_us, 40),
            _kernel("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", t0 + 640, 150),
            # On a second stream, overlapping the attention kernel: busy time counts the overlap once.
            _kernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", t0 + 740, 100, stream=9),
            _kernel("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", t0 + 850, 50),
            _kernel("Memcpy HtoD (Pinned -> Device)", t0 + 905, 10, cat="gpu_memcpy"),
            _kernel("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", t0 + 920, 5),
        ]
    return {"schemaVersion": 1, "traceEvents": events}


def test_kernels_fall_into_their_categories_per_profiled_step():
    s = kernel_table.summarize_trace(_gpu_trace(cast_us=60))
    assert s["mode"] == "gpu kernels" and s["steps"] == 2
    cats = s["categories_ms"]
    assert cats == pytest.approx({"gemm float8": 0.300, "gemm": 0.100, "triton reduction": 0.060,
                                  "triton pointwise": 0.040, "attention": 0.150, "nccl": 0.100, "optimizer": 0.050,
                                  "memcpy/memset": 0.010, "aten elementwise": 0.005})
    # The all-reduce overlaps the attention kernel by 50 us: busy is the union of the intervals.
    assert s["busy_ms"] == pytest.approx((815 - 50) / 1000)
    assert s["step_ms"] == pytest.approx(1.0)
    assert s["idle_ms"] == pytest.approx(1.0 - (815 - 50) / 1000)
    assert s["launches_per_step"] == 9
    # Inductor numbers its kernels; the same fusion under another number is one row.
    (cast,) = [k for k in s["kernels"] if k["name"].startswith("triton_red")]
    assert cast["name"] == "triton_red_fused__to_copy_abs_amax_clamp" and cast["per_step"] == 1


@pytest.mark.parametrize("name, category", [
    ("sm90_xmma_gemm_e4m3e4m3_e4m3f32_f32_tn_n_tilesize128x128x128_warpgroupsize2x1x1_execute_segment_k_off_kernel__5x_cublas", "gemm float8"),
    ("nvjet_qqtst_128x256_128x6_2x1_v_bz_coopA_TNT", "gemm"),  # a cuBLAS name without the dtype: a GEMM all the same
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_nn_n_tilesize128x256x64_cluster2x1x1_warpgroupsize2x1x1_execute_kernel__5x_cublas", "gemm"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128>>", "attention"),
    ("triton_tem_fused_flex_attention_0", "attention"),
    ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "triton reduction"),
    ("triton_tem_fused_mm_0", "triton template"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MaxOps<float>>>", "aten reduction"),
    ("some_vendor_kernel", "other"),
])
def test_kernel_names_classify(name, category):
    assert kernel_table.classify(name) == category


def test_a_gemm_is_known_by_the_operator_that_launched_it():
    op = {"ph": "X", "cat": "cpu_op", "name": "aten::_scaled_mm", "pid": 1, "tid": 1, "ts": 5, "dur": 20,
          "args": {"External id": 41}}
    kernel = _kernel("nvjet_qqtst_128x256_128x6_2x1_v_bz_coopA_TNT", 30, 200)
    kernel["args"] = {"External id": 41, "correlation": 77}
    s = kernel_table.summarize_trace({"traceEvents": [_step(1, 0, 300), op, kernel]})
    assert s["categories_ms"] == {"gemm float8": pytest.approx(0.2)}
    assert kernel_table.classify("nvjet_tst_64x8_64x16", launcher="aten::mm") == "gemm"
    assert kernel_table.classify("triton_poi_fused_0", launcher="aten::add") == "triton pointwise"


def test_compare_lists_the_differences_ours_minus_the_other():
    ours, other = (kernel_table.summarize_trace(_gpu_trace(cast_us=c)) for c in (160, 60))
    c = kernel_table.compare(ours, other, ("ours", "torchtitan"))
    rows = {r["category"]: r for r in c["categories"]}
    assert rows["triton reduction"]["diff"] == pytest.approx(0.1)
    assert rows["gemm float8"]["diff"] == pytest.approx(0.0)
    assert c["kernels"][0]["name"] == "triton_red_fused__to_copy_abs_amax_clamp"
    assert c["kernels"][0]["diff"] == pytest.approx(0.1)
    assert c["totals"]["busy_ms"]["ours"] - c["totals"]["busy_ms"]["torchtitan"] == pytest.approx(0.1)
    text = kernel_table.format_compare(c)
    assert "| triton reduction | 0.16 | 0.06 | +0.10 |" in text


def test_cpu_operators_count_their_self_time():
    step = _step(3, 0, 100)
    ops = [  # aten::linear (100 us) calls aten::mm (70 us), which calls aten::empty (5 us)
        {"ph": "X", "cat": "cpu_op", "name": "aten::linear", "pid": 1, "tid": 1, "ts": 0, "dur": 100},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1, "ts": 10, "dur": 70},
        {"ph": "X", "cat": "cpu_op", "name": "aten::empty", "pid": 1, "tid": 1, "ts": 12, "dur": 5},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mul", "pid": 1, "tid": 2, "ts": 0, "dur": 40},  # another thread
    ]
    s = kernel_table.summarize_trace({"traceEvents": [step, *ops]})
    assert s["mode"] == "cpu operators (self time)" and s["idle_ms"] is None
    times = s["all_kernels_ms"]
    assert times == pytest.approx({"aten::linear": 0.030, "aten::mm": 0.065, "aten::empty": 0.005, "aten::mul": 0.040})
    assert s["categories_ms"]["gemm"] == pytest.approx(0.095)


def test_bad_traces_are_refused_with_the_reason(tmp_path):
    with pytest.raises(SystemExit, match="no trace at"):
        kernel_table.load_trace(tmp_path / "missing.json")
    (tmp_path / "cut.json").write_text('{"traceEvents": [')
    with pytest.raises(SystemExit, match="not a readable Chrome trace"):
        kernel_table.load_trace(tmp_path / "cut.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(SystemExit, match="no traceEvents list"):
        kernel_table.load_trace(tmp_path / "list.json")
    with pytest.raises(SystemExit, match="no ProfilerStep#N"):
        kernel_table.summarize_trace({"traceEvents": [_kernel(BF16_GEMM, 0, 10)]})


def test_the_cli_reads_gzipped_traces_and_writes_json(tmp_path):
    paths = []
    for label, cast in (("ours", 160), ("tt", 60)):
        p = tmp_path / f"{label}.json.gz"
        with gzip.open(p, "wt") as f:
            json.dump(_gpu_trace(cast_us=cast), f)
        paths.append(str(p))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_table.py"), *paths, "--labels", "ours", "tt",
                        "--json", str(tmp_path / "k.json")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "| triton reduction | 0.16 | 0.06 | +0.10 |" in r.stdout
    out = json.loads((tmp_path / "k.json").read_text())
    assert set(out["traces"]) == {"ours", "tt"} and out["compare"]["labels"] == ["ours", "tt"]


def test_profile_steps_come_after_the_timed_ones():
    total = bench_train.total_steps(warmup=3, steps=10, profile_steps=2)
    assert total == 3 + 10 + bench_train.PROFILER_WARMUP + 2
    args = bench_train.profile_args(total=total, profile_steps=2)
    # The profiler's schedule waits profile_freq - (warmup + active) steps: exactly the warm-up and timed ones.
    freq = int(args[args.index("--profiling.profile_freq") + 1])
    warm = int(args[args.index("--profiling.profiler_warmup") + 1])
    active = int(args[args.index("--profiling.profiler_active") + 1])
    assert freq - (warm + active) == 3 + 10
    assert bench_train.total_steps(warmup=3, steps=10, profile_steps=0) == 13
    assert bench_train.profile_args(total=13, profile_steps=0) == []
    # Both trainers take the same keys.
    cfg = bench_train.CONFIGS["8B_slice8_compile_f8_rowwise"]
    assert set(args) <= set(cfg.ours_args(steps=total, dump="/d", profile_steps=2))
    assert set(args) <= set(cfg.peer_args(steps=total, dump="/d", profile_steps=2))
    # A timed window: the profiled steps never enter the throughput.
    raw = {"step_times_s": [9.0, 9.0, 9.0] + [1.0] * 10 + [5.0] * 3, "peak_allocated_bytes": 0,
           "peak_reserved_bytes": 0, "device": "cpu", "device_type": "cpu", "torch": "x"}
    s = bench_train.summarize(raw, bench_train.CONFIGS["debug_cpu"], warmup=3, world_size=1, timed=10)
    assert s["timed_steps"] == 10 and s["step_time_s"]["max"] == 1.0


def test_a_profiled_cpu_run_writes_its_trace_and_kernel_table(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--name", "debug_cpu", "--steps",
                        "1", "--warmup", "0", "--profile-steps", "1", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / "debug_cpu.ours.trace.json.gz").is_file()
    result = json.loads((out / "debug_cpu.json").read_text())
    assert result["ours"]["timed_steps"] == 1
    raw = json.loads((out / "debug_cpu.ours.raw.json").read_text())
    assert len(raw["step_times_s"]) == 1 + bench_train.PROFILER_WARMUP + 1
    summary = result["kernels"]["summaries"]["ours"]
    assert summary["steps"] == 1 and summary["mode"] == "cpu operators (self time)"
    assert summary["categories_ms"]["gemm"] > 0 and summary["categories_ms"]["attention"] > 0
    assert "compare" not in result["kernels"]  # no torchtitan run
    assert "| gemm |" in (out / "debug_cpu.kernels.md").read_text()


def test_a_missing_trace_costs_the_kernel_table_not_the_timings(tmp_path, monkeypatch):
    """Ours trained and timed but left no trace (here: a stand-in worker); torchtitan's trace is cut off. The
    result keeps both runs' numbers and says what is missing instead of failing."""
    raw = {"step_times_s": [0.5, 0.1, 0.1, 0.1], "peak_allocated_bytes": 0, "peak_reserved_bytes": 0, "device": "cpu",
           "device_type": "cpu", "torch": "x", "version": "test", "torchao": None, "compile_s": None,
           "recompiles": None, "final_loss": 1.0, "world_size": 1}

    def fake_launch(cmd: list[str], *, env: dict[str, str], log: Path) -> int:
        Path(cmd[cmd.index("--raw-out") + 1]).write_text(json.dumps(raw))
        if "--worker" not in cmd:  # the peer: a trace that was cut off
            (tmp_path / "out" / "debug_cpu.torchtitan.trace.json.gz").write_bytes(b"\x1f\x8b broken")
        return 0

    (tmp_path / "site" / "torchtitan").mkdir(parents=True)
    monkeypatch.setattr(bench_train, "_launch", fake_launch)
    monkeypatch.setattr(bench_train, "collect_trace", lambda dump, dest: dest if dest.exists() else None)
    rc = bench_train.main(["--name", "debug_cpu", "--steps", "1", "--warmup", "1", "--profile-steps", "1",
                           "--peer-site", str(tmp_path / "site"), "--out", str(tmp_path / "out")])
    assert rc == 0
    result = json.loads((tmp_path / "out" / "debug_cpu.json").read_text())
    assert result["ours"]["timed_steps"] == 1 and result["torchtitan"]["timed_steps"] == 1
    errors = result["kernels"]["trace_errors"]
    assert "no trace at" in errors["ours"] and "not a readable Chrome trace" in errors["torchtitan"]
    assert result["kernels"]["summaries"] == {} and "compare" not in result["kernels"]
