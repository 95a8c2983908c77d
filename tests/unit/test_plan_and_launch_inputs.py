"""Edge cases of the planner CLI (tools/plan.py, planner/layout.py, plan.py) and the launchers
(run_train.sh, train.py, tools/slurm_train.sbatch), and the shipped train_configs: every config the
docs name exists and passes the dry run at the world size it is written for."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEBUG_ARGV = ("--model.name", "llama3", "--model.flavor", "debugmodel")


pytestmark = pytest.mark.usefixtures("restore_root_logger")  # (tests/conftest.py)


def plan_cli():
    """tools/plan.py as a module (its main(argv) returns the exit status)."""
    spec = importlib.util.spec_from_file_location("plan_cli", ROOT / "tools" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_plan(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = plan_cli().main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """["--a.b", "1", "--c.no_d", ...] -> {"a.b": "1", "c.no_d": "true", ...}"""
    out: dict[str, str] = {}
    i = 0
    while i < len(overrides):
        key = overrides[i][2:]
        if i + 1 < len(overrides) and not overrides[i + 1].startswith("--"):
            out[key] = overrides[i + 1]
            i += 2
        else:
            out[key] = "true"
            i += 1
    return out


# ---- tools/plan.py ------------------------------------------------------------------------------


def test_fp8_on_a_gpu_without_float8_is_refused_or_never_planned(tmp_path: Path, capsys) -> None:
    out = tmp_path / "plan.json"
    rc, stdout, err = run_plan(capsys, "--model", "llama3:debugmodel", "--ngpu", "2", "--hardware", "A100",
                               "--precision", "fp8", "--seq-len", "256", "--global-batch", "4", "--no-verify",
                               "--json", str(out))
    if rc == 2:  # refused up front, naming float8
        (line,) = error_lines(err)
        assert re.search(r"fp8|float8", line), line
    else:  # or planned without float8: the trainer stops on an A100 unless quantize.linear.float8.emulate
        assert rc == 0, err
        rows = json.loads(out.read_text())
        assert rows
        float8_rows = [r["layout"] for r in rows if parse_overrides(r["overrides"]).get("model.converters")]
        assert float8_rows == [], float8_rows[:3]


@pytest.mark.parametrize("feature, ngpu, wanted", [
    ("hsdp", "4", lambda d: int(d["parallelism.data_parallel_replicate_degree"]) > 1
     and int(d["parallelism.data_parallel_shard_degree"]) > 1),
    ("cp", "2", lambda d: int(d["parallelism.context_parallel_degree"]) > 1),
], ids=["hsdp", "cp"])
def test_allowing_a_sharded_feature_without_fsdp_plans_it_or_says_why(tmp_path: Path, capsys, feature, ngpu,
                                                                      wanted) -> None:
    out = tmp_path / "plan.json"
    rc, stdout, err = run_plan(capsys, "--model", "llama3:debugmodel", "--ngpu", ngpu, "--seq-len", "256",
                               "--global-batch", "8", "--allow", feature, "--no-verify", "--json", str(out))
    if rc == 2:  # refused, telling the user that the feature needs fsdp too
        (line,) = error_lines(err)
        assert "fsdp" in line, line
    else:
        assert rc == 0, err
        rows = json.loads(out.read_text())
        assert any(wanted(parse_overrides(r["overrides"])) for r in rows), [r["layout"] for r in rows]


def test_no_valid_layout_is_not_reported_as_a_memory_problem(capsys) -> None:
    # 3 GPUs, global batch 4: dp 3 does not divide 4, tp 3 does not divide 16 heads, cp 2 does not divide 3,
    # pp is not allowed. No layout is valid at all; memory plays no part (the debug model is 6M parameters).
    rc, stdout, err = run_plan(capsys, "--model", "llama3:debugmodel", "--ngpu", "3", "--seq-len", "256",
                               "--global-batch", "4", "--allow", "fsdp,hsdp,ddp,tp,cp,ac", "--no-verify")
    assert rc == 2, stdout + err
    assert "0 valid ones do not" in stdout and "0 layouts fit" in stdout  # precondition: nothing valid
    (line,) = error_lines(err)
    assert not line.startswith("error: no layout fits in"), line


def test_the_refusal_summary_states_each_rule_not_its_first_word(tmp_path: Path, capsys) -> None:
    # Every float8 refusal was summarised as "float8" (the message cut at its first ":"), and longer rules at 90
    # characters, mid-word.
    config = tmp_path / "f8.toml"
    config.write_text((ROOT / "train_configs" / "debug_model.toml").read_text()
                      + "\n[quantize.linear.float8]\nfilter_fqns = []\n")  # ('output', 1000 rows per TP rank of 2)
    rc, stdout, err = run_plan(capsys, "--config", str(config), "--ngpu", "8", "--precision", "fp8",
                               "--global-batch", "16", "--no-verify", "--top", "1")
    assert rc == 0, err
    summary = stdout.split("refused by the trainer's checks (count, reason):\n", 1)[1].splitlines()
    assert re.fullmatch(r" +\d+  float8: linear 'output' multiplies a 1000x256 weight on each rank with tensor "
                        r"parallel's split; CUDA's float8 matmul needs both dimensions divisible by 16", summary[0]), \
        summary


def test_a_refusal_reason_is_the_rule_without_its_fix_or_layout_hints() -> None:
    from torchtitan_like.components.float8 import gemm_dims_error
    from torchtitan_like.planner.layout import refusal_reason

    assert refusal_reason(gemm_dims_error("output", [1000, 256], tp_split=True)) == (
        "float8: linear 'output' multiplies a 1000x256 weight on each rank with tensor parallel's split; CUDA's "
        "float8 matmul needs both dimensions divisible by 16")
    # Layouts refused for one rule count together, whatever hint about the rest of the layout follows it.
    rule = ("parallelism.tensor_parallel_degree=3 must divide model n_heads=16 and n_kv_heads=8 (KV heads are "
            "sharded, not replicated)")
    assert {refusal_reason(rule + hint) for hint in (
        "; with data_parallel_shard_degree=-1 (it takes what the other degrees leave), try 1",
        "; no degree that does also fits training.global_batch_size=6 (a multiple of local_batch_size(3) x the "
        "data-parallel degree the world leaves): change those too, or let tools/plan.py choose the layout",
    )} == {rule}
    # A "; " or ": " inside parentheses is part of the rule.
    fsdp = ("quantize.linear.float8.enable_fsdp_float8_all_gather=true needs FSDP (parameters sharded over "
            "data_parallel_shard_degree x context_parallel_degree > 1; this layout has 1 x 1)")
    assert refusal_reason(fsdp + ": set it to false or shard the model") == fsdp


def test_explain_prints_overrides_that_load_when_pasted_into_a_shell() -> None:
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.planner.hardware import load_profile
    from torchtitan_like.planner.layout import Layout, PlanInputs
    from torchtitan_like.planner.plan import explain, predict_layout

    hw = load_profile("H100")
    inputs = PlanInputs(base_argv=DEBUG_ARGV, world_size=2, hardware=hw, seq_len=256, global_batch_size=4)
    layout = Layout(dp_replicate=1, dp_shard=2, cp=1, tp=1, pp=1, local_batch_size=2, microbatch_size=2)
    text = explain(predict_layout(inputs, layout), hw)
    (line,) = [ln for ln in text.splitlines() if ln.strip().startswith("config overrides:")]
    pasted = shlex.split(line.split("config overrides:", 1)[1])
    cfg = load_config([*DEBUG_ARGV, *pasted])
    assert cfg.parallelism.data_parallel_shard_degree == 2 and cfg.model.converters == []
    assert cfg.training.loss_chunk_size == 0


def test_describe_calls_replicate_with_cp_sharding_hsdp() -> None:
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.distributed.parallel_dims import ParallelDims
    from torchtitan_like.planner.layout import Layout

    layout = Layout(dp_replicate=2, dp_shard=1, cp=2, tp=1, pp=1, local_batch_size=1, microbatch_size=1)
    cfg = load_config([*DEBUG_ARGV, *layout.overrides()])
    pd = ParallelDims.from_config(cfg.parallelism, 4)
    assert pd.fsdp_enabled and pd.dp_replicate_enabled  # the trainer runs HSDP here
    text = layout.describe()
    assert "ddp" not in text and "hsdp2" in text, text


def test_json_into_a_new_folder_is_written_or_refused_cleanly(tmp_path: Path, capsys) -> None:
    out = tmp_path / "plans" / "ranked.json"
    rc, stdout, err = run_plan(capsys, "--model", "llama3:debugmodel", "--ngpu", "1", "--seq-len", "256",
                               "--global-batch", "2", "--no-verify", "--json", str(out))
    if rc == 2:
        assert len(error_lines(err)) == 1, err
    else:
        assert rc == 0, err
        assert json.loads(out.read_text())


@pytest.mark.parametrize("args, message", [
    # The ranked JSON was written before these refusals, which left it behind (an empty list when nothing was valid).
    (("--ngpu", "2", "--global-batch", "4", "--explain", "9999"), "error: --explain 9999: the table has rows 1.."),
    (("--ngpu", "3", "--global-batch", "4", "--allow", "fsdp,hsdp,ddp,tp,cp,ac"),
     "error: no layout of 3 GPUs passes the trainer's checks"),
    # Now refused before planning, like --top 0.
    (("--ngpu", "2", "--global-batch", "4", "--explain", "0"), "error: --explain 0 must be >= 1"),
], ids=["explain-past-the-table", "no-valid-layout", "explain-0"])
def test_a_refused_plan_writes_neither_json_nor_toml(tmp_path: Path, capsys, args: tuple[str, ...],
                                                     message: str) -> None:
    out, ranked = tmp_path / "plan.toml", tmp_path / "plan.json"
    rc, _, err = run_plan(capsys, "--model", "llama3:debugmodel", "--seq-len", "256", "--no-verify",
                          "--out", str(out), "--json", str(ranked), *args)
    assert rc == 2 and len(error_lines(err)) == 1 and error_lines(err)[0].startswith(message), err
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_a_plan_whose_dry_run_fails_writes_neither_json_nor_toml(tmp_path: Path, monkeypatch, capsys) -> None:
    # The winner's TOML was written, then dry-run: a refusal there left it behind, and the JSON with it.
    import torchtitan_like.dry_run as dr
    from torchtitan_like.errors import ConfigError

    out, ranked = tmp_path / "plan.toml", tmp_path / "plan.json"

    def refused(argv, **kwargs):
        assert Path(argv[-1]).is_file()  # (the winner's TOML, to dry-run)
        raise ConfigError("the dry run refuses this layout")

    monkeypatch.setattr(dr, "dry_run", refused)
    rc, _, err = run_plan(capsys, "--model", "llama3:debugmodel", "--seq-len", "256", "--ngpu", "2",
                          "--global-batch", "4", "--hardware", "H100", "--out", str(out), "--json", str(ranked))
    assert rc == 2 and error_lines(err) == ["error: the dry run refuses this layout"], err
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_the_config_example_in_plan_py_docstring_runs(capsys) -> None:
    cli = plan_cli()
    examples = [ln.strip() for ln in cli.__doc__.splitlines() if ln.strip().startswith("tools/plan.py --config")]
    assert examples, cli.__doc__
    args = shlex.split(examples[0])[1:]
    cwd = os.getcwd()
    os.chdir(ROOT)  # the example's path is relative to the repository root
    try:
        rc = cli.main([*args, "--no-verify"])
    finally:
        os.chdir(cwd)
    captured = capsys.readouterr()
    assert rc == 0, captured.err


def test_a_cpu_profile_prices_auto_precision_as_the_cpu_trainer_runs_it() -> None:
    from torchtitan_like.planner.hardware import load_profile
    from torchtitan_like.planner.layout import Layout, PlanInputs
    from torchtitan_like.planner.plan import predict_layout
    from torchtitan_like.config.schema import Training
    from torchtitan_like.distributed.utils import param_dtype
    import torch

    hw = load_profile(str(ROOT / "benchmarks" / "profiles" / "cpu_ci_2core.json"))
    assert hw.device == "cpu" and param_dtype(Training(), "cpu") == torch.float32
    layout = Layout(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, local_batch_size=2, microbatch_size=2)

    def memory(extra: tuple[str, ...]):
        inputs = PlanInputs(base_argv=DEBUG_ARGV + extra, world_size=1, hardware=hw, seq_len=256, global_batch_size=2,
                            compile=False)
        return predict_layout(inputs, layout).memory

    auto, fp32 = memory(()), memory(("--training.mixed_precision_param", "float32"))
    assert auto.activations == fp32.activations and auto.total == fp32.total, (auto.items(), fp32.items())


# ---- docs -----------------------------------------------------------------------------------------


def test_every_train_config_the_docs_name_exists() -> None:
    named: dict[str, list[str]] = {}
    for doc in ("README.md", "docs/planner.md", "run_train.sh", "tools/slurm_train.sbatch", "tools/plan.py",
                "torchtitan_like/dry_run.py"):
        for name in re.findall(r"train_configs/[\w.-]+\.toml", (ROOT / doc).read_text()):
            named.setdefault(name, []).append(doc)
    assert "train_configs/debug_model.toml" in named  # the scan finds the one that exists
    missing = {name: docs for name, docs in named.items() if not (ROOT / name).is_file()}
    assert missing == {}


CONFIG_WORLD_SIZES = {"llama3_8b.toml": 8, "llama3_70b.toml": 64, "llama3_405b.toml": 512}


def test_every_shipped_config_has_a_world_size_here() -> None:
    shipped = {p.name for p in (ROOT / "train_configs").glob("*.toml")} - {"debug_model.toml"}
    assert shipped == set(CONFIG_WORLD_SIZES)


@pytest.mark.parametrize("name", sorted(CONFIG_WORLD_SIZES))
def test_shipped_config_passes_the_dry_run_at_its_world_size(name: str, tmp_path: Path) -> None:
    """The command in each config's header: every check and model pass at the planned world size."""
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "DRY_RUN_RANK", "DRY_RUN_JSON", "LOG_RANK")}
    env.update(PYTHON=sys.executable, COMM_MODE="fake_backend", NGPU=str(CONFIG_WORLD_SIZES[name]),
               DRY_RUN_SKIP_FILES="1", CONFIG_FILE=str(ROOT / "train_configs" / name))
    r = subprocess.run([str(ROOT / "run_train.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"rank 0 of {CONFIG_WORLD_SIZES[name]} " in r.stdout + r.stderr


# ---- run_train.sh, train.py, slurm --------------------------------------------------------------


def test_run_train_reads_a_config_file_relative_to_the_callers_directory(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(f'extends = "{ROOT / "train_configs" / "debug_model.toml"}"\n'
                                       "[training]\nsteps = 3\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("NNODES", "DRY_RUN_RANK", "DRY_RUN_JSON", "RDZV_ENDPOINT", "MASTER_ADDR", "LOG_RANK")}
    env.update(PYTHON=sys.executable, COMM_MODE="fake_backend", NGPU="1", DRY_RUN_DEVICE="cpu", DRY_RUN_SKIP_FILES="1",
               CONFIG_FILE="job.toml")
    r = subprocess.run([str(ROOT / "run_train.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "dry run OK" in r.stdout + r.stderr


def test_slurm_script_passes_cpus_per_task_to_srun(tmp_path: Path) -> None:
    fake_bin, repo = tmp_path / "bin", tmp_path / "repo"
    fake_bin.mkdir()
    repo.mkdir()
    log = tmp_path / "srun.log"
    scripts = {
        fake_bin / "scontrol": '#!/bin/bash\nif [[ $1 == show ]]; then printf "node1\\nnode2\\n"; fi\n',
        fake_bin / "srun": (
            f'#!/bin/bash\necho "ARGS=$*" > {log}\necho "SRUN_CPUS_PER_TASK=${{SRUN_CPUS_PER_TASK:-}}" >> {log}\n'
            'while [[ $1 == -* ]]; do if [[ $1 == -c || $1 == --cpus-per-task ]]; then shift; fi; shift; done\n'
            'SLURM_NODEID=0 exec "$@"\n'
        ),
        repo / "run_train.sh": "#!/bin/bash\nexit 0\n",
    }
    for path, text in scripts.items():
        path.write_text(text)
        path.chmod(0o755)
    env = {
        "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path), "REPO": str(repo),
        "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_ID": "4242",
        "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "32",  # what sbatch sets from #SBATCH --cpus-per-task=32
    }
    r = subprocess.run(["bash", str(ROOT / "tools" / "slurm_train.sbatch")], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    text = log.read_text()
    args = text.splitlines()[0]
    assert (re.search(r"(--cpus-per-task[= ]|-c )32\b", args) or "SRUN_CPUS_PER_TASK=32" in text), text


def test_a_user_error_is_recorded_for_the_launcher(tmp_path: Path, monkeypatch, capsys) -> None:
    from torchtitan_like import train

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert train.main(["--training.stpes", "5"]) == 2
    assert "unknown key 'training.stpes'" in capsys.readouterr().err
    assert error_file.is_file()
    assert "training.stpes" in error_file.read_text()


@pytest.mark.parametrize("args, message", [
    (("--top", "0"), "--top 0 must be >= 1"),
    (("--allow", ""), "--allow '' names no feature"),
    (("--ngpu", "12"), "--ngpu 12 is not a whole number of nodes of 8 GPUs"),
    (("--ngpu", "12", "--gpus-per-node", "0"), "--gpus-per-node 0 must be >= 1"),
    # (It planned bf16 layouts only, without a word.)
    (("--precision", "fp8", "--allow", "fsdp,tp"), "--precision fp8 with --allow fsdp,tp: add float8 to --allow"),
    (("--global-batch", None), "--global-batch N is needed: --model llama3:debugmodel comes with no batch"),
])
def test_plan_cli_refuses_bad_arguments_in_one_line(capsys, args: tuple[str, ...], message: str) -> None:
    argv = ["--model", "llama3:debugmodel", "--ngpu", "2", "--global-batch", "8", "--no-verify", *args]
    if args[1] is None:  # (("--flag", None): the base's flag left out)
        k = argv.index(args[0])
        argv = argv[:k] + argv[k + 2:-2]
    rc, _, err = run_plan(capsys, *argv)
    assert rc == 2 and len(error_lines(err)) == 1 and message in error_lines(err)[0], err


def test_run_train_refuses_a_log_rank_that_is_not_rank_numbers(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "LOG_RANK": "all", "NGPU": "1"}
    r = subprocess.run([str(ROOT / "run_train.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: LOG_RANK=all must be local rank numbers, comma-separated (e.g. 0 or 0,1)"
    ), r.stderr


def test_the_plan_follows_the_configs_compile_setting_unless_told(tmp_path: Path, capsys) -> None:
    eager = tmp_path / "eager.toml"
    eager.write_text((ROOT / "train_configs/llama3_8b.toml").read_text().replace(
        "[compile]\nenable = true", "[compile]\nenable = false"))
    assert "enable = false" in eager.read_text()
    common = ["--ngpu", "8", "--global-batch", "64", "--no-verify", "--top", "1"]
    runs = {
        "config eager": ["--config", str(eager)],
        "config compiled": ["--config", str(ROOT / "train_configs/llama3_8b.toml")],
        "forced": ["--config", str(eager), "--compile"],
        "model": ["--model", "llama3:8B", "--seq-len", "8192"],
    }
    headers = {}
    for name, args in runs.items():
        rc, out, err = run_plan(capsys, *args, *common)
        assert rc == 0, (name, err)
        headers[name] = out.splitlines()[0]
    assert ", eager," in headers["config eager"], headers
    assert all(", compiled," in headers[n] for n in ("config compiled", "forced", "model")), headers
