"""benchmarks/calibrate.py: a --quick CPU run writes a profile that load_profile accepts.

The script runs as a user runs it (a subprocess, CUDA hidden so the CPU path is what is checked on any
machine). Only the profile's shape and the rules that derive it are asserted, never a speed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from torchtitan_like.components.flops import model_flops_per_token
from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS
from torchtitan_like.planner.hardware import HardwareProfile, load_profile

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "calibrate.py"


def run_calibrate(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_quick_cpu_run_writes_a_loadable_profile(tmp_path: Path) -> None:
    out, report = tmp_path / "profiles" / "cpu.json", tmp_path / "results.json"
    proc = run_calibrate("--quick", "--out", str(out), "--json", str(report))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"profile written: {out}" in proc.stdout
    assert "inter-node bus bandwidth" in proc.stdout and "NOT MEASURED" in proc.stdout
    assert not list(out.parent.glob("*.tmp")), "the atomic write left its temporary file behind"

    profile = load_profile(str(out))
    for f in fields(HardwareProfile):
        value = getattr(profile, f.name)
        if f.name == "name":
            assert value
        elif f.name == "peak_fp8_tflops":
            assert value is None  # no fp8 on CPU
        elif f.name == "device":
            assert value == "cpu"  # the planner offers no CUDA-only layouts (async TP) on this profile
        else:
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (f.name, value)

    # The CPU rules: the measured GEMM rate is the peak; attention is a fraction of it; bandwidths as measured.
    results = json.loads(report.read_text())
    m = results["measurements"]
    assert profile.gemm_efficiency == 1.0
    assert profile.link_efficiency == 1.0
    assert profile.peak_bf16_tflops == pytest.approx(m["gemm"]["tflops"], rel=1e-3)
    assert profile.attention_efficiency == pytest.approx(m["attention"]["tflops"] / m["gemm"]["tflops"], rel=1e-3)
    assert profile.hbm_gbps == pytest.approx(m["memory_copy"]["gbps"], rel=1e-3)
    ag, rs = m["collectives"]["all_gather"]["busbw_gbps"], m["collectives"]["reduce_scatter"]["busbw_gbps"]
    assert profile.intra_node_gbps == pytest.approx(2 / (1 / ag + 1 / rs), rel=1e-3)
    assert profile.inter_node_gbps == profile.intra_node_gbps  # not measurable on one machine; CPU default
    assert m["collectives"]["world_size"] == profile.gpus_per_node == 2
    assert m["gemm_fp8"] == {"not_measured": "fp8 GEMMs are measured on CUDA only"}
    assert results["profile"] == json.loads(out.read_text())


def test_one_process_cannot_measure_a_collective() -> None:
    proc = run_calibrate("--quick", "--nproc", "1", "--out", os.devnull)
    assert proc.returncode == 2
    assert "--nproc=1: a collective needs at least 2 processes (try --nproc 2)" in proc.stderr


def test_attention_flops_match_the_training_flops_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    # The planner divides model_flops_per_token's attention score term by the calibrated attention rate,
    # so calibrate.py must count attention FLOPs the same way (causal: half the score work).
    spec = importlib.util.spec_from_file_location("calibrate", SCRIPT)
    assert spec is not None and spec.loader is not None
    calibrate = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "calibrate", calibrate)  # its dataclasses look their module up there
    spec.loader.exec_module(calibrate)

    args, seq = LLAMA3_FLAVORS["debugmodel"], 512
    head_dim = args.dim // args.n_heads
    score_per_token = model_flops_per_token(args, seq, causal=True) - model_flops_per_token(args, 0, causal=True)
    per_sample = args.n_layers * calibrate.attention_flops(1, args.n_heads, seq, head_dim)
    assert per_sample == pytest.approx(score_per_token * seq)
