"""tools/plan.py as a user runs it: plan a job, write the winning TOML, and run that TOML through the
dry run of ./run_train.sh; and its user errors (exit 2, one `error:` line)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLAN = ROOT / "tools" / "plan.py"
TIMEOUT_S = 120


def run_plan(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(PLAN), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def run_dry(config: Path, json_path: Path, *, ngpu: int) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHON=sys.executable, COMM_MODE="fake_backend", NGPU=str(ngpu), CONFIG_FILE=str(config),
               DRY_RUN_JSON=str(json_path))
    env.pop("NNODES", None)
    env.pop("DRY_RUN_RANK", None)
    return subprocess.run([str(ROOT / "run_train.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


ROW = re.compile(r"^\s*(\d+)\s{2}(\S.*?)\s{2,}\d")


def test_plan_8b_on_8_h100_writes_a_toml_that_the_dry_run_builds(tmp_path: Path) -> None:
    out = tmp_path / "plans" / "plan.toml"
    r = run_plan("--model", "llama3:8B", "--ngpu", "8", "--hardware", "H100", "--seq-len", "8192",
                 "--global-batch", "64", "--out", str(out), "--explain", "1")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    lines = r.stdout.splitlines()

    # The ranked table: a header, then rows numbered 1, 2, 3, ...
    header = next(i for i, line in enumerate(lines) if re.match(r"^\s*#\s+layout\s+tok/s/GPU", line))
    rows = []
    for line in lines[header + 2:]:
        m = ROW.match(line)
        if not m:
            break
        rows.append((int(m.group(1)), m.group(2).strip()))
    assert len(rows) >= 3, r.stdout
    assert [n for n, _ in rows] == list(range(1, len(rows) + 1))
    assert re.search(r"^\d+ layouts fit in 80 GiB", r.stdout, re.M), r.stdout
    winner = rows[0][1]

    # The breakdown of row 1.
    assert f"layout: {winner}  (world 8)" in r.stdout, r.stdout
    for item in ("peak memory (pipeline rank 0):", "-> fits", "params ", "activations ", "step time:", "compute ",
                 "throughput:", "tokens/s/GPU"):
        assert item in r.stdout, item
    assert f"wrote {out}: {winner}" in r.stdout

    # The TOML the trainer reads back: the planned job and a layout of 8 ranks.
    from torchtitan_like.config.loader import load_config

    cfg = load_config(["--job.config_file", str(out)])
    p = cfg.parallelism
    degrees = {"pp": p.pipeline_parallel_degree, "dp_replicate": p.data_parallel_replicate_degree,
               "dp_shard": p.data_parallel_shard_degree, "cp": p.context_parallel_degree,
               "tp": p.tensor_parallel_degree}
    assert cfg.training.seq_len == 8192 and cfg.training.global_batch_size == 64
    assert (cfg.model.name, cfg.model.flavor) == ("llama3", "8B")
    assert all(d >= 1 for d in degrees.values()), degrees
    assert math.prod(degrees.values()) == 8, degrees

    # The CLI's own verification: the dry run built it and its state matches the planner's.
    m = re.search(r"dry run of (\S+) on 8 ranks: OK; rank 0 state ([\d.]+) GiB, exactly as planned", r.stdout)
    assert m, r.stdout[-3000:]
    assert m.group(1) == str(out)
    assert float(m.group(2)) > 0, m.group(0)

    # And the written TOML runs through ./run_train.sh's dry run on 8 ranks.
    report_path = tmp_path / "dry.json"
    d = run_dry(out, report_path, ngpu=8)
    assert d.returncode == 0, d.stdout[-4000:] + d.stderr[-4000:]
    assert "dry run OK" in d.stdout + d.stderr
    report = json.loads(report_path.read_text())
    assert report["world_size"] == 8 and report["rank"] == 0
    assert {k: report["layout"][k] for k in degrees} == degrees

    # Its rank-0 state, exactly (bytes), is the planner's prediction for that layout.
    from torchtitan_like.planner.state import predicted_state_bytes
    from torchtitan_like.trainer import check_job

    checked = check_job(cfg, 8)
    stage_fqns = None
    if checked.pp_plan is not None:
        stage_fqns = [checked.pp_plan.fqns_per_stage[s] for s in checked.pp_plan.stage_ids(0)]
    predicted = predicted_state_bytes(checked.model_args, degrees, rank=0, stage_fqns=stage_fqns)
    assert report["state_bytes"] == predicted.as_dict()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "llama3:9B", "--ngpu", "8"], "--model 'llama3:9B' is not a known model"),
        (["--model", "llama3:8B", "--ngpu", "0"], "--ngpu 0 must be >= 1"),
        (["--model", "llama3:405B", "--ngpu", "1", "--seq-len", "8192", "--global-batch", "1"], "no layout fits"),
    ],
    ids=["unknown-model", "ngpu-0", "nothing-fits"],
)
def test_user_errors_exit_2_with_one_error_line(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "plan.toml"
    r = run_plan(*args, "--out", str(out))
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), r.stderr
    assert message in errors[0], errors[0]
    assert "Traceback" not in r.stdout + r.stderr
    assert not out.exists()


def test_a_cpu_profile_plans_and_dry_runs_the_job_as_a_cpu_job(tmp_path: Path) -> None:
    # FlexAttention has no CPU backward and the CPU trainer refuses it: a plan for a CPU profile must say so,
    # not write a TOML and report "dry run ... OK" from a dry run on CUDA.
    config = tmp_path / "flex.toml"
    config.write_text('[model]\nflavor = "debugmodel"\nattn_type = "flex"\n')
    out = tmp_path / "plan.toml"
    r = run_plan("--config", str(config), "--ngpu", "2", "--hardware", str(ROOT / "benchmarks" / "profiles" /
                 "cpu_ci_2core.json"), "--global-batch", "4", "--out", str(out))
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: no layout of 2 GPUs passes the trainer's checks"), r.stderr
    assert 'model.attn_type="flex" needs CUDA to train' in errors[0], errors[0]
    assert not out.exists()


def test_nothing_fits_names_the_usable_memory_the_smallest_layout_exceeds(tmp_path: Path) -> None:
    # The 8B at seq 8192 on one GPU needs ~122 GiB at least: on a 123 GiB GPU with 2 GiB reserved it does not
    # fit, and the message said "no layout fits in 123 GiB per GPU; the smallest valid layout needs 122.1 GiB".
    profile = json.loads((ROOT / "benchmarks" / "profiles" / "nvidia_h200.json").read_text())
    hw = tmp_path / "gpu.json"
    hw.write_text(json.dumps({**profile, "hbm_gib": 123.0, "reserved_gib": 2.0}))
    r = run_plan("--model", "llama3:8B", "--ngpu", "1", "--hardware", str(hw), "--seq-len", "8192",
                 "--global-batch", "1", "--no-verify")
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    error = next(line for line in r.stderr.splitlines() if line.startswith("error: "))
    m = re.search(r"\(([\d.]+) GiB usable after 2 GiB reserved\); the smallest valid layout needs ([\d.]+) GiB", error)
    assert m, error
    usable, needed = float(m.group(1)), float(m.group(2))
    assert needed > usable and usable == 121.0, error
