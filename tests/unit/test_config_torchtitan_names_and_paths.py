"""Config messages and paths: torchtitan's former key names point to ours (a fuzzy match sent them to
the wrong key), a key above every [section] names its section, [[x]] is called an array of tables, no
"did you mean" for a dotted name nothing resembles, an empty job.dump_folder is refused, and a leading
~ in a path key or an `extends` is the home folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from torchtitan_like.config import loader
from torchtitan_like.config.loader import load_config
from torchtitan_like.errors import ConfigError


def _error(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    return str(info.value)


def _toml_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "job.toml"
    path.write_text(text, encoding="utf-8")
    return _error(["--job.config_file", str(path)])


# --- 1. torchtitan's former key names get a harmful / unrelated "did you mean" -----------------------
# torchtitan renamed [checkpoint] enable_checkpoint -> enable (pytorch/torchtitan#1607) and moved
# training.compile to [compile] enable; TOMLs in the wild still carry the old names. The fuzzy match
# sends enable_checkpoint to create_seed_checkpoint (which saves step-0 and EXITS) and
# training.compile to training.seq_len.


@pytest.mark.parametrize("where", ["toml", "cli"])
def test_torchtitan_enable_checkpoint_suggests_checkpoint_enable(where: str, tmp_path: Path) -> None:
    if where == "toml":
        msg = _toml_error(tmp_path, "[checkpoint]\nenable_checkpoint = true\n")
    else:
        msg = _error(["--checkpoint.enable_checkpoint"])
    assert "did you mean 'checkpoint.create_seed_checkpoint'" not in msg, msg
    assert "'checkpoint.enable'" in msg, msg


@pytest.mark.parametrize("where", ["toml", "cli"])
def test_torchtitan_training_compile_suggests_compile_enable(where: str, tmp_path: Path) -> None:
    if where == "toml":
        msg = _toml_error(tmp_path, "[training]\ncompile = true\n")
    else:
        msg = _error(["--training.compile"])
    assert "did you mean 'training.seq_len'" not in msg, msg
    assert "'compile.enable'" in msg, msg


# --- 2. a key above every [section] header gets a nonsense suggestion ----------------------------------
# loader.py _flatten_sections: `_closest(k, [*known, 'extends'])` compares a key name with section
# names, so `seed = 1` suggests 'extends' and `dump_folder = ...` suggests 'model'.


def test_top_level_seed_suggests_its_section(tmp_path: Path) -> None:
    msg = _toml_error(tmp_path, "seed = 3\n")
    assert "did you mean 'extends'" not in msg, msg
    assert "debug.seed" in msg or "[debug]" in msg, msg


def test_top_level_dump_folder_suggests_its_section(tmp_path: Path) -> None:
    msg = _toml_error(tmp_path, 'dump_folder = "./out"\n')
    assert "did you mean 'model'" not in msg, msg
    assert "job.dump_folder" in msg or "[job]" in msg, msg


# --- 3. [[training]] (array of tables) is reported as "unknown top-level key 'training' (did you mean
# 'training'?)": the fix it suggests is what the user wrote.


def test_array_of_tables_section_is_named_as_such(tmp_path: Path) -> None:
    msg = _toml_error(tmp_path, "[[training]]\nsteps = 3\n")
    assert "did you mean 'training'" not in msg, msg
    assert "[training]" in msg, msg


# --- 4. accepted values that later crash or go astray -----------------------------------------------


def test_empty_dump_folder_is_refused_or_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchtitan_like.components.metrics import MetricsLogger

    monkeypatch.chdir(tmp_path)
    try:
        cfg = load_config(["--job.dump_folder="])
    except ConfigError as e:
        assert "job.dump_folder" in str(e)
        return
    # Accepted: then the run's writers must cope with it (metrics.jsonl is the first thing written).
    MetricsLogger(
        cfg.metrics, cfg.job.dump_folder, enabled=True, flops_per_token=1.0, peak_flops_per_s=None,
        device=torch.device("cpu"), world_size=1,
    )


def test_tilde_in_dump_folder_is_expanded_or_refused(tmp_path: Path) -> None:
    # `--job.dump_folder=~/runs` (the README's `=` form) is not tilde-expanded by bash, and a TOML
    # value never is. Nothing in the package calls expanduser.
    for argv in (["--job.dump_folder=~/runs/x"],):
        try:
            cfg = load_config(argv)
        except ConfigError as e:
            assert "job.dump_folder" in str(e)
            continue
        assert not cfg.job.dump_folder.startswith("~"), cfg.job.dump_folder


def test_a_dotted_name_nothing_resembles_gets_no_suggestion() -> None:
    # torchtitan keys we do not have: an unrelated "did you mean" (it was metrics.save_tb_folder) misleads.
    msg = _error(["--metrics.disable_color_printing"])
    assert "unknown key 'metrics.disable_color_printing'" in msg and "did you mean" not in msg


def test_tilde_paths_expand_in_every_path_key_and_in_extends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchtitan_like.config.fields import keys
    from torchtitan_like.config.loader import PATH_KEYS

    # Every key of the schema that names a file or folder the user gives is in PATH_KEYS (the folders
    # under job.dump_folder too: relative to it, but ~ makes one absolute, as in a shell; checkpoint.folder
    # = "~/ckpt" once made a folder named ~ in the dump folder).
    named = {k for k in keys() if k.endswith(("_path", "_csv", "config_file", "folder"))}
    assert named <= set(PATH_KEYS), named - set(PATH_KEYS)

    home = tmp_path / "home"
    (home / "cfg").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    (home / "cfg" / "base.toml").write_text('[training]\nsteps = 7\n', encoding="utf-8")
    child = tmp_path / "child.toml"
    child.write_text('extends = "~/cfg/base.toml"\n[job]\ndump_folder = "~/runs/x"\n', encoding="utf-8")
    cfg = load_config(["--job.config_file", str(child), "--training.dataset_path=~/data", "--training.dataset", "local"])
    assert cfg.training.steps == 7
    assert cfg.job.dump_folder == str(home / "runs" / "x")
    assert cfg.training.dataset_path == str(home / "data")
    folders = load_config(["--checkpoint.folder=~/ckpt", "--metrics.save_tb_folder", "~/tb"])
    assert (folders.checkpoint.folder, folders.metrics.save_tb_folder) == (str(home / "ckpt"), str(home / "tb"))


# --- torchtitan keys we do not have: each names what to use here ------------------------------------
# (A fuzzy match sent pipeline_parallel_split_points to the schedule CSV, model_weights_only to
# last_save_model_only without saying it is the same setting, and lr_min nowhere at all.)


@pytest.mark.parametrize("key, expected", [
    ("checkpoint.model_weights_only", "(torchtitan's former name: use 'checkpoint.last_save_model_only')"),
    ("training.batch_size", "(torchtitan's former name: use 'training.local_batch_size')"),
    ("lr_scheduler.lr_min", "use lr_scheduler.min_lr_factor"),
    ("parallelism.pipeline_parallel_split_points", "parallelism.pipeline_parallel_layers_per_stage"),
    ("parallelism.expert_tensor_parallel_degree", "mixture-of-experts models are not supported"),
    ("fault_tolerance.enable", "unknown section [fault_tolerance]: TorchFT is not supported"),
    ("memory_estimation.enabled", "tools/plan.py"),
    ("quantize.linear.mx.recipe_name", "unknown section [quantize.linear.mx]: MXFP8 is not supported"),
])
def test_torchtitan_keys_we_lack_name_what_to_use(key: str, expected: str, tmp_path: Path) -> None:
    section, _, name = key.rpartition(".")
    msg = _toml_error(tmp_path, f"[{section}]\n{name} = 2\n")
    assert expected in msg and "did you mean" not in msg, msg


def test_every_key_the_torchtitan_hints_name_exists() -> None:
    import re

    from torchtitan_like.config import loader

    ours = set(loader.keys())
    sections = set(loader.sections())
    assert set(loader._TORCHTITAN_FORMER.values()) <= ours
    texts = [*loader._TORCHTITAN_UNSUPPORTED.values(), *loader._TORCHTITAN_UNSUPPORTED_SECTIONS.values()]
    named = {m for text in texts for m in re.findall(r"\b[a-z_0-9]+(?:\.[a-z_0-9]+)+\b", text)
             if m.rpartition(".")[0] in sections and m != "metrics.jsonl"}
    assert named and named <= ours | sections, sorted(named - ours - sections)
    # None of them is a key we have: those would never reach the unknown-key message.
    assert not (set(loader._TORCHTITAN_UNSUPPORTED) | set(loader._TORCHTITAN_FORMER)) & ours
    assert not set(loader._TORCHTITAN_UNSUPPORTED_SECTIONS) & sections


# torchtitan 0.2.2's config keys that this trainer does not have (read from its JobConfig). Each must get
# an explanation or the key to use, never a fuzzy "did you mean" that points at an unrelated key
# (activation_checkpoint.memory_budget, once here, is ours now, with mode = "memory_budget").
TORCHTITAN_0_2_2_KEYS_NOT_HERE = """
activation_checkpoint.debug activation_checkpoint.determinism_check activation_checkpoint.early_stop
activation_checkpoint.per_op_sac_force_recompute_mm_shapes_by_fqns
activation_checkpoint.preserve_rng_state activation_checkpoint.visualize_memory_budget_pareto
checkpoint.enable_ft_dataloader_checkpoints checkpoint.initial_load_in_hf_quantized comm.mode
debug.moe_force_load_balance experimental.custom_args_module experimental.custom_import fault_tolerance.enable
fault_tolerance.group_size fault_tolerance.min_replica_size fault_tolerance.process_group
fault_tolerance.process_group_timeout_ms fault_tolerance.replica_id fault_tolerance.semi_sync_method
job.custom_config_module job.save_config_file memory_estimation.disable_fake_mode memory_estimation.enable
metrics.disable_color_printing metrics.enable_wandb metrics.save_for_all_ranks
model.print_after_conversion optimizer.early_step_in_backward parallelism.context_parallel_load_balancer
parallelism.expert_parallel_comm_backend parallelism.expert_tensor_parallel_degree
parallelism.pipeline_parallel_expert_parallel_overlap quantize.grouped_mm.float8.fqns quantize.grouped_mm.mx.fqns
quantize.grouped_mm.mx.recipe_name quantize.linear.mx.filter_fqns quantize.linear.mx.mxfp8_dim1_cast_kernel_choice
quantize.linear.mx.recipe_name training.dataloader.num_workers training.dataloader.persistent_workers
training.dataloader.pin_memory training.dataloader.prefetch_factor training.gc_debug
validation.dataloader.num_workers validation.dataloader.persistent_workers validation.dataloader.pin_memory
validation.dataloader.prefetch_factor
""".split()


@pytest.mark.parametrize("key", TORCHTITAN_0_2_2_KEYS_NOT_HERE)
def test_every_torchtitan_key_we_lack_is_explained(key: str, tmp_path: Path) -> None:
    # (2: a value that asks for something; the inert values of some of these keys are accepted, below.)
    for message in (_error([f"--{key}", "2"]), _toml_error(tmp_path, f"[{key.rpartition('.')[0]}]\n{key.rpartition('.')[2]} = 2\n")):
        assert "did you mean" not in message, message
        assert message.split(": ", 2)[-1].strip(), message  # (an explanation after the key or section)
        assert ": " in message.split("unknown ", 1)[1], message


# The settings of torchtitan 0.2.2's Llama 3 8B TOML (its keys and values; comments left out).
TORCHTITAN_8B_TOML = """
[job]
dump_folder = "./outputs"
description = "Llama 3 8B training"
[profiling]
enable_profiling = true
save_traces_folder = "profile_trace"
profile_freq = 100
[metrics]
log_freq = 10
enable_tensorboard = true
save_tb_folder = "tb"
[model]
name = "llama3"
flavor = "8B"
hf_assets_path = "./assets/hf/Llama-3.1-8B"
[optimizer]
name = "AdamW"
lr = 3e-4
eps = 1e-8
[lr_scheduler]
warmup_steps = 200
[training]
local_batch_size = 1
seq_len = 8192
max_norm = 1.0
steps = 1000
dataset = "c4"
[parallelism]
data_parallel_replicate_degree = 1
data_parallel_shard_degree = -1
tensor_parallel_degree = 1
pipeline_parallel_degree = 1
context_parallel_degree = 1
[checkpoint]
enable = false
folder = "checkpoint"
interval = 500
last_save_model_only = true
export_dtype = "float32"
async_mode = "disabled"
[compile]
enable=false
components = ["model", "loss"]
[activation_checkpoint]
mode = "selective"
selective_ac_option = "op"
[quantize.linear.float8]
enable_fsdp_float8_all_gather = false
precompute_float8_dynamic_scale_for_fsdp = false
filter_fqns = ["output"]
[validation]
enable = false
dataset = "c4_validation"
freq = 500
steps = 1200
"""


def test_torchtitans_own_8b_toml_loads_unchanged(tmp_path: Path) -> None:
    """Its asset folder (model.hf_assets_path) gives the tokenizer, its c4 is the hub dataset, and the job
    passes every pre-build check at 8 ranks."""
    from torchtitan_like.trainer import check_job

    toml = tmp_path / "llama3_8b.toml"
    toml.write_text(TORCHTITAN_8B_TOML)
    cfg = load_config(["--job.config_file", str(toml)])
    assert cfg.model.tokenizer_path == "./assets/hf/Llama-3.1-8B" and cfg.checkpoint.initial_load_path is None
    assert (cfg.training.dataset, cfg.training.dataset_path, cfg.training.dataset_config) == ("hf", "allenai/c4", "en")
    assert check_job(cfg, world_size=8).parallel_dims.dp_shard == 8


def _toml_literal(value: object) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else f'"{value}"' if isinstance(value, str) else str(value)


@pytest.mark.parametrize("key", sorted(loader._TORCHTITAN_INERT))
def test_torchtitan_keys_we_lack_load_at_values_that_ask_for_nothing(key: str, tmp_path: Path, caplog) -> None:
    """torchtitan's own TOMLs set some of them to their off value (enable_wandb = false, ...): such a file loads
    with a note; any other value is refused, naming why."""
    section, _, name = key.rpartition(".")
    for value in sorted(loader._TORCHTITAN_INERT[key], key=str):
        path = tmp_path / "job.toml"
        path.write_text(f"[{section}]\n{name} = {_toml_literal(value)}\n", encoding="utf-8")
        with caplog.at_level("INFO"):
            assert load_config(["--job.config_file", str(path), "--training.steps", "3"]).training.steps == 3
            assert load_config([f"--{key}", _toml_literal(value).strip('"'), "--training.steps", "3"]).training.steps == 3
        assert f"{key} = {value!r} is torchtitan's and asks for nothing here: ignored" in caplog.text
    refused = "true" if any(isinstance(v, bool) for v in loader._TORCHTITAN_INERT[key]) else '"other"'
    if loader._TORCHTITAN_INERT[key] == frozenset({False, True}):
        refused = '"yes"'
    assert "unknown key" in _toml_error(tmp_path, f"[{section}]\n{name} = {refused}\n")
