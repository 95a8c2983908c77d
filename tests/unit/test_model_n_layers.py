"""model.n_layers: a flavor's width with fewer (or more) blocks, the same everywhere a model's shape is
used: the trainer's checks and model, the dry run, the planner and the checkpoint tool's HF export."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from torchtitan_like.config.loader import load_config
from torchtitan_like.errors import ConfigError
from torchtitan_like.trainer import Trainer, check_job

ROOT = Path(__file__).resolve().parents[2]


def _cfg(*overrides: str):
    return load_config(["--job.config_file", str(ROOT / "train_configs/debug_model.toml"), *overrides])


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_the_override_keeps_the_flavors_width_and_names_itself_in_errors() -> None:
    args = check_job(_cfg("--model.flavor", "8B", "--model.n_layers", "3"), 1).model_args
    assert (args.n_layers, args.dim, args.n_heads, args.vocab_size) == (3, 4096, 32, 128256)
    assert check_job(_cfg(), 1).model_args.n_layers == 6  # unset: the flavor's

    with pytest.raises(ConfigError, match=r"model\.n_layers=0 is out of range: must be >= 1"):
        _cfg("--model.n_layers", "0")
    with pytest.raises(ConfigError, match=r"every 3-th block, but the model has 2 \(model\.n_layers=2\)"):
        check_job(_cfg("--model.n_layers", "2", "--activation_checkpoint.mode", "selective",
                       "--activation_checkpoint.selective_ac_option", "3"), 1)
    with pytest.raises(ConfigError, match="a pipeline of 4 stages over a model with 1 layers"):
        check_job(_cfg("--model.n_layers", "1", "--parallelism.pipeline_parallel_degree", "4",
                       "--parallelism.data_parallel_shard_degree", "1"), 4)


def test_a_run_with_two_blocks_exports_two_and_the_tool_needs_the_same_count(tmp_path, capsys) -> None:
    dump = tmp_path / "run"
    trainer = Trainer(_cfg(
        "--job.dump_folder", str(dump), "--model.n_layers", "2", "--training.steps", "1", "--training.seq_len", "32",
        "--training.local_batch_size", "1", "--metrics.no_enable_tensorboard", "--checkpoint.enable",
    ))
    try:
        trainer.train()
    finally:
        trainer.close()
    (model,) = trainer.model_parts
    assert list(model.layers) == ["0", "1"]
    assert trainer.history[0]["step"] == 1 and torch.isfinite(torch.tensor(trainer.history[0]["loss"]))
    step = dump / "checkpoint" / "step-1"

    convert = _tool("checkpoint")
    # The flavor's own 6 blocks: the missing ones are named, and the flag that fixes it.
    assert convert(["convert", str(step), str(tmp_path / "hf6"), "--hf", "--flavor", "debugmodel"]) != 0
    err = capsys.readouterr().err
    assert "lacks ['layers.2." in err and "--n-layers N where the job set model.n_layers" in err, err
    assert not (tmp_path / "hf6").exists()

    hf = ["--hf", "--flavor", "debugmodel", "--n-layers", "2"]
    assert convert(["convert", str(step), str(tmp_path / "hf"), *hf]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"] == 2

    # Without --hf nothing would read it: refused rather than ignored.
    assert convert(["convert", str(step), str(tmp_path / "w.safetensors"), "--n-layers", "2"]) != 0
    assert "--n-layers applies with --hf" in capsys.readouterr().err
    assert not (tmp_path / "w.safetensors").exists()


def test_the_dry_run_and_the_planner_size_the_cut_model(tmp_path, capsys) -> None:
    from torchtitan_like.dry_run import main as dry_run

    report = tmp_path / "dry.json"
    assert dry_run(["--world-size", "8", "--json", str(report), "--skip-files",
                    "--job.config_file", str(ROOT / "train_configs/llama3_8b.toml"), "--model.n_layers", "4"]) == 0
    got = json.loads(report.read_text())
    assert got["model"] == "llama3 8B (4 layers)"
    # 4 of 8B's 32 blocks, plus its embedding, output and final norm, in 8 shards.
    full = check_job(load_config(["--job.config_file", str(ROOT / "train_configs/llama3_8b.toml")]), 8).model_args
    cut = dataclasses.replace(full, n_layers=4)
    assert got["state_bytes"]["n_elements"] == pytest.approx(cut.num_params() / 8, rel=0.01)

    toml = tmp_path / "job.toml"
    toml.write_text('[model]\nflavor = "8B"\nn_layers = 4\n[training]\nseq_len = 2048\nglobal_batch_size = 16\n')
    plan = tmp_path / "plan.json"
    assert _tool("plan")(["--config", str(toml), "--ngpu", "8", "--no-verify", "--top", "1", "--json", str(plan)]) == 0
    assert "planning llama3 8B (4 layers: model.n_layers) on 8 x H100" in capsys.readouterr().out
    rows = json.loads(plan.read_text())
    # The smallest parameter shard is the cut model's (~1.9e9 fp32 parameters over 8: ~0.9 GiB), not
    # the whole 8B's (~3.7 GiB at best).
    assert rows and min(row["memory_bytes"]["params"] for row in rows) < 1.5 * 2**30
