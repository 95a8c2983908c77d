"""checkpoint.initial_load_path may name a torchtitan DCP checkpoint (a step-N folder): its model keys sit at
the top level (tok_embeddings.weight, layers.0.attention.wq.weight, ...; torchtitan's CheckpointManager
flattens the model's state dict there, beside "optimizer", "lr_scheduler", "dataloader", "train_state", and
its persistent RoPE buffer "freqs_cis"). The weights load by their names; with initial_load_model_only=false
also its optimizer (get_optimizer_state_dict flattened per parameter name, as ours), its LambdaLR state and
its train_state (step, ntokens_seen), so a torchtitan run continues here. Its dataloader state is its own.

The checkpoints here are written in that layout with DCP from a model, optimizer and scheduler of our own
(torchtitan's Llama 3 names are Meta's, as ours; its OptimizersContainer.state_dict() is
get_optimizer_state_dict with flatten_optimizer_state_dict=True, and its LRSchedulersContainer saves the
first LambdaLR's state_dict(): the keys a real torchtitan 0.2.2 checkpoint holds, compared once outside
the suite).
"""

from __future__ import annotations

import logging
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_checkpoint import ARGS, Run, assert_same, make_run, manager
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from torchtitan_like.components.checkpoint import CheckpointError, check_initial_load, is_flat_model_layout
from torchtitan_like.config.schema import Checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def torchtitan_checkpoint(path: Path, model: torch.nn.Module, *, model_only: bool = False, run: Run | None = None,
                          **extra_weights) -> Path:
    """torchtitan's layout; `run`: its optimizer, scheduler and step as the other states (else stand-ins)."""
    state: dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state.update(extra_weights)
    state["freqs_cis"] = torch.randn(16, 4, 2)  # (persistent in torchtitan's model; ours recomputes it)
    if not model_only:
        if run is not None:
            state["optimizer"] = get_optimizer_state_dict(
                run.model, run.optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))
            state["lr_scheduler"] = run.scheduler.state_dict()
            state["train_state"] = {"step": run.state.step, "ntokens_seen": run.state.tokens_seen}
        else:
            state["optimizer"] = {"state": {"tok_embeddings.weight": {"exp_avg": torch.zeros(3)}}}
            state["lr_scheduler"] = {"lr_scheduler_0": {"last_epoch": 7}}
            state["train_state"] = {"step": 7}
        state["dataloader"] = {"dp_rank_0": b"torchtitan's own"}
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


def _whole_state_load(path: Path, dump: Path, caplog: pytest.LogCaptureFixture, **overrides) -> tuple[Run, int | None, list[str]]:
    """A fresh run loading `path` with initial_load_model_only=false: the run, the step load() returned, and the
    warnings it logged."""
    run = make_run(1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="torchtitan_like.components.checkpoint"):
        step = manager(run, dump, initial_load_path=str(path), initial_load_model_only=False, **overrides).load()
    return run, step, [r.getMessage() for r in caplog.records]


def test_a_torchtitan_run_continues_from_its_whole_state(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Weights, AdamW state, schedule position, step and tokens: the next steps are the source run's own, given
    the same batches and random state (its data position does not carry over)."""
    source = make_run(0)
    source.train(3)
    path = torchtitan_checkpoint(tmp_path / "step-3", source.model, run=source)
    check_initial_load(Checkpoint(initial_load_path=str(path), initial_load_model_only=False), ARGS)
    run, step, warnings = _whole_state_load(path, tmp_path / "run", caplog)
    assert step == 3
    assert (run.state.step, run.state.tokens_seen) == (3, source.state.tokens_seen)
    assert_same(run.model.state_dict(), source.model.state_dict())
    assert_same(run.optimizer.state_dict(), source.optimizer.state_dict())
    assert run.scheduler.last_epoch == 3 and run.scheduler.get_last_lr() == source.scheduler.get_last_lr()
    assert run.loader.pos == 0, "torchtitan's dataloader state is never read"
    assert any("its own format: the data starts from its beginning" in m for m in warnings)
    run.loader.pos = source.loader.pos
    for r in (run, source):
        torch.manual_seed(5)
        random.seed(5)
        r.train(2)
    assert_same(run.model.state_dict(), source.model.state_dict())
    assert_same(run.optimizer.state_dict(), source.optimizer.state_dict())


def test_a_torchtitan_checkpoints_states_can_be_left_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = make_run(0)
    source.train(3)
    path = torchtitan_checkpoint(tmp_path / "step-3", source.model, run=source)
    run, step, warnings = _whole_state_load(path, tmp_path / "run", caplog, exclude_from_loading=["optimizer", "dataloader"])
    assert step == 3
    assert not run.optimizer.state and run.scheduler.last_epoch == 3
    assert_same(run.model.state_dict(), source.model.state_dict())
    assert not any("the data starts from its beginning" in m for m in warnings)


def test_what_cannot_load_from_a_torchtitan_checkpoint_is_refused(tmp_path: Path) -> None:
    source = make_run(0)
    path = torchtitan_checkpoint(tmp_path / "step-7", source.model)
    with pytest.raises(CheckpointError, match="tied embeddings"):
        check_initial_load(Checkpoint(initial_load_path=str(path)), replace(ARGS, tie_word_embeddings=True))
    # Weights this model does not have (a deeper model's), or lacks (a shallower one's).
    deeper = torchtitan_checkpoint(tmp_path / "deeper", source.model, **{"layers.2.ffn_norm.weight": torch.ones(32)})
    with pytest.raises(CheckpointError, match=r"model weights that this model.flavor does not have: \['layers.2.ffn_norm"):
        manager(make_run(1), tmp_path / "a", initial_load_path=str(deeper)).load()
    shallow = make_run(0, replace(ARGS, n_layers=1))
    path = torchtitan_checkpoint(tmp_path / "shallow", shallow.model)
    with pytest.raises(CheckpointError, match=r"shallow lacks model weights that this model.flavor has: \['layers.1"):
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


def test_the_checkpoint_tool_inspects_a_torchtitan_checkpoint_and_does_not_call_it_incomplete(tmp_path: Path, capsys) -> None:
    tool = _tool()
    source = make_run(0)
    source.train(3)
    path = torchtitan_checkpoint(tmp_path / "step-3", source.model, run=source)
    assert tool.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layout: torchtitan's (model weights at the top level, no manifest.json)" in out
    assert "contents: model, dataloader, lr_scheduler, optimizer, train_state" in out
    assert f"step: 3  tokens seen: {source.state.tokens_seen}" in out
    assert tool.main(["verify", str(path)]) == 2
    err = capsys.readouterr().err
    assert "is in torchtitan's layout, which has no manifest.json to verify against" in err
    assert "incomplete" not in err
    only = torchtitan_checkpoint(tmp_path / "step-9", source.model, model_only=True)
    assert tool.main(["inspect", str(only)]) == 0
    out = capsys.readouterr().out
    assert "contents: model\n" in out and "step:" not in out


def test_a_torchtitan_model_only_save_with_the_whole_state_asked_for_says_what_it_lacks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = make_run(0)
    source.train(2)
    path = torchtitan_checkpoint(tmp_path / "step-9", source.model, model_only=True)
    run, step, messages = _whole_state_load(path, tmp_path / "run", caplog)
    assert step is None
    assert_same(run.model.state_dict(), source.model.state_dict())
    assert not run.optimizer.state and run.state.step == 0
    assert any("holds no optimizer, lr_scheduler, train_state (a model-only save" in m for m in messages), messages
    assert not any("dataloader state" in m for m in messages), "no dataloader state there to warn about"
