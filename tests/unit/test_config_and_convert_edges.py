"""Edges of the config system, the dry run and tools/checkpoint.py: torchtitan's [float8] pointed to
ours, seeds torch cannot take, non-UTF-8 paths, config rules the dry run must apply as the real run does,
and a convert that never damages its source nor leaves a half-written output. CPU only, seconds each."""

from __future__ import annotations

import errno
import importlib.util
from pathlib import Path

import pytest
import torch

from torchtitan_like.config.loader import load_config
from torchtitan_like.errors import ConfigError, TrainerError

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "checkpoint.py"
DEBUG_CONFIG = REPO / "train_configs" / "debug_model.toml"


def _config_error(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    return str(info.value)


def _tool_main():
    spec = importlib.util.spec_from_file_location("review_config_tools_checkpoint_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture
def tiny_dcp(tmp_path: Path) -> Path:
    """A verified DCP step folder written by the tool itself from a tiny (non-llama) state dict."""
    src = tmp_path / "tiny.pt"
    torch.save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}, src)
    step = tmp_path / "step-3"
    assert _tool_main()(["convert", str(src), str(step), "--step", "3"]) == 0
    return step


# ---------------------------------------------------------------------------------------------
# config: loader and validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["cli", "toml"])
def test_torchtitans_float8_section_points_to_quantize_linear_float8(where: str, tmp_path: Path) -> None:
    if where == "cli":
        argv = ["--float8.enable_fsdp_float8_all_gather"]
    else:
        path = tmp_path / "job.toml"
        path.write_text("[float8]\nenable_fsdp_float8_all_gather = true\n", encoding="utf-8")
        argv = ["--job.config_file", str(path)]
    msg = _config_error(argv)  # (once: "unknown section 'float8'" and nothing else)
    assert "quantize.linear.float8" in msg, msg  # the closest valid name, as README promises


def test_a_seed_torch_cannot_take_is_a_config_error() -> None:
    with pytest.raises((ValueError, RuntimeError)):
        torch.manual_seed(2**64)  # what Trainer._setup_determinism does with it, after validation
    msg = _config_error(["--debug.seed", str(2**64)])
    assert "debug.seed" in msg


def test_a_path_that_is_not_utf8_is_refused() -> None:
    path = "/data/caf\udce9"  # how Python decodes a Latin-1 'café' in sys.argv on Linux (surrogateescape)
    # (Accepted, it crashed start-up: Trainer._fingerprint hashes to_toml(cfg).encode(), config.toml is UTF-8.)
    msg = _config_error(["--training.dataset", "local", "--training.dataset_path", path])
    assert msg == "--training.dataset_path='/data/caf\\udce9' is not valid UTF-8 (rename the file or folder)", msg


# ---------------------------------------------------------------------------------------------
# dry run
# ---------------------------------------------------------------------------------------------


def test_the_dry_run_refuses_an_initial_load_that_excludes_the_model(tiny_dcp: Path, tmp_path: Path) -> None:
    from torch import nn

    from torchtitan_like.components.checkpoint import CheckpointManager, TrainState
    from torchtitan_like.config.schema import Checkpoint
    from torchtitan_like.dry_run import dry_run

    # The real run: the checkpoint manager Trainer.__init__ builds refuses it.
    model = nn.Linear(3, 2)
    with pytest.raises(TrainerError, match="exclude_from_loading"):
        mgr = CheckpointManager(
            Checkpoint(initial_load_path=str(tiny_dcp), exclude_from_loading=["model"]),
            dump_folder=str(tmp_path / "real"), model_parts=[model],
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1), lr_scheduler=None, dataloader=None,
            train_state=TrainState(), fingerprint={"config_hash": "", "layout": {}, "world_size": 1},
        )
        try:
            mgr.load()
        finally:
            mgr.close()

    # The dry run of the same config must fail the same way (it is a config-only rule).
    argv = ["--job.config_file", str(DEBUG_CONFIG), "--job.dump_folder", str(tmp_path / "run"),
            "--training.dataset", "synthetic", "--checkpoint.initial_load_path", str(tiny_dcp),
            "--checkpoint.exclude_from_loading", "model"]
    with pytest.raises(TrainerError, match="exclude_from_loading"):
        dry_run(argv, world_size=1, rank=0, device="cpu")


# ---------------------------------------------------------------------------------------------
# tools/checkpoint.py
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["garbage", "tensor"])
def test_a_bad_pt_source_is_one_error_line_and_exit_2(content: str, tmp_path: Path, capsys) -> None:
    src = tmp_path / "weights.pt"
    if content == "garbage":
        src.write_bytes(b"not a pickle at all")  # e.g. a truncated download
    else:
        torch.save(torch.zeros(3), src)  # a tensor, not a state dict
    try:
        rc = _tool_main()(["convert", str(src), str(tmp_path / "out")])
    except Exception as e:  # (once: UnpicklingError / AttributeError out of main())
        pytest.fail(f"traceback instead of exit 2: {type(e).__name__}: {e}")
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "weights.pt" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["model.pt", "model.safetensors", "hf"])
def test_convert_refuses_a_destination_inside_the_source_checkpoint(tiny_dcp: Path, name: str) -> None:
    from torchtitan_like.components.manifest import verify

    verify(tiny_dcp)
    rc = _tool_main()(["convert", str(tiny_dcp), str(tiny_dcp / name)])
    verify(tiny_dcp)  # (once: "... is not listed in manifest.json (a foreign or leftover file)")
    assert rc == 2


def _failing_writer(real_target_of):
    def write(*args, **kwargs):
        target = real_target_of(args, kwargs)
        if isinstance(target, (str, Path)):
            with open(target, "wb") as f:
                f.write(b"partial")
        else:
            target.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


@pytest.mark.parametrize("name", ["out.pt", "out.safetensors", "hf_out"])
def test_a_failed_convert_leaves_nothing_at_the_destination(
    tiny_dcp: Path, tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    monkeypatch.setattr(torch, "save", _failing_writer(lambda a, k: a[1] if len(a) > 1 else k["f"]))
    monkeypatch.setattr(safetensors.torch, "save_file",
                        _failing_writer(lambda a, k: a[1] if len(a) > 1 else k["filename"]))
    dst = tmp_path / name
    try:
        _tool_main()(["convert", str(tiny_dcp), str(dst)])
    except OSError:
        pass  # the error itself may surface either way; what it leaves behind is the point
    assert not dst.exists() or (dst.is_dir() and not any(dst.iterdir())), sorted(p.name for p in tmp_path.rglob("*"))


def test_settings_the_job_does_not_use_are_named() -> None:
    from torchtitan_like.config.validate import ignored_settings

    base = ["--job.config_file", str(DEBUG_CONFIG)]
    assert ignored_settings(load_config(base), pp=1) == []
    cfg = load_config([*base, "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
                       "--quantize.linear.float8.recipe_name", "rowwise"])
    assert ignored_settings(cfg, pp=1) == [
        "parallelism.pipeline_parallel_schedule (pipeline_parallel_degree=1)",
        "quantize.linear.float8.recipe_name (no float8 in model.converters)",
    ]
    assert ignored_settings(cfg, pp=2) == ["quantize.linear.float8.recipe_name (no float8 in model.converters)"]
    with_float8 = load_config([*base, "--model.converters", "float8", "--quantize.linear.float8.recipe_name", "rowwise"])
    assert ignored_settings(with_float8, pp=1) == []


def test_pipeline_keys_another_pipeline_key_overrides_are_named(tmp_path) -> None:
    """With pipeline parallel on, an explicit split never reads the *_less_layers weights, and a CSV schedule
    replaces pipeline_parallel_schedule: set beside them, those keys did nothing, without a word."""
    from torchtitan_like.config.validate import ignored_settings

    base = ["--job.config_file", str(DEBUG_CONFIG), "--parallelism.pipeline_parallel_degree", "2"]
    split = load_config([*base,
                         "--parallelism.module_fqns_per_model_part", "tok_embeddings,layers.0;layers.1,norm,output",
                         "--parallelism.pipeline_parallel_first_stage_less_layers", "0",
                         "--parallelism.pipeline_parallel_last_stage_less_layers", "2"])
    assert ignored_settings(split, pp=2) == [
        "parallelism.pipeline_parallel_first_stage_less_layers (module_fqns_per_model_part gives the split)",
        "parallelism.pipeline_parallel_last_stage_less_layers (module_fqns_per_model_part gives the split)",
    ]
    csv = tmp_path / "gpipe.csv"
    csv.write_text("0F0,0F1,0B0,0B1\n1F0,1F1,1B0,1B1\n")
    scheduled = load_config([*base, "--parallelism.pipeline_parallel_schedule_csv", str(csv),
                             "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B"])
    assert ignored_settings(scheduled, pp=2) == [
        "parallelism.pipeline_parallel_schedule (pipeline_parallel_schedule_csv gives the schedule)"
    ]
    # Each read where nothing overrides it (the *_less_layers weigh the split that layers_per_stage sizes too).
    used = load_config([*base, "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
                        "--parallelism.pipeline_parallel_layers_per_stage", "2",
                        "--parallelism.pipeline_parallel_first_stage_less_layers", "0"])
    assert ignored_settings(used, pp=2) == []


def test_keys_of_a_switched_off_section_are_named() -> None:
    """A base config's [validation] or [compile] settings with the section's switch off do nothing: the
    start-up warning names them, with the switch (and a key the switch does not govern is not named)."""
    from torchtitan_like.config.validate import ignored_settings

    base = ["--job.config_file", str(DEBUG_CONFIG)]
    cfg = load_config([*base, "--validation.freq", "5", "--compile.backend", "aot_eager",
                       "--activation_checkpoint.mode", "full", "--activation_checkpoint.selective_ac_option", "op",
                       "--profiling.profile_freq", "3", "--metrics.no_enable_tensorboard",
                       "--metrics.save_tb_folder", "tb2"])
    assert ignored_settings(cfg, pp=1) == [
        'compile.backend (compile.enable=false)',
        'validation.freq (validation.enable=false)',
        'metrics.save_tb_folder (metrics.enable_tensorboard=false)',
        'profiling.profile_freq (profiling.enable_profiling=false)',
        'activation_checkpoint.selective_ac_option (activation_checkpoint.mode="full")',
    ]
    switched_on = load_config([*base, "--validation.enable", "--validation.freq", "5", "--validation.seq_len", "256",
                               "--compile.enable",
                               "--compile.backend", "aot_eager", "--profiling.enable_memory_snapshot",
                               "--profiling.profile_freq", "3"])
    assert ignored_settings(switched_on, pp=1) == []


def test_keys_of_parallelisms_the_layout_does_not_use_are_named() -> None:
    from torchtitan_like.config.schema import Parallelism
    from torchtitan_like.config.validate import ignored_settings
    from torchtitan_like.distributed.parallel_dims import ParallelDims

    base = ["--job.config_file", str(DEBUG_CONFIG), "--parallelism.disable_loss_parallel",
            "--parallelism.context_parallel_rotate_method", "alltoall",
            "--parallelism.fsdp_reshard_after_forward", "never", "--training.mixed_precision_reduce", "bfloat16"]
    cfg = load_config(base)
    one = ParallelDims.from_config(Parallelism(), 1)
    assert ignored_settings(cfg, pp=1, dims=one) == [
        "parallelism.disable_loss_parallel (tensor_parallel_degree=1)",
        "parallelism.context_parallel_rotate_method (context_parallel_degree=1)",
        "parallelism.fsdp_reshard_after_forward (no FSDP: parameters are not sharded)",
        "training.mixed_precision_reduce (no FSDP or DDP gradient reduction)",
    ]
    all_used = ParallelDims.from_config(Parallelism(tensor_parallel_degree=2, context_parallel_degree=2), 8)
    assert ignored_settings(cfg, pp=1, dims=all_used) == []
    ddp = ParallelDims.from_config(Parallelism(data_parallel_replicate_degree=2, data_parallel_shard_degree=1), 2)
    assert "training.mixed_precision_reduce" not in " ".join(ignored_settings(cfg, pp=1, dims=ddp))
