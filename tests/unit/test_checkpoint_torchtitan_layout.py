"""checkpoint.initial_load_path may name a torchtitan DCP checkpoint (a step-N folder): its model keys sit at
the top level (tok_embeddings.weight, layers.0.attention.wq.weight, ...; torchtitan's CheckpointManager
flattens the model's state dict there, beside "optimizer", "lr_scheduler", "dataloader", "train_state", and
its persistent RoPE buffer "freqs_cis"). The weights load by their names; the other states are that
trainer's formats and are refused with initial_load_model_only=false.

The checkpoints here are written in that layout with DCP from a model of our own (torchtitan's Llama 3
names are Meta's, as ours).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_checkpoint import ARGS, assert_same, make_run, manager

from torchtitan_like.components.checkpoint import CheckpointError, check_initial_load, is_flat_model_layout
from torchtitan_like.config.schema import Checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def torchtitan_checkpoint(path: Path, model: torch.nn.Module, *, model_only: bool = False, **extra_weights) -> Path:
    state: dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state.update(extra_weights)
    state["freqs_cis"] = torch.randn(16, 4, 2)  # (persistent in torchtitan's model; ours recomputes it)
    if not model_only:
        state["optimizer"] = {"state": {"tok_embeddings.weight": {"exp_avg": torch.zeros(3)}}}
        state["lr_scheduler"] = {"lr_scheduler_0": {"last_epoch": 7}}
        state["dataloader"] = {"dp_rank_0": b"torchtitan's own"}
        state["train_state"] = {"step": 7}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)
    return path


def test_a_torchtitan_checkpoints_weights_start_a_run(tmp_path: Path) -> None:
    source = make_run(0)
    source.train(2)
    path = torchtitan_checkpoint(tmp_path / "step-7", source.model)
    assert is_flat_model_layout(path)
    run = make_run(1)
    mgr = manager(run, tmp_path / "run", initial_load_path=str(path))
    assert mgr.load() is None  # weights only: the run starts at step 0
    assert_same(run.model.state_dict(), source.model.state_dict())
    assert not run.optimizer.state and run.state.step == 0
    # A model-only save (torchtitan's last step) loads the same way.
    only = torchtitan_checkpoint(tmp_path / "step-9", source.model, model_only=True)
    again = make_run(2)
    manager(again, tmp_path / "again", initial_load_path=str(only)).load()
    assert_same(again.model.state_dict(), source.model.state_dict())


def test_what_cannot_load_from_a_torchtitan_checkpoint_is_refused(tmp_path: Path) -> None:
    source = make_run(0)
    path = torchtitan_checkpoint(tmp_path / "step-7", source.model)
    with pytest.raises(CheckpointError, match=r"torchtitan's layout\), and its optimizer.*initial_load_model_only=true"):
        check_initial_load(Checkpoint(initial_load_path=str(path), initial_load_model_only=False), ARGS)
    with pytest.raises(CheckpointError, match="tied embeddings"):
        check_initial_load(Checkpoint(initial_load_path=str(path)), replace(ARGS, tie_word_embeddings=True))
    # Weights this model does not have (a deeper model's), or lacks (a shallower one's).
    deeper = torchtitan_checkpoint(tmp_path / "deeper", source.model, **{"layers.2.ffn_norm.weight": torch.ones(32)})
    with pytest.raises(CheckpointError, match=r"model weights that this model.flavor does not have: \['layers.2.ffn_norm"):
        manager(make_run(1), tmp_path / "a", initial_load_path=str(deeper)).load()
    shallow = make_run(0, replace(ARGS, n_layers=1))
    path = torchtitan_checkpoint(tmp_path / "shallow", shallow.model)
    with pytest.raises(CheckpointError, match=r"loading the model weights from .*shallow failed.*layers.1"):
        manager(make_run(1), tmp_path / "b", initial_load_path=str(path)).load()


def test_our_own_checkpoints_are_not_taken_for_torchtitans(tmp_path: Path) -> None:
    run = make_run(0)
    mgr = manager(run, tmp_path / "run")
    run.train(2, mgr)
    mgr.close()
    step = next((tmp_path / "run").rglob("step-2"))
    assert not is_flat_model_layout(step)
    assert not is_flat_model_layout(tmp_path)  # no .metadata


def _tool():
    import importlib.util

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("checkpoint_tool", root / "tools/checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_the_checkpoint_tool_converts_a_torchtitan_checkpoints_weights(tmp_path: Path, capsys) -> None:
    tool = _tool()
    source = make_run(0)
    path = torchtitan_checkpoint(tmp_path / "step-7", source.model)
    assert tool.main(["convert", str(path), str(tmp_path / "w.pt")]) == 0  # (weights only, without asking)
    assert "torchtitan's layout" in capsys.readouterr().err
    assert_same(torch.load(tmp_path / "w.pt"), source.model.state_dict())
    assert tool.main(["convert", str(path), str(tmp_path / "w.safetensors")]) == 0
    from safetensors.torch import load_file

    assert_same(load_file(tmp_path / "w.safetensors"), source.model.state_dict())
    assert tool.main(["convert", str(path), str(tmp_path / "all.pt"), "--no-model-only"]) == 2
    assert "convert its weights only (--model-only)" in capsys.readouterr().err
    assert not (tmp_path / "all.pt").exists()
