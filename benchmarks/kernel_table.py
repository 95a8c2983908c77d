"""Where a step's time goes, from a torch.profiler trace: device time per kernel category, and two traces side by side.

    python benchmarks/kernel_table.py TRACE                         # one trace
    python benchmarks/kernel_table.py OURS TT --labels ours torchtitan --json out.json

TRACE is a Chrome trace as torch.profiler's `export_chrome_trace` writes it (`.json` or `.json.gz`):
ours and torchtitan both write `<dump>/profile_traces/iteration_N/rank0_trace.json`, and
`bench_train.py --profile-steps K` collects them for a row of the matrix. The question it answers is
the one tokens/s alone cannot: which kernels make one run slower than another (float8 casts? the
GEMMs? the optimizer? idle gaps between launches?).

- GPU trace: every kernel, memcpy and memset event is counted by its device duration; the kernels
  are grouped into categories by name (float8 GEMM, other GEMM, attention, Triton pointwise /
  reduction / template kernels that inductor generated, eager ATen element-wise and reduction
  kernels, the optimizer's multi-tensor kernels, NCCL, copies). Busy time is the union of the
  kernel intervals (streams may overlap), idle time the rest of the profiled span.
- CPU trace (no kernel events): the operators' self time (an operator's duration less that of the
  operators it called), so the CPU smoke runs give a table too.

Every figure is per profiled step: the trace's `ProfilerStep#N` annotations say how many there are.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

# (category, pattern) in order: the first that matches a kernel's name wins.
_KERNEL_RULES: list[tuple[str, re.Pattern[str]]] = [
    ("nccl", re.compile(r"nccl", re.I)),
    # Before "triton": FlexAttention's kernels are Triton templates named after it.
    ("attention", re.compile(r"flash|fmha|attention|attn|sdpa", re.I)),
    ("gemm float8", re.compile(r"(?=.*(f8|fp8|e4m3|e5m2|float8))(?=.*(gemm|nvjet|cutlass|xmma|_mm|wgmma))", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|wgmma|splitk", re.I)),
    ("optimizer", re.compile(r"multi_tensor_apply|fused_adam|adamw?_|_foreach", re.I)),
    ("triton pointwise", re.compile(r"^triton_poi")),
    ("triton reduction", re.compile(r"^triton_(red|per)")),
    ("triton template", re.compile(r"^triton_tem")),
    ("triton other", re.compile(r"^triton")),
    ("aten reduction", re.compile(r"reduce_kernel|reduction", re.I)),
    ("aten elementwise", re.compile(r"elementwise|vectorized|at::native", re.I)),
]
# CPU operators (self time).
_CPU_RULES: list[tuple[str, re.Pattern[str]]] = [
    ("gemm float8", re.compile(r"^aten::_scaled_mm")),
    ("gemm", re.compile(r"^aten::(mm|addmm|bmm|matmul|linear|baddbmm)$")),
    ("attention", re.compile(r"attention|flash", re.I)),
    ("compiled code", re.compile(r"compiled|inductor|triton|cpp_fused", re.I)),
    ("optimizer", re.compile(r"adam|_foreach|optimizer", re.I)),
    ("collective", re.compile(r"c10d|gloo|allreduce|all_gather|reduce_scatter|broadcast", re.I)),
    ("copy", re.compile(r"^aten::(copy_|_to_copy|to|clone|contiguous)$")),
]
_COPY_CATS = {"gpu_memcpy", "gpu_memset"}
_STEP = re.compile(r"^ProfilerStep#(\d+)$")
_TRITON_SUFFIX = re.compile(r"_\d+$")


def load_trace(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"kernel_table: no trace at {p}")
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rt") as f:
            trace = json.load(f)
    except (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as e:  # EOFError: a cut-off .gz
        raise SystemExit(f"kernel_table: {p} is not a readable Chrome trace: {e}") from None
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise SystemExit(f"kernel_table: {p} has no traceEvents list: not a torch.profiler Chrome trace")
    return trace


_LAUNCHER_RULES: dict[str, str] = {
    "aten::_scaled_mm": "gemm float8",
    "aten::_scaled_grouped_mm": "gemm float8",
    **{f"aten::{op}": "gemm" for op in ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_grouped_mm")},
}
"""Kernels by the operator that launched them, where that says more than the kernel's name: cuBLAS's
nvjet kernels do not always name their data type."""


def classify(name: str, *, cat: str = "kernel", launcher: str | None = None) -> str:
    """The category of a GPU kernel (or memcpy / memset event), by the operator that launched it where
    _LAUNCHER_RULES knows it, else by its name."""
    if cat in _COPY_CATS:
        return "memcpy/memset"
    if launcher in _LAUNCHER_RULES:
        return _LAUNCHER_RULES[launcher]
    for label, pattern in _KERNEL_RULES:
        if pattern.search(name):
            return label
    return "other"


def classify_cpu(name: str) -> str:
    for label, pattern in _CPU_RULES:
        if pattern.search(name):
            return label
    return "other ops"


def kernel_key(name: str) -> str:
    """The name a kernel is listed under: inductor numbers its kernels (triton_poi_fused_abs_3), and
    the numbers differ between two programs that run the same fusion, so they go."""
    return _TRITON_SUFFIX.sub("", name) if name.startswith("triton") else name


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def _cpu_self_times(ops: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """(name, self time in us) of every operator: its duration less that of the operators nested in it
    on the same thread."""
    by_thread: dict[tuple[Any, Any], list[dict[str, Any]]] = defaultdict(list)
    for e in ops:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    out: list[tuple[str, float]] = []
    for events in by_thread.values():
        events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list[Any]] = []  # [end, name, time of its children, duration]
        for e in events:
            start, end = e["ts"], e["ts"] + e["dur"]
            while stack and stack[-1][0] <= start:
                done = stack.pop()
                out.append((done[1], done[3] - done[2]))
            if stack:
                stack[-1][2] += e["dur"]
            stack.append([end, e["name"], 0.0, e["dur"]])
        out.extend((s[1], s[3] - s[2]) for s in stack)
    return out


def summarize_trace(trace: dict[str, Any], *, top: int = 25) -> dict[str, Any]:
    """Per profiled step: time by category, busy / idle device time, launches, and the top kernels."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and isinstance(e.get("dur"), (int, float))]
    # The CPU side's step annotations: a GPU trace repeats each on the device timeline (gpu_user_annotation).
    steps = [e for e in events if e.get("cat") == "user_annotation" and _STEP.match(str(e.get("name", "")))]
    if not steps:
        raise SystemExit("kernel_table: the trace has no ProfilerStep#N annotation: was it written by torch.profiler "
                         "with a schedule (the trainers' profiling.enable_profiling)?")
    n_steps = len(steps)
    device_events = [e for e in events if e.get("cat") == "kernel" or e.get("cat") in _COPY_CATS]
    by_key: dict[str, dict[str, Any]] = {}
    categories: dict[str, float] = defaultdict(float)
    launches: dict[str, int] = defaultdict(int)
    if device_events:
        mode = "gpu kernels"
        # A kernel's "External id" is that of the CPU operator that launched it.
        launchers = {e["args"]["External id"]: str(e["name"]) for e in events
                     if e.get("cat") == "cpu_op" and "External id" in e.get("args", {})}
        timed = [(str(e["name"]), float(e["dur"]),
                  classify(str(e["name"]), cat=e["cat"], launcher=launchers.get(e.get("args", {}).get("External id"))))
                 for e in device_events]
        busy_us = _union_us([(e["ts"], e["ts"] + e["dur"]) for e in device_events])
        start = min(min(e["ts"] for e in steps), min(e["ts"] for e in device_events))
        end = max(max(e["ts"] + e["dur"] for e in steps), max(e["ts"] + e["dur"] for e in device_events))
    else:
        mode = "cpu operators (self time)"
        cpu_ops = [e for e in events if e.get("cat") == "cpu_op"]
        timed = [(name, dur, classify_cpu(name)) for name, dur in _cpu_self_times(cpu_ops)]
        busy_us = sum(d for _, d, _ in timed)
        start = min(e["ts"] for e in steps)
        end = max(e["ts"] + e["dur"] for e in steps)
    for name, dur, category in timed:
        categories[category] += dur
        launches[category] += 1
        row = by_key.setdefault(kernel_key(name), {"category": category, "us": 0.0, "count": 0})
        row["us"] += dur
        row["count"] += 1
    span_us = end - start
    ms = 1e-3 / n_steps
    kernels = sorted(by_key.items(), key=lambda kv: -kv[1]["us"])
    return {
        "mode": mode,
        "steps": n_steps,
        "step_ms": span_us * ms,
        "busy_ms": busy_us * ms,
        "idle_ms": max(span_us - busy_us, 0.0) * ms if device_events else None,
        "launches_per_step": sum(launches.values()) / n_steps,
        "categories_ms": {k: v * ms for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
        "launches": {k: v / n_steps for k, v in launches.items()},
        "kernels": [{"name": k, "category": r["category"], "ms": r["us"] * ms, "per_step": r["count"] / n_steps}
                    for k, r in kernels[:top]],
        "all_kernels_ms": {k: r["us"] * ms for k, r in kernels},
    }


def _short(name: str, width: int = 90) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def format_one(s: dict[str, Any], label: str = "trace") -> str:
    lines = [f"{label}: {s['steps']} profiled step(s), {s['mode']}; per step: span {s['step_ms']:.2f} ms, busy "
             f"{s['busy_ms']:.2f} ms" + (f", idle {s['idle_ms']:.2f} ms" if s["idle_ms"] is not None else "")
             + f", {s['launches_per_step']:.0f} launches",
             "", "| category | ms/step | share | launches/step |", "|---|---:|---:|---:|"]
    busy = max(sum(s["categories_ms"].values()), 1e-12)
    for k, v in s["categories_ms"].items():
        lines.append(f"| {k} | {v:.2f} | {100 * v / busy:.1f}% | {s['launches'][k]:.0f} |")
    lines += ["", "| kernel | category | ms/step | calls/step |", "|---|---|---:|---:|"]
    for r in s["kernels"]:
        lines.append(f"| `{_short(r['name'])}` | {r['category']} | {r['ms']:.3f} | {r['per_step']:.0f} |")
    return "\n".join(lines)


def compare(a: dict[str, Any], b: dict[str, Any], labels: tuple[str, str] = ("a", "b"), *, top: int = 20) -> dict[str, Any]:
    """Category and kernel differences a - b, per step (positive: `a` spends more)."""
    if a["mode"] != b["mode"]:
        raise SystemExit(f"kernel_table: cannot compare a trace of {a['mode']} with one of {b['mode']}")
    cats = sorted(set(a["categories_ms"]) | set(b["categories_ms"]),
                  key=lambda k: -max(a["categories_ms"].get(k, 0.0), b["categories_ms"].get(k, 0.0)))
    rows = [{"category": k, labels[0]: a["categories_ms"].get(k, 0.0), labels[1]: b["categories_ms"].get(k, 0.0),
             "diff": a["categories_ms"].get(k, 0.0) - b["categories_ms"].get(k, 0.0)} for k in cats]
    names = set(a["all_kernels_ms"]) | set(b["all_kernels_ms"])
    diffs = sorted(((n, a["all_kernels_ms"].get(n, 0.0), b["all_kernels_ms"].get(n, 0.0)) for n in names),
                   key=lambda t: -abs(t[1] - t[2]))[:top]
    return {
        "labels": list(labels),
        "totals": {key: {labels[0]: a[key], labels[1]: b[key]} for key in ("step_ms", "busy_ms", "idle_ms", "launches_per_step")},
        "categories": rows,
        "kernels": [{"name": n, labels[0]: x, labels[1]: y, "diff": x - y} for n, x, y in diffs],
    }


def format_compare(c: dict[str, Any]) -> str:
    la, lb = c["labels"]
    t = c["totals"]

    def num(v: Any, spec: str = ".2f") -> str:
        return "n/a" if v is None else format(v, spec)

    lines = [f"| per step | {la} | {lb} | {la} - {lb} |", "|---|---:|---:|---:|"]
    for key, what in (("step_ms", "span ms"), ("busy_ms", "device busy ms"), ("idle_ms", "device idle ms"),
                      ("launches_per_step", "launches")):
        x, y = t[key][la], t[key][lb]
        lines.append(f"| {what} | {num(x)} | {num(y)} | {num(None if x is None or y is None else x - y, '+.2f')} |")
    lines += ["", f"| category | {la} ms | {lb} ms | diff ms |", "|---|---:|---:|---:|"]
    lines += [f"| {r['category']} | {r[la]:.2f} | {r[lb]:.2f} | {r['diff']:+.2f} |" for r in c["categories"]]
    lines += ["", f"| kernel (largest differences) | {la} ms | {lb} ms | diff ms |", "|---|---:|---:|---:|"]
    lines += [f"| `{_short(r['name'])}` | {r[la]:.3f} | {r[lb]:.3f} | {r['diff']:+.3f} |" for r in c["kernels"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", nargs="+", metavar="TRACE", help="one trace, or two to compare (first minus second)")
    p.add_argument("--labels", nargs=2, default=["a", "b"], metavar=("A", "B"), help="names of the two traces")
    p.add_argument("--top", type=int, default=25, help="kernels listed (default 25)")
    p.add_argument("--json", help="also write the summaries (and the comparison) here")
    a = p.parse_args(argv)
    if len(a.traces) > 2:
        p.error("give one trace, or two to compare")
    summaries = [summarize_trace(load_trace(t), top=a.top) for t in a.traces]
    out: dict[str, Any] = {"traces": {label: {**s, "path": str(t)} for label, s, t in zip(a.labels, summaries, a.traces)}}
    for label, s in zip(a.labels, summaries):
        print(format_one(s, label) + "\n")
    if len(summaries) == 2:
        out["compare"] = compare(summaries[0], summaries[1], (a.labels[0], a.labels[1]), top=a.top)
        print(format_compare(out["compare"]))
    if a.json:
        for s in out["traces"].values():
            s.pop("all_kernels_ms", None)
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
