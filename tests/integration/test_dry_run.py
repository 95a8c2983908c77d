"""The dry run (COMM_MODE=fake_backend ./run_train.sh, torchtitan_like.dry_run): one process stands in
for one rank of a job of any size, reports that rank's state bytes exactly, and fails a bad config the
way the real run does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEBUG_CONFIG = "train_configs/debug_model.toml"

# The 405B job of torchtitan's published runs: 512 GPUs as PP 8 x FSDP 8 x TP 8.
ARGS_405B = [
    "--model.flavor", "405B", "--training.seq_len", "8192", "--training.dataset", "synthetic",
    "--parallelism.tensor_parallel_degree", "8", "--parallelism.pipeline_parallel_degree", "8",
    "--training.local_batch_size", "16", "--activation_checkpoint.mode", "full",
]


def run_train(*args: str, env: dict[str, str], timeout: int = 60) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ, PYTHON=sys.executable, CONFIG_FILE=DEBUG_CONFIG, **env)
    for key in ("COMM_MODE", "NNODES", "DRY_RUN_RANK", "DRY_RUN_DEVICE", "DRY_RUN_JSON"):
        if key not in env:
            full_env.pop(key, None)
    return subprocess.run([str(ROOT / "run_train.sh"), *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def dry_405b(tmp_path: Path, rank: int) -> dict:
    report = tmp_path / f"rank{rank}.json"
    r = run_train(*ARGS_405B, env={"COMM_MODE": "fake_backend", "NGPU": "512", "DRY_RUN_RANK": str(rank),
                                   "DRY_RUN_JSON": str(report)}, timeout=60)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "dry run OK" in r.stdout, r.stdout[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    return json.loads(report.read_text())


def test_405b_on_512_ranks_reports_the_planners_state_bytes(tmp_path: Path) -> None:
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.planner.state import predicted_state_bytes, rank_coords
    from torchtitan_like.trainer import check_job

    cfg = load_config(["--job.config_file", str(ROOT / DEBUG_CONFIG), *ARGS_405B])
    checked = check_job(cfg, 512)
    plan = checked.pp_plan
    assert plan is not None

    stages = {}
    for rank in (0, 511):
        report = dry_405b(tmp_path, rank)
        assert report["world_size"] == 512 and report["rank"] == rank
        assert report["layout"] == {"dp_replicate": 1, "dp_shard": 8, "cp": 1, "tp": 8, "pp": 8}
        degrees = {k: report["layout"][k] for k in ("pp", "dp_replicate", "dp_shard", "cp", "tp")}
        coords = rank_coords(rank, degrees)
        # Rank 511 is the last of every mesh dim: pipeline rank 7, shard 7, TP rank 7.
        assert report["coords"] == {k: coords[k] for k in ("pp", "dp_shard", "tp")}
        assert report["stages"] == plan.stage_ids(coords["pp"])
        stage_fqns = [plan.fqns_per_stage[s] for s in plan.stage_ids(coords["pp"])]
        predicted = predicted_state_bytes(checked.model_args, degrees, rank=rank, stage_fqns=stage_fqns)
        assert report["state_bytes"]["params"] == predicted.params, rank
        assert report["state_bytes"] == predicted.as_dict(), rank
        assert predicted.params > 0
        stages[rank] = report["stages"]
    assert report["coords"] == {"pp": 7, "dp_shard": 7, "tp": 7}
    # The first and the last pipeline rank run different stages.
    assert stages[0] != stages[511] and not set(stages[0]) & set(stages[511])


def _error_line(output: str) -> str:
    """The one `error:` line of a run, without torchrun's `[rankN]:` prefix."""
    errors = [re.sub(r"^\[rank\d+\]:", "", line) for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1, output[-3000:]
    return errors[0]


def test_a_config_error_fails_the_same_way_in_the_dry_run_and_the_real_run(tmp_path: Path) -> None:
    # seq_len 102 is not a multiple of tp x 2 = 4: the sequence-parallel check, which needs the world
    # to be right (2 ranks for tp 2) to be reached.
    args = ["--training.seq_len", "102", "--parallelism.tensor_parallel_degree", "2",
            "--job.dump_folder", str(tmp_path / "out")]
    dry = run_train(*args, env={"COMM_MODE": "fake_backend", "NGPU": "2"}, timeout=60)
    real = run_train(*args, env={"NGPU": "2"}, timeout=60)
    for name, r in (("dry", dry), ("real", real)):
        assert r.returncode == 2, f"{name}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        assert "Traceback" not in r.stdout + r.stderr, name
    dry_error, real_error = _error_line(dry.stderr), _error_line(real.stderr)
    assert dry_error.startswith("error: training.seq_len=102 must be divisible by tensor_parallel_degree(2)"), dry_error
    assert dry_error == real_error
    assert "dry run OK" not in dry.stdout
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # the real run stopped before training


def test_an_unknown_comm_mode_is_refused(tmp_path: Path) -> None:
    r = run_train("--job.dump_folder", str(tmp_path / "out"), env={"COMM_MODE": "bogus", "NGPU": "1"}, timeout=60)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stderr.startswith("error: COMM_MODE=bogus is not a mode"), r.stderr
    assert "fake_backend" in r.stderr
    assert not (tmp_path / "out").exists()  # neither a real run nor a dry run started


FSDP_ARGV = ["--job.config_file", str(ROOT / DEBUG_CONFIG), "--training.dataset", "synthetic"]


@pytest.mark.parametrize("world", [4, 3])
def test_fsdp_shards_of_every_rank_add_up_to_the_model(world: int) -> None:
    import torch.distributed as dist

    from torchtitan_like.dry_run import dry_run
    from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS

    # 6 layers x 786_944 + embedding and output 2 x 2000 x 256 + final norm 256 (tests/unit/test_planner.py).
    n_params = 5_745_920
    assert LLAMA3_FLAVORS["debugmodel"].num_params() == n_params
    argv = [*FSDP_ARGV, "--parallelism.data_parallel_shard_degree", str(world)]
    reports = []
    for rank in range(world):
        report = dry_run(argv, world_size=world, rank=rank, device="cpu")
        assert not dist.is_initialized(), f"rank {rank}: the dry run left a process group behind"
        assert report["rank"] == rank and report["layout"]["dp_shard"] == world
        assert report["coords"] == {"dp_shard": rank}
        reports.append(report["state_bytes"])
    # FSDP shards partition every tensor: the local elements add up to the model, and every rank holds
    # a shard of each of the 57 tensors.
    assert sum(s["n_elements"] for s in reports) == n_params
    assert all(s["n_tensors"] == 57 for s in reports)
    assert sum(s["params"] for s in reports) == 4 * n_params  # fp32
    if world == 3:
        # Uneven chunks (2000 -> 667, 667, 666): the last rank holds less than the first.
        assert reports[0]["n_elements"] > reports[2]["n_elements"]


def test_async_tp_registers_the_tp_group_for_symmetric_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch (2.11-2.13) marks enable_symm_mem_for_group deprecated, but inductor's micro-pipeline TP pass
    still skips a group unless that call registered it: async TP must make it, without the warning."""
    import warnings

    import torch._inductor.config as inductor_config
    import torch.distributed._symmetric_memory as symm_mem

    from torchtitan_like.dry_run import dry_run

    # Both are process-wide: keep them from reaching the tests that run after this one. (The inductor
    # setting through its own patch(): on torch 2.11 monkeypatch's undo deletes, i.e. hides, the key.)
    monkeypatch.setattr(symm_mem, "_group_name_to_store", {})
    argv = [*FSDP_ARGV, "--parallelism.tensor_parallel_degree", "2", "--compile.enable",
            "--parallelism.enable_async_tensor_parallel"]
    with inductor_config.patch(_micro_pipeline_tp=False), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        dry_run(argv, world_size=4, rank=0, device="cuda")
        assert inductor_config._micro_pipeline_tp is True
    assert len(symm_mem._group_name_to_store) == 1  # the TP group, and only it
    assert inductor_config._micro_pipeline_tp is False


def test_a_failing_dry_run_leaves_no_process_group() -> None:
    import torch.distributed as dist

    from torchtitan_like.dry_run import dry_run
    from torchtitan_like.errors import ConfigError, TrainerError

    with pytest.raises(ConfigError, match=r"parallelism\.tensor_parallel_degree=3 must divide"):
        dry_run([*FSDP_ARGV, "--parallelism.tensor_parallel_degree", "3"], world_size=3, rank=0, device="cpu")
    assert not dist.is_initialized()
    with pytest.raises(TrainerError, match="--rank 4 must be in 0..3"):
        dry_run(FSDP_ARGV, world_size=4, rank=4, device="cpu")
    assert not dist.is_initialized()


def test_the_dry_run_checks_the_files_the_job_opens_first(tmp_path: Path) -> None:
    from torchtitan_like.components.manifest import CheckpointError
    from torchtitan_like.dry_run import dry_run
    from torchtitan_like.errors import DataError

    base = ["--job.config_file", str(ROOT / DEBUG_CONFIG)]
    missing = str(tmp_path / "nowhere")
    cases = [
        (["--model.tokenizer_path", missing], DataError, r"model\.tokenizer_path: tokenizer file .*nowhere.* not found"),
        (["--training.dataset", "local", "--training.dataset_path", missing], DataError,
         r"training\.dataset_path=.*nowhere.*: no such file or directory"),
        (["--validation.enable", "--validation.seq_len", "64", "--validation.dataset", "local",
          "--validation.dataset_path", missing], DataError,
         r"validation\.dataset_path=.*nowhere.*: no such file or directory"),
        (["--checkpoint.initial_load_path", missing], CheckpointError,
         r"checkpoint\.initial_load_path=.*nowhere is not a DCP checkpoint"),
        (["--checkpoint.enable", "--checkpoint.initial_load_path", missing, "--checkpoint.initial_load_in_hf"],
         CheckpointError, r"nowhere does not exist \(expected a Hugging Face folder"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            dry_run([*base, *args], world_size=2, rank=1, device="cpu")
        # A planning machine without the cluster's files skips them, and says so in the report.
        report = dry_run([*base, *args], world_size=2, rank=1, device="cpu", files=False)
        assert report["files_checked"] is False

    # An HF checkpoint whose config.json describes another model is refused before anything is built.
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(b"")  # only its presence is checked: no weights are read
    (hf / "config.json").write_text(json.dumps({"hidden_size": 4096, "num_hidden_layers": 32}))
    with pytest.raises(CheckpointError, match="hidden_size"):
        dry_run([*base, "--checkpoint.enable", "--checkpoint.initial_load_path", str(hf),
                 "--checkpoint.initial_load_in_hf"], world_size=1, rank=0, device="cpu")
    assert dry_run(base, world_size=2, rank=0, device="cpu")["files_checked"] is True

    # A job whose own folder holds checkpoints resumes from them and never reads initial_load_path.
    dump = tmp_path / "resuming"
    (dump / "checkpoint" / "step-10").mkdir(parents=True)
    dry_run([*base, "--job.dump_folder", str(dump), "--checkpoint.enable", "--checkpoint.initial_load_path", missing],
            world_size=1, rank=0, device="cpu")


def test_skip_files_through_run_train(tmp_path: Path) -> None:
    args = ["--model.tokenizer_path", str(tmp_path / "missing.model"), "--job.dump_folder", str(tmp_path / "out")]
    checked = run_train(*args, env={"COMM_MODE": "fake_backend", "NGPU": "2", "DRY_RUN_DEVICE": "cpu"})
    assert checked.returncode == 2, checked.stdout[-3000:] + checked.stderr[-3000:]
    assert _error_line(checked.stderr).startswith("error: model.tokenizer_path: tokenizer file"), checked.stderr
    skipped = run_train(*args, env={"COMM_MODE": "fake_backend", "NGPU": "2", "DRY_RUN_DEVICE": "cpu",
                                    "DRY_RUN_SKIP_FILES": "1"})
    assert skipped.returncode == 0, skipped.stdout[-3000:] + skipped.stderr[-3000:]
    # the log names the variable the user set through run_train.sh, not only the module's flag
    assert "files not checked (DRY_RUN_SKIP_FILES=1 / --skip-files)" in skipped.stdout


def test_a_load_only_run_with_nothing_to_load_fails_the_dry_run_as_it_fails_the_real_run(tmp_path: Path) -> None:
    # checkpoint.load_only evaluates a run's checkpoint: where the folder holds none and initial_load_path is
    # unset, the real run stops at start ("nothing to load"); the dry run, which looks at the same folder to
    # decide whether initial_load_path is read, said OK.
    from torchtitan_like.dry_run import dry_run
    from torchtitan_like.errors import ConfigError

    dump = tmp_path / "run"
    args = ["--job.dump_folder", str(dump), "--checkpoint.enable", "--checkpoint.load_only",
            "--training.dataset", "synthetic", "--training.local_batch_size", "2", "--training.seq_len", "64"]
    message = r"checkpoint\.load_only=true, but there is nothing to load: .*run/checkpoint holds no complete checkpoint"
    _fails_as_the_real_run_unless_files_are_skipped(args, ConfigError, message)
    # With a checkpoint (or an initial_load_path) to load, it passes.
    (dump / "checkpoint" / "step-10").mkdir(parents=True)
    dry_run(["--job.config_file", str(ROOT / DEBUG_CONFIG), *args], world_size=1, device="cpu")


def _fails_as_the_real_run_unless_files_are_skipped(args: list[str], error: type[Exception], message: str) -> None:
    """The dry run of `args` raises `error` matching `message`, the real run (one process) exits 2 with it, and the
    dry run with its file checks skipped (DRY_RUN_SKIP_FILES) passes."""
    from torchtitan_like.dry_run import dry_run

    argv = ["--job.config_file", str(ROOT / DEBUG_CONFIG), *args]
    with pytest.raises(error, match=message):
        dry_run(argv, world_size=1, device="cpu")
    r = run_train(*args, env={"NGPU": "1"}, timeout=120)  # the real run, for its message
    assert r.returncode == 2 and re.search(message, r.stderr), r.stderr[-3000:]
    dry_run(argv, world_size=1, device="cpu", files=False)


def test_a_load_step_that_is_not_there_fails_the_dry_run_as_it_fails_the_real_run(tmp_path: Path) -> None:
    # checkpoint.load_step=K goes back to step-K of the run's folder: without it the real run stops at start;
    # the dry run said OK.
    from torchtitan_like.components.manifest import CheckpointError
    from torchtitan_like.dry_run import dry_run

    dump = tmp_path / "run"
    args = ["--job.dump_folder", str(dump), "--checkpoint.enable", "--checkpoint.load_step", "5",
            "--training.dataset", "synthetic", "--training.local_batch_size", "2", "--training.seq_len", "64"]
    message = (r"checkpoint\.load_step=5: .*run/checkpoint/step-5 does not exist \(complete checkpoints: none\); "
               r"use load_step=-1 for the latest")
    _fails_as_the_real_run_unless_files_are_skipped(args, CheckpointError, message)
    # A restart of the command after step-5 was purged resumes the checkpoint its run saved, branched from 5.
    (dump / "checkpoint" / "step-7").mkdir(parents=True)
    (dump / "checkpoint" / "step-7" / "manifest.json").write_text(json.dumps({"step": 7, "files": {}, "branch": 5}))
    dry_run(["--job.config_file", str(ROOT / DEBUG_CONFIG), *args], world_size=1, device="cpu")
    (dump / "checkpoint" / "step-7" / "manifest.json").unlink()
    (dump / "checkpoint" / "step-5").mkdir(parents=True)
    dry_run(["--job.config_file", str(ROOT / DEBUG_CONFIG), *args], world_size=1, device="cpu")
