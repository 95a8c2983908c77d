"""A torchtitan run's whole state (checkpoint.initial_load_path in torchtitan's layout with
initial_load_model_only=false) continues under FSDP x TP as our own checkpoint of the same state does in one
process: weights, AdamW state (resharded onto DTensors), schedule position, step and tokens.

The torchtitan checkpoint is our one-process step-2 checkpoint rewritten in torchtitan 0.2.2's layout (model
keys at the top level; "optimizer" the same flattened per-parameter state; "lr_scheduler" LambdaLR's state
field by field; "train_state" step and ntokens_seen; "dataloader" its own). Neither run reads a data position
(torchtitan's is in its own format; the reference excludes ours), so both start the data over.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from harness import run_on_ranks
from trainer_runs import LAYOUTS, assert_same_training, train_run, trainer_argv

STEPS = 4

# dcp.save without a process group (the conversion, in the test process) says it assumes one process.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _as_torchtitan(ours: Path, dst: Path) -> Path:
    tmp = dst.parent.parent / "whole.pt"
    dcp_to_torch_save(str(ours), str(tmp))
    whole = torch.load(tmp, weights_only=False)
    ts = whole["train_state"]
    state = {
        **whole["model"],
        "optimizer": whole["optimizer"],
        "lr_scheduler": pickle.loads(whole["lr_scheduler"]),
        "train_state": {"step": ts["step"], "ntokens_seen": ts["tokens_seen"]},
        "dataloader": {"dp_rank_0": b"torchtitan's own"},
    }
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(dst)), no_dist=True)
    return dst


def test_a_torchtitan_state_continues_under_fsdp_x_tp_as_our_own(tmp_path: Path) -> None:
    dump = tmp_path / "first"
    first = trainer_argv(dump, "one", "--checkpoint.enable", "--checkpoint.no_last_save_model_only", steps=2)
    run_on_ranks(train_run, world_size=1, tmp_path=tmp_path, args=(first,))
    ours = dump / "checkpoint" / "step-2"
    torchtitan = _as_torchtitan(ours, tmp_path / "torchtitan" / "step-2")

    def argv(run: str, layout: str, source: Path) -> list[str]:
        return trainer_argv(tmp_path / run, layout, "--checkpoint.initial_load_path", str(source),
                            "--checkpoint.no_initial_load_model_only", "--checkpoint.exclude_from_loading", "dataloader",
                            steps=STEPS)

    (ref,) = run_on_ranks(train_run, world_size=1, tmp_path=tmp_path, args=(argv("ref", "one", ours),))
    assert [h["step"] for h in ref["history"]] == [3, 4]
    world, _ = LAYOUTS["fsdp2xtp2"]
    ranks = run_on_ranks(train_run, world_size=world, tmp_path=tmp_path,
                         args=(argv("tt", "fsdp2xtp2", torchtitan),), timeout_s=300)
    for r, out in enumerate(ranks):
        assert_same_training(out, ref, f"fsdp2xtp2 from torchtitan's layout, rank {r}",
                             params=ranks[0]["params"] if r == 0 else None)
    # Without the optimizer state the steps differ: the comparison above sees it.
    (fresh,) = run_on_ranks(train_run, world_size=1, tmp_path=tmp_path, args=(
        trainer_argv(tmp_path / "fresh", "one", "--checkpoint.initial_load_path", str(torchtitan),
                     "--checkpoint.no_initial_load_model_only", "--checkpoint.exclude_from_loading", "dataloader,optimizer",
                     steps=STEPS),))
    assert [h["step"] for h in fresh["history"]] == [3, 4]
    assert abs(fresh["history"][1]["loss"] - ref["history"][1]["loss"]) > 1e-3
