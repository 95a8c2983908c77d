"""Tied embeddings (one table for the input embedding and the output projection, as Llama 3.2 1B / 3B)
train like one process under every pass that treats the table specially:

- FSDP(2) x TP(2): FSDP keeps the table in the root's group (the output projection uses it last), TP
  shards it on the vocabulary once for both uses; DDP(2) replicates it;
- FSDP(2) with float8 on every linear, the output projection included (filter_fqns = []), with FSDP
  float8 all-gather: torchao's all-gather wrapper used to untie the table (tests/unit/test_float8.py);
- a checkpoint of the FSDP(2) x TP(2) run resumed as TP(2): the table saved once, resharded.

The flavor is `debugmodel_tied` (the debug model, tied). Each layout is compared with one process
(fp32, deterministic, the trainer_runs.py setup); untied training gives other losses from step 2 on
(the table's gradient is the sum of both uses).
"""

from __future__ import annotations

import pytest
import torch

from harness import run_on_ranks
from trainer_runs import LAYOUTS, assert_same_training, assert_state_matches_dry_run, series, train_run, trainer_argv

STEPS = 6
# Float8 against fp32: the loss and first-step grad-norm tolerances of tests/unit/test_float8.py (reasons
# there). Seen here: loss <= 0.05%, grad norm 0.3% at step 1. The later grad norms are not compared:
# with the output projection in float8 too (which the default filter keeps in high precision) a
# spiky step differs by up to 36% (step 8 of 10: torch 2.13 one process float8 vs fp32, and torch 2.11).
REL_TOL = 0.015
GRAD_NORM_FIRST_TOL = 0.01
TIED = ("--model.flavor", "debugmodel_tied")
FLOAT8_ALL_LINEARS = (
    "--model.converters", "float8", "--quantize.linear.float8.emulate", "--quantize.linear.float8.filter_fqns=",
    "--quantize.linear.float8.enable_fsdp_float8_all_gather",
    "--quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp",
)


def _run(layout: str, dump, tmp_path, *overrides: str, crash_at_step: int | None = None) -> tuple[list[str], list[dict]]:
    argv = trainer_argv(dump, layout, *TIED, *overrides, steps=STEPS)
    world, _ = LAYOUTS[layout]
    return argv, run_on_ranks(train_run, world_size=world, tmp_path=tmp_path, args=(argv, crash_at_step), timeout_s=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("tied_reference")
    _, (ref,) = _run("one", tmp / "run", tmp)
    assert "output.weight" not in ref["params"] and "tok_embeddings.weight" in ref["params"]
    return ref


@pytest.mark.parametrize("layout", ["fsdp2xtp2", "ddp2"])
def test_tied_model_matches_one_process(layout: str, reference: dict, tmp_path) -> None:
    argv, ranks = _run(layout, tmp_path / "run", tmp_path)
    for r, out in enumerate(ranks):
        assert_same_training(out, reference, f"{layout} rank {r}", params=out.get("params"))
    # One table, in the state memory the dry run and the planner count.
    assert_state_matches_dry_run(argv, LAYOUTS[layout][0], ranks, check_ranks=[0])


def test_tied_float8_output_with_fsdp_float8_all_gather(reference: dict, tmp_path) -> None:
    """Float8 numbers are not fp32's (tolerances of tests/unit/test_float8.py): what must hold is that the
    table stays one parameter, trained by both uses, with the state memory of one table."""
    argv, ranks = _run("fsdp2", tmp_path / "run", tmp_path, *FLOAT8_ALL_LINEARS)
    got, ref = ranks[0]["history"], reference["history"]
    torch.testing.assert_close(series(got, "loss"), series(ref, "loss"), rtol=REL_TOL, atol=0)
    norms, ref_norms = series(got, "grad_norm"), series(ref, "grad_norm")
    torch.testing.assert_close(norms[0], ref_norms[0], rtol=GRAD_NORM_FIRST_TOL, atol=0)
    assert series(got, "loss").tolist() != series(ref, "loss").tolist(), "float8 changed nothing: not converted?"
    assert "output.weight" not in ranks[0]["params"]
    assert_state_matches_dry_run(argv, 2, ranks, check_ranks=[0])


def test_tied_checkpoint_resumes_in_another_layout(reference: dict, tmp_path) -> None:
    dump = tmp_path / "run"
    every = ("--checkpoint.enable", "--checkpoint.interval", "3")
    _, crashed = _run("fsdp2xtp2", dump, tmp_path / "a", *every, crash_at_step=4)
    assert all(r["crashed"] for r in crashed)
    _, resumed = _run("tp2", dump, tmp_path / "b", *every)
    got = resumed[0]
    assert [h["step"] for h in got["history"]] == list(range(4, STEPS + 1))
    tail = {"history": reference["history"][3:], "params": reference["params"]}
    assert_same_training(got, tail, "fsdp2xtp2 -> tp2 resume", params=got["params"])
