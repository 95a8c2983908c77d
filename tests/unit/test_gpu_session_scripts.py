"""The GPU session scripts (benchmarks/gpu_session.py, bench_train.py, bench_checkpoint.py, calibrate.py):
what would waste or mislabel part of the one unattended GPU session. They run on CPU: the CUDA-only
paths are reached by monkeypatching (calibrate) or by faking the torchrun launches (bench_train), never
by timing anything.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from torchtitan_like.config.loader import load_config
from torchtitan_like.planner.hardware import BUILTIN_PROFILES

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_checkpoint  # noqa: E402
import bench_train  # noqa: E402
import gpu_session  # noqa: E402


def _fake_raw(world_size: int = 1) -> dict:
    return {
        "step_times_s": [0.5, 0.1, 0.1], "peak_allocated_bytes": 2**30, "peak_reserved_bytes": 2**30,
        "device": "cpu", "device_type": "cpu", "torch": torch.__version__, "version": "test", "torchao": None,
        "compile_s": None, "recompiles": None, "final_loss": 1.0, "world_size": world_size,
    }


# ------------------------------------------------------------------------------------------------
# bench_checkpoint.py
# ------------------------------------------------------------------------------------------------


def test_every_benchmarked_checkpoint_save_is_a_full_state_save(tmp_path):
    # The trainer calls maybe_save(step, last=step == training.steps), and a save with last=True is
    # model-only when checkpoint.last_save_model_only (CheckpointManager.maybe_save). The benchmark's
    # docstring and RESULTS.md promise a full-state save (model, optimizer, data loader, scheduler) each time.
    session = [gpu_session._checkpoint(gpu_session.Context(out=tmp_path, peer_site=None, smoke=smoke))[0]
               for smoke in (False, True)]
    from_session = [cmd[cmd.index(str(ROOT / "benchmarks" / "bench_checkpoint.py")) + 1:cmd.index("--out")]
                    for cmd in session]
    for argv in ([], ["--flavor", "debugmodel", "--seq-len", "64", "--saves", "2", "--interval", "2"], *from_session):
        a = bench_checkpoint.parser().parse_args(argv)
        assert a.saves >= 2, "the summary reports the first save and the median of those after it"
        for mode in bench_checkpoint.MODES:
            job = load_config(bench_checkpoint.trainer_args(a, mode, dump=str(tmp_path)))
            steps, interval = job.training.steps, job.checkpoint.interval
            saves = [s for s in range(1, steps + 1) if s % interval == 0 or s == steps]
            assert len(saves) == a.saves
            model_only = [s for s in saves if s == steps and job.checkpoint.last_save_model_only]
            assert model_only == [], f"{mode}: the save at step {model_only} holds only the model"


# ------------------------------------------------------------------------------------------------
# bench_train.py
# ------------------------------------------------------------------------------------------------


def _fake_launches(calls: list[tuple[list[str], dict[str, str]]], on_peer=None):  # noqa: ANN001
    def fake_launch(cmd: list[str], *, env: dict[str, str], log: Path) -> int:
        calls.append((cmd, env))
        if "--worker" in cmd:  # ours
            Path(cmd[cmd.index("--raw-out") + 1]).write_text(json.dumps(_fake_raw()))
            return 0
        if on_peer is not None:
            on_peer()
        return 1  # the torchtitan run failed (or, in the GPU session, was killed at the step's timeout)

    return fake_launch


def test_relative_peer_site_is_resolved_against_the_callers_folder(tmp_path, monkeypatch):
    (tmp_path / "site" / "torchtitan").mkdir(parents=True)
    calls: list[tuple[list[str], dict[str, str]]] = []
    monkeypatch.setattr(bench_train, "_launch", _fake_launches(calls))
    monkeypatch.chdir(tmp_path)
    bench_train.main(["--name", "debug_cpu", "--steps", "2", "--warmup", "1", "--peer-site", "site",
                      "--out", str(tmp_path / "out")])
    (peer_cmd, peer_env), = [(c, e) for c, e in calls if "--worker" not in c]
    first = peer_env["PYTHONPATH"].split(os.pathsep)[0]
    # _launch runs the peer with cwd=ROOT: only an absolute path names the caller's folder there.
    assert Path(first).is_absolute() and Path(first) == tmp_path / "site"


def test_ours_result_is_on_disk_before_the_peer_run_starts(tmp_path, monkeypatch):
    out = tmp_path / "out"
    seen: dict[str, object] = {}

    def at_peer_start() -> None:
        f = out / "debug_cpu.json"
        seen["ours"] = json.loads(f.read_text()).get("ours") if f.exists() else None

    calls: list[tuple[list[str], dict[str, str]]] = []
    (tmp_path / "site" / "torchtitan").mkdir(parents=True)
    monkeypatch.setattr(bench_train, "_launch", _fake_launches(calls, on_peer=at_peer_start))
    bench_train.main(["--name", "debug_cpu", "--steps", "2", "--warmup", "1", "--peer-site", str(tmp_path / "site"),
                      "--out", str(out)])
    assert len(calls) == 2  # ours, then the peer
    # gpu_session kills the whole tree at the step's timeout (SIGKILL): whatever is not on disk is lost.
    assert seen["ours"] is not None and "tokens_per_s_per_device" in seen["ours"]


# ------------------------------------------------------------------------------------------------
# calibrate.py (its CUDA path, with the device faked)
# ------------------------------------------------------------------------------------------------


def _load_calibrate(monkeypatch):  # noqa: ANN001, ANN202
    spec = importlib.util.spec_from_file_location("calibrate", ROOT / "benchmarks" / "calibrate.py")
    assert spec is not None and spec.loader is not None
    calibrate = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "calibrate", calibrate)  # its dataclasses look their module up there
    spec.loader.exec_module(calibrate)
    return calibrate


def test_one_gpu_calibration_keeps_the_node_shape_of_the_builtin_profile(tmp_path, monkeypatch):
    cal = _load_calibrate(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (139 * 2**30, 140 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: types.SimpleNamespace(total_memory=140 * 2**30))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(cal, "measure_gemm", lambda device, dtype, sizes, quiet=False: {"tflops": 700.0})
    monkeypatch.setattr(cal, "fp8_unsupported_reason", lambda device: None)
    monkeypatch.setattr(cal, "measure_fp8_gemm", lambda device, sizes: {"tflops": 1300.0})
    monkeypatch.setattr(cal, "measure_attention", lambda device, dtype, sizes: {"tflops": 400.0})
    monkeypatch.setattr(cal, "measure_copy", lambda device, sizes: {"gbps": 4000.0})
    out = tmp_path / "profile.json"
    assert cal.main(["--out", str(out)]) == 0
    profile = json.loads(out.read_text())
    builtin = BUILTIN_PROFILES["H200"]
    # The script itself takes the intra-node bandwidth from the built-in H200 node (one GPU cannot measure
    # it): the profile only means something for that node shape.
    assert profile["intra_node_gbps"] == pytest.approx(builtin.intra_node_gbps * builtin.link_efficiency)
    assert profile["gpus_per_node"] == builtin.gpus_per_node


# ------------------------------------------------------------------------------------------------
# gpu_session.py
# ------------------------------------------------------------------------------------------------


def test_session_bundle_stays_under_the_device_tools_file_limit(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "memory_snapshot").mkdir(parents=True)
    out.mkdir()
    for i in range(3):  # e.g. leftover snapshot pickles of a step that failed before --check-snapshots ran
        (work / "memory_snapshot" / f"part{i}.bin").write_bytes(os.urandom(7 * 2**20))
    (work / "env.log").write_text("torch ...\n")
    gpu_session.publish({"steps": []}, work, out)
    assert (out / "session.tar.gz").stat().st_size <= 16 * 2**20
    import tarfile

    with tarfile.open(out / "session.tar.gz") as tar:
        assert "env.log" in tar.getnames()  # the small files still travel


def test_a_gpu_session_without_cuda_stops_instead_of_running_the_gpu_steps(tmp_path, monkeypatch):
    ran: list[str] = []

    def fake_run_step(step, ctx, timeout_s, log):  # noqa: ANN001, ANN202
        ran.append(step.name)
        log.write_text("")
        return {"name": step.name, "issue": step.issue, "rc": 0, "seconds": 0.0, "log": str(log)}

    monkeypatch.setattr(gpu_session, "_cuda_available", lambda: False)
    monkeypatch.setattr(gpu_session, "run_step", fake_run_step)
    try:
        gpu_session.main(["--only", "train_1B,bench_8B_slice8_compile_bf16", "--budget", "500",
                          "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    except SystemExit:
        pass  # refusing with a usage error is a fix too
    assert ran == [], f"GPU steps ran on a machine without CUDA: {ran}"


def test_results_md_says_where_the_step_logs_go():
    text = " ".join((ROOT / "benchmarks" / "RESULTS.md").read_text().split())
    assert "`<step>.log` land in `--out`" not in text


def test_bench_train_refuses_a_peer_site_without_torchtitan(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench_train.main(["--name", "debug_cpu", "--peer-site", str(tmp_path), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "no torchtitan package there" in capsys.readouterr().err


def test_a_session_whose_peer_site_lacks_torchtitan_runs_our_steps_without_it(tmp_path, monkeypatch, capsys):
    """A lent GPU is scarce: a --peer-site without torchtitan drops the side-by-side (said on stderr and in
    session.json) instead of ending the session before any step."""
    commands: list[list[str]] = []

    def fake_run_step(step, ctx, timeout_s, log):  # noqa: ANN001, ANN202
        commands.append(gpu_session._peer(ctx))
        log.write_text("")
        return {"name": step.name, "issue": step.issue, "rc": 0, "seconds": 0.0, "log": str(log)}

    monkeypatch.setattr(gpu_session, "_cuda_available", lambda: True)
    monkeypatch.setattr(gpu_session, "run_step", fake_run_step)
    rc = gpu_session.main(["--only", "bench_8B_slice8_compile_bf16", "--budget", "500", "--peer-site", str(tmp_path),
                           "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    assert rc == 0 and commands == [[]]
    assert "no torchtitan package there" in capsys.readouterr().err
    session = json.loads((tmp_path / "out" / "session.json").read_text())
    assert "no torchtitan package there" in session["peer_missing"]


def test_a_steps_metrics_rows_travel_in_session_json(tmp_path):
    """train_1B writes only metrics.jsonl (no result JSON): its rows are the step's numbers."""
    folder = tmp_path / "train_1B"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"step": 10, "tps": 9000.0}\n\n{"step": 20, "tps": 9100.0}\n')
    (folder / "result.json").write_text('{"tokens_per_s": 1}')
    (folder / "cut.jsonl").write_text('{"step": 1}\n{"step": 2, "tp')  # a step killed mid-write
    (folder / "broken.jsonl").write_text('{"step": 1\n')
    record: dict = {}
    gpu_session._inline_results(record, folder)
    assert record["results"] == {
        "metrics.jsonl": [{"step": 10, "tps": 9000.0}, {"step": 20, "tps": 9100.0}],
        "cut.jsonl": [{"step": 1}],
        "result.json": {"tokens_per_s": 1},
    }
