"""A DCP checkpoint of a different model is refused, not silently truncated.

DCP reads only the keys the state dict asks for, so resuming (or starting from initial_load_path) with
a shallower flavor of the same width once loaded the first layers and dropped the rest without a word
(only a config-hash warning on resume). Extra model tensors are now a CheckpointError naming them.
Zero-padded step folders (step-005) are purged like any other. An initial load that would load no
weights because exclude_from_loading lists "model" is refused.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

# The checkpoint suite's tiny run helpers, and its autouse fixture (one thread).
from test_checkpoint import ARGS, _one_thread, ckpt_dir, make_run, manager  # noqa: F401
from torchtitan_like.components.checkpoint import CheckpointError
from torchtitan_like.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def test_resuming_with_fewer_layers_is_refused_naming_the_extra_weights(tmp_path):
    deeper = make_run(0, dataclasses.replace(ARGS, n_layers=3))
    mgr = manager(deeper, tmp_path, interval=1)
    deeper.train(1, mgr)
    mgr.close()
    shallow = make_run(1)  # ARGS: 2 layers, the same width
    with pytest.raises(CheckpointError, match=r"holds model weights that this model.flavor does not have: \['layers\.2\."):
        manager(shallow, tmp_path).load()
    # The same flavor loads.
    assert manager(make_run(2, dataclasses.replace(ARGS, n_layers=3)), tmp_path).load() == 1


def test_resuming_with_more_layers_is_refused_naming_the_missing_weights(tmp_path):
    """(DCP itself stopped at the first with "Missing key in checkpoint state_dict", naming no flavor.)"""
    shallow = make_run(0)
    mgr = manager(shallow, tmp_path, interval=1)
    shallow.train(1, mgr)
    mgr.close()
    deeper = make_run(1, dataclasses.replace(ARGS, n_layers=3))
    with pytest.raises(CheckpointError, match=r"lacks model weights that this model.flavor has: \['layers\.2\..*"
                                              r"model.n_layers"):
        manager(deeper, tmp_path).load()


def test_initial_load_of_a_deeper_model_is_refused(tmp_path):
    deeper = make_run(0, dataclasses.replace(ARGS, n_layers=3))
    mgr = manager(deeper, tmp_path / "src", interval=1)
    deeper.train(1, mgr)
    mgr.close()
    with pytest.raises(CheckpointError, match="does not have"):
        manager(make_run(1), tmp_path / "new", initial_load_path=str(ckpt_dir(tmp_path / "src") / "step-1"),
                initial_load_model_only=True).load()


def test_an_untied_checkpoint_is_refused_by_a_tied_flavor_and_a_tied_one_loads(tmp_path):
    """A tied model names its one matrix twice (tok_embeddings, output): an untied checkpoint's output
    head loaded over its embeddings without a word. The manifest now says whether the model was tied."""
    untied = make_run(0)
    mgr = manager(untied, tmp_path / "untied", interval=1)
    untied.train(1, mgr)
    mgr.close()
    tied_args = dataclasses.replace(ARGS, tie_word_embeddings=True)
    for kwargs in ({}, {"initial_load_path": str(ckpt_dir(tmp_path / "untied") / "step-1")}):
        dump = tmp_path / ("untied" if not kwargs else "new")
        with pytest.raises(CheckpointError, match=r"saved from a model with an output head of its own "
                           r"\(tie_word_embeddings=false\), but this model.flavor ties"):
            manager(make_run(1, tied_args), dump, **kwargs).load()
    tied = make_run(0, tied_args)
    mgr = manager(tied, tmp_path / "tied", interval=1)
    tied.train(1, mgr)
    mgr.close()
    assert manager(make_run(1, tied_args), tmp_path / "tied").load() == 1
    # Through tools/checkpoint.py convert (DCP -> .pt -> DCP): its manifest says whether the weights are tied
    # (it once said nothing, and the untied head loaded over a tied model's embeddings).
    tool = _checkpoint_tool()
    for name, run_dir, refused in (("untied", tmp_path / "untied", True), ("tied", tmp_path / "tied", False)):
        pt, converted = tmp_path / f"{name}.pt", tmp_path / f"{name}_dcp"
        assert tool.main(["convert", str(ckpt_dir(run_dir) / "step-1"), str(pt), "--model-only"]) == 0
        assert tool.main(["convert", str(pt), str(converted)]) == 0
        load = manager(make_run(2, tied_args), tmp_path / f"from_{name}", initial_load_path=str(converted)).load
        if refused:
            with pytest.raises(CheckpointError, match=r"output head of its own \(tie_word_embeddings=false\)"):
                load()
        else:
            load()


def _checkpoint_tool():
    spec = importlib.util.spec_from_file_location("checkpoint_tool_tied", Path(__file__).parents[2] / "tools/checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_zero_padded_step_folders_are_purged(tmp_path):
    run = make_run()
    mgr = manager(run, tmp_path, interval=1, keep_latest_k=1)
    run.train(1, mgr)
    mgr.wait()
    (ckpt_dir(tmp_path) / "step-1").rename(ckpt_dir(tmp_path) / "step-001")
    run.train(2, mgr)
    mgr.close()
    assert sorted(p.name for p in ckpt_dir(tmp_path).iterdir()) == ["step-3"]


def test_initial_load_with_the_model_excluded_says_so(tmp_path):
    run = make_run(0)
    mgr = manager(run, tmp_path / "src", interval=1)
    run.train(1, mgr)
    mgr.close()
    # A config rule (so the dry run refuses it too): the manager refuses it when it is built.
    with pytest.raises(ConfigError, match='exclude_from_loading lists "model"'):
        manager(make_run(1), tmp_path / "new", initial_load_path=str(ckpt_dir(tmp_path / "src") / "step-1"),
                exclude_from_loading=["model"])
