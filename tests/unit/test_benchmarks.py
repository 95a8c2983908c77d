"""The GPU session script and the checkpoint benchmark: their CPU smoke runs, and the GPU runs' arguments.

A lent GPU comes for minutes, so what can be checked here is checked here: every trainer argument the
GPU steps pass is accepted (the run_train.sh steps through the dry run, which builds the 1B as the real
job would), the smoke runs write the files the session reports, a step over its time is killed with all
its processes, and the budget skips what does not fit. Speeds are never asserted.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from torchtitan_like.config.loader import load_config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_checkpoint  # noqa: E402
import bench_train  # noqa: E402
import gpu_session  # noqa: E402

CPU_ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="")


def run_script(script: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=CPU_ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("snapshot", [False, True], ids=["train_1B", "memory_snapshot"])
def test_the_gpu_run_train_steps_build_in_the_dry_run(tmp_path, snapshot):
    ctx = gpu_session.Context(out=tmp_path, peer_site=None, smoke=False)
    args = gpu_session.train_args(ctx, snapshot=snapshot)
    r = subprocess.run(["./run_train.sh", *args], cwd=ROOT, env=dict(CPU_ENV, COMM_MODE="fake_backend", NGPU="1"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "dry run OK: llama3 1B" in r.stdout + r.stderr


def test_every_benchmark_config_and_the_checkpoint_benchmark_args_load(tmp_path):
    for name, cfg in bench_train.CONFIGS.items():
        job = load_config(cfg.ours_args(steps=3, dump=str(tmp_path)))
        assert job.model.flavor == cfg.flavor and job.training.seq_len == cfg.seq_len, name
    # The most wanted first: the session step's time cap may cut the last.
    assert bench_train.LONG_SEQUENCE == ["1B_long128k_fullac", "1B_long32k_fullac", "1B_long8k_fullac"]
    assert not set(bench_train.LONG_SEQUENCE) & set(bench_train.MATRIX)
    a = bench_checkpoint.parser().parse_args([])  # the GPU defaults: 1B
    for mode in bench_checkpoint.MODES:
        job = load_config(bench_checkpoint.trainer_args(a, mode, dump=str(tmp_path)))
        assert job.model.flavor == "1B"
        assert job.checkpoint.async_mode == mode and job.checkpoint.keep_latest_k == 1
        assert job.training.steps == 12 and job.checkpoint.interval == 4


def test_peer_runs_refuse_configs_with_options_torchtitan_is_not_given():
    r = run_script("bench_train.py", "--long", "--peer-site", "/nonexistent")
    assert r.returncode == 2 and "--peer-site: these configs use options torchtitan is not given" in r.stderr


def test_checkpoint_benchmark_cpu_smoke(tmp_path):
    r = run_script("bench_checkpoint.py", "--flavor", "debugmodel", "--seq-len", "64", "--saves", "2", "--interval",
                   "2", "--modes", "disabled,async", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "checkpoint_summary.json").read_text())
    assert [run["mode"] for run in summary["runs"]] == ["disabled", "async"]
    for run in summary["runs"]:
        assert [s["step"] for s in run["saves"]] == [2, 4]
        assert run["checkpoint_folders"] == ["step-4"]  # keep_latest_k=1 purged step-2
        for s in run["saves"]:
            assert s["blocking_s"] == pytest.approx(s["call_s"] - s["previous_wait_s"] + s["staging_wait_s"])
            assert s["total_s"] > 0 and s["call_s"] > s["previous_wait_s"] >= 0
            assert s["staging_wait_s"] == 0  # no staging on CPU
            if run["mode"] == "disabled":  # the whole save is inside the call
                assert s["total_s"] <= s["call_s"]
    assert "| async | cpu x 1 |" in r.stdout


def test_checkpoint_benchmark_rejects_bad_arguments():
    r = run_script("bench_checkpoint.py", "--modes", "async,sometimes")
    assert r.returncode == 2 and "--modes: 'sometimes' is not one of disabled, async, async_with_pinned_mem" in r.stderr
    r = run_script("bench_checkpoint.py", "--saves", "1")
    assert r.returncode == 2 and "--saves and --interval must be >= 2" in r.stderr


def test_smoke_session_records_each_step(tmp_path):
    out, work = tmp_path / "OUT", tmp_path / "work"
    r = run_script("gpu_session.py", "--smoke", "--only", "env,train_1B,memory_snapshot", "--budget", "200",
                   "--out", str(out), "--work", str(work))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # The device tool brings back at most 8 files from $OUT: the session leaves exactly two there.
    assert sorted(p.name for p in out.iterdir()) == ["session.json", "session.tar.gz"]
    steps = {s["name"]: s for s in json.loads((out / "session.json").read_text())["steps"]}
    assert list(steps) == ["env", "train_1B", "memory_snapshot"]
    assert steps["env"]["rc"] == 0 and '"torch": ' in (work / "env.log").read_text()
    assert steps["train_1B"]["rc"] == 0
    rows = [json.loads(line) for line in (work / "train_1B" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4]
    assert steps["memory_snapshot"] == {"name": "memory_snapshot", "issue": "8", "skipped": "needs a CUDA device"}
    # The bundle holds the work folder: logs and every step's files.
    import tarfile

    with tarfile.open(out / "session.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"env.log", "train_1B.log", "train_1B/metrics.jsonl"} <= names


def test_a_benchmark_steps_numbers_are_inlined_in_session_json(tmp_path):
    out = tmp_path / "OUT"
    r = run_script("gpu_session.py", "--smoke", "--only", "bench_1B_eager_bf16", "--budget", "300",
                   "--out", str(out), "--work", str(tmp_path / "work"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (step,) = json.loads((out / "session.json").read_text())["steps"]
    results = step["results"]  # the small result JSON files of the step's folder, by name
    assert results and all(not name.endswith(".raw.json") for name in results)
    assert any("tokens_per_s" in json.dumps(v) for v in results.values())
    assert sorted(p.name for p in out.iterdir()) == ["session.json", "session.tar.gz"]


def test_budget_skips_what_does_not_fit(tmp_path):
    r = run_script("gpu_session.py", "--smoke", "--only", "train_1B,calibrate", "--budget", "30",
                   "--out", str(tmp_path / "OUT"), "--work", str(tmp_path / "work"))
    assert r.returncode == 0, r.stdout + r.stderr
    steps = json.loads((tmp_path / "OUT" / "session.json").read_text())["steps"]
    assert [s["skipped"].split(":")[0] for s in steps] == ["budget", "budget"]
    assert "the step needs at least 60 s" in steps[0]["skipped"]
    r = run_script("gpu_session.py", "--only", "train_1B,nope", "--out", str(tmp_path))
    assert r.returncode == 2 and "--only: 'nope' is not a step; see --list" in r.stderr


def test_a_step_over_its_time_is_killed_with_every_process_under_it(tmp_path):
    # The grandchild starts a session of its own, as torchrun's workers do.
    pid_file = tmp_path / "grandchild.pid"
    spawn = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(120)\n"
    )
    step = gpu_session.Step("hang", "-", "sleeps", lambda ctx: [[sys.executable, "-c", spawn]], cap_s=60)
    ctx = gpu_session.Context(out=tmp_path, peer_site=None, smoke=True)
    t0 = time.monotonic()
    record = gpu_session.run_step(step, ctx, timeout_s=3, log=tmp_path / "hang.log")
    assert record["rc"] == 124 and record["timed_out"] is True
    assert time.monotonic() - t0 < 30
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "the grandchild outlived the step's timeout"


def _alive(pid: int) -> bool:
    """Running (a killed process can linger a moment as a zombie until init reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_snapshot_check_reports_and_deletes_the_pickles(tmp_path, capsys):
    assert gpu_session.check_snapshots(tmp_path) == 1
    assert "no memory snapshot under" in capsys.readouterr().err
    snap = tmp_path / "iteration_3" / "rank0_memory_snapshot.pickle"
    snap.parent.mkdir()
    snap.write_bytes(pickle.dumps({"segments": [{"total_size": 2**30}, {"total_size": 2**29}], "device_traces": []}))
    assert gpu_session.check_snapshots(tmp_path) == 0
    assert "iteration_3/rank0_memory_snapshot.pickle: " in (out := capsys.readouterr().out)
    assert "2 segments, 1.50 GiB reserved" in out
    assert not snap.exists()


def test_the_doc_mask_step_runs_bench_trains_document_mask_configs(tmp_path):
    assert list(gpu_session.DOC_MASK) == bench_train.DOC_MASK
    for name in bench_train.DOC_MASK:
        job = load_config(bench_train.CONFIGS[name].ours_args(steps=3, dump=str(tmp_path)))
        assert job.model.attn_mask_type == "block_causal" and job.compile.enable, name
    kernels = [load_config(bench_train.CONFIGS[n].ours_args(steps=3, dump=str(tmp_path))).model.attn_type
               for n in bench_train.DOC_MASK]
    assert kernels == ["flex", "sdpa"]
    ctx = gpu_session.Context(out=tmp_path, peer_site=None, smoke=False)
    assert [c[c.index("--name") + 1] for c in gpu_session._doc_mask(ctx)] == list(gpu_session.DOC_MASK)


def test_the_bf16_storage_step_runs_ours_alone(tmp_path):
    ctx = gpu_session.Context(out=tmp_path, peer_site="/tmp/site", smoke=False)
    (step,) = [s for s in gpu_session.STEPS if s.name == "bench_store_1B_bf16"]
    (cmd,) = step.commands(ctx)
    assert cmd[cmd.index("--name") + 1] == "store_1B_bf16" and "--peer-site" not in cmd
    job = load_config(bench_train.CONFIGS["store_1B_bf16"].ours_args(steps=3, dump=str(tmp_path)))
    assert job.training.dtype == "bfloat16" and "store_1B_bf16" not in bench_train.MATRIX


def test_the_8B_rows_train_without_activation_checkpointing_and_lead_the_session_traced(tmp_path):
    """Issue 5 asks for AC only where a row needs it to fit; the 8B slice does not (the planner: 62.5 GiB eager,
    49.7 GiB compiled on an 80 GB H100). Its bf16 and rowwise rows come first in a session, each traced beside
    torchtitan's."""
    for name in bench_train.MATRIX:
        job = load_config(bench_train.CONFIGS[name].ours_args(steps=3, dump=str(tmp_path)))
        assert job.activation_checkpoint.mode == "none", name
        peer = bench_train.CONFIGS[name].peer_args(steps=3, dump=str(tmp_path))
        assert peer[peer.index("--activation_checkpoint.mode") + 1] == "none", name  # torchtitan's default is AC
    names = [s.name for s in gpu_session.STEPS]
    assert names[2:4] == ["bench_8B_slice8_compile_bf16", "bench_8B_slice8_compile_f8_rowwise"]
    ctx = gpu_session.Context(out=tmp_path, peer_site="/site", smoke=False)
    for step in gpu_session.STEPS[2:4]:
        (cmd,) = step.commands(ctx)
        assert cmd[cmd.index("--profile-steps") + 1] == "2" and "--peer-site" in cmd


def test_the_rowwise_variants_are_ours_only_experiments(tmp_path, monkeypatch):
    """Rows test the ways torchtitan's rowwise run differs from ours: complex RoPE (the same rotation) and
    inductor's emulate_precision_casts; and two inductor settings (GEMM autotuning, a higher realize
    threshold). They stay out of the matrix and away from the peer."""
    import torch
    import torch._inductor.config

    from torchtitan_like.models.llama3 import model
    from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS

    variants = [n for n, c in bench_train.CONFIGS.items() if c.variant and not n.startswith("debug_")]
    assert sorted(variants) == ["8B_slice8_compile_f8_rowwise_emulate_precision_casts",
                                "8B_slice8_compile_f8_rowwise_max_autotune_gemm",
                                "8B_slice8_compile_f8_rowwise_realize_opcount_50",
                                "8B_slice8_compile_f8_rowwise_rope_complex"]
    assert not set(variants) & set(bench_train.MATRIX)
    for name in variants:
        assert bench_train.CONFIGS[name] == replace(bench_train.CONFIGS["8B_slice8_compile_f8_rowwise"],
                                                    variant=bench_train.CONFIGS[name].variant)
    r = run_script("bench_train.py", "--name", variants[0], "--peer-site", str(tmp_path))
    assert r.returncode == 2 and "CONFIGS extra or variant" in r.stderr
    # The complex rotation is ours, to rounding, with Llama 3.1's frequency scaling too.
    args = LLAMA3_FLAVORS["8B"]
    freqs = model.precompute_freqs_cis(args.head_dim, 64, args.rope_theta, args.rope_scaling)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        xq = torch.randn(2, 64, 4, args.head_dim, generator=g).to(dtype)
        xk = torch.randn(2, 64, 2, args.head_dim, generator=g).to(dtype)
        for ours, theirs in zip(model.apply_rotary_emb(xq, xk, freqs), bench_train._complex_rotary_emb(xq, xk, freqs)):
            assert theirs.dtype == dtype
            torch.testing.assert_close(theirs, ours)
    # Each variant changes what it says, in the worker, before the model is built.
    monkeypatch.setattr(model, "apply_rotary_emb", model.apply_rotary_emb)
    bench_train.VARIANTS["rope_complex"]()
    assert model.apply_rotary_emb is bench_train._complex_rotary_emb
    # The config module's own patch restores it: under torch 2.11, monkeypatch's restore leaves the key
    # undefined ("torch._inductor.config.emulate_precision_casts does not exist" in every later compile).
    keys = ("emulate_precision_casts", "max_autotune_gemm", "realize_opcount_threshold")
    before = [getattr(torch._inductor.config, k) for k in keys]
    with torch._inductor.config.patch(emulate_precision_casts=False, max_autotune_gemm=False,
                                      realize_opcount_threshold=30):
        bench_train.VARIANTS["emulate_precision_casts"]()
        assert torch._inductor.config.emulate_precision_casts is True
        bench_train.VARIANTS["max_autotune_gemm"]()
        assert torch._inductor.config.max_autotune_gemm is True
        bench_train.VARIANTS["realize_opcount_50"]()
        assert torch._inductor.config.realize_opcount_threshold == 50
    assert [getattr(torch._inductor.config, k) for k in keys] == before
