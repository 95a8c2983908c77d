"""Context parallel trains exactly like one process: CP(2) with both rotate methods and with activation
checkpointing + compile, CP(4), CP with FSDP (and the loss chunked over the sequence), TP and PP, CP x FSDP
x TP on 8 ranks, and checkpoints moving between CP(2) and one process in both directions.

Every run is the real Trainer (trainer_runs.py): debug model in fp32, deterministic, seq 64 (= the
RoPE length, as CP requires), global batch 8, 6 steps, compared per step (loss, grad norm) and on
the final weights with one process. What would break: a token count summed over the cp ranks too
(the loss halves), a missing gradient sum over cp (FSDP must shard over dp_shard x cp), the RoPE
table not sharded with the sequence (wrong positions: the loss moves at step 1), or the load
balancer's order not undone for the labels.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness import run_on_ranks
from torchtitan_like.components.manifest import complete_steps
from torchtitan_like.distributed.context_parallel import supported_rotate_methods
from trainer_runs import LAYOUTS, assert_same_training, assert_state_matches_dry_run, merged_params, train_run, trainer_argv

STEPS = 6
SAVE_EVERY = 3
CKPT = ("--checkpoint.enable", "--checkpoint.interval", str(SAVE_EVERY))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One process, 6 steps, with checkpoints at 3 and 6 (they seed the one -> CP resume)."""
    tmp = tmp_path_factory.mktemp("reference")
    (ref,) = run_on_ranks(
        train_run, world_size=1, tmp_path=tmp, args=(trainer_argv(tmp / "run", "one", *CKPT, steps=STEPS),)
    )
    ref["dump"] = tmp / "run"
    assert sorted(complete_steps(ref["dump"] / "checkpoint")) == [SAVE_EVERY, STEPS]
    return ref


def test_cp2_rotate_methods_ac_compile_and_resume_both_ways(reference: dict, tmp_path: Path) -> None:
    methods = supported_rotate_methods()
    assert set(methods) == {"allgather", "alltoall"}  # torch 2.13 offers both
    argvs = [
        trainer_argv(tmp_path / m, "cp2", "--parallelism.context_parallel_rotate_method", m, *CKPT, steps=STEPS)
        for m in methods
    ]
    # With activation checkpointing (the recompute runs the ring again, inside the context) and
    # per-block compile (aot_eager: the traced joint graph, without inductor's minutes of codegen).
    argvs.append(trainer_argv(
        tmp_path / "ac_compile", "cp2", "--activation_checkpoint.mode", "full", "--compile.enable",
        "--compile.backend", "aot_eager", steps=STEPS,
    ))
    # One process's step-3 checkpoint, resumed under CP(2).
    from_one = tmp_path / "from_one"
    saved = Path("checkpoint") / f"step-{SAVE_EVERY}"
    shutil.copytree(reference["dump"] / saved, from_one / saved)
    argvs.append(trainer_argv(from_one, "cp2", *CKPT, steps=STEPS))
    # One launch per run: a Trainer's process groups are only ever released by ending the process.
    runs = [run_on_ranks(train_run, world_size=2, tmp_path=tmp_path, args=(argv,), timeout_s=300) for argv in argvs]
    for i, m in enumerate(methods):
        for r in range(2):
            assert_same_training(runs[i][r], reference, f"cp2 {m} (rank {r})")
        assert_same_training(runs[i][0], reference, f"cp2 {m}", params=runs[i][0]["params"])
    assert_same_training(runs[len(methods)][0], reference, "cp2 + AC + compile", params=runs[len(methods)][0]["params"])
    tail = {"history": reference["history"][SAVE_EVERY:], "params": reference["params"]}
    resumed = runs[len(methods) + 1][0]
    assert_same_training(resumed, tail, "one process step 3 -> cp2", params=resumed["params"])

    # CP(2)'s step-3 checkpoint, resumed by one process.
    to_one = tmp_path / "to_one"
    shutil.copytree(tmp_path / methods[0] / saved, to_one / saved)
    (one,) = run_on_ranks(train_run, world_size=1, tmp_path=tmp_path, args=(trainer_argv(to_one, "one", *CKPT, steps=STEPS),))
    assert_same_training(one, tail, "cp2 step 3 -> one process", params=one["params"])


def test_cp_on_4_ranks_alone_and_with_fsdp_tp_pp_and_on_8_with_fsdp_x_tp(reference: dict, tmp_path: Path) -> None:
    layouts = ["cp4", "cp2xfsdp2", "cp2xtp2", "cp2xpp2", "cp2xfsdp2xtp2"]
    # The long-context combination: CP x FSDP with the loss chunked over each rank's sequence shard
    # (the output projection runs once per chunk, and again in backward, under FSDP's hooks).
    extra = {"cp2xfsdp2": ("--training.loss_chunk_size", "16")}
    for name in layouts:
        world, _ = LAYOUTS[name]
        argv = trainer_argv(tmp_path / name, name, *extra.get(name, ()), steps=STEPS)
        per_rank = run_on_ranks(train_run, world_size=world, tmp_path=tmp_path, args=(argv,), timeout_s=300)
        for r, out in enumerate(per_rank):
            assert_same_training(out, reference, f"{name} (rank {r})")
        assert_same_training(per_rank[0], reference, name, params=merged_params(per_rank))
        if name in extra:  # each cp rank's 32 positions, projected 16 at a time
            assert all(out["output_positions"] == [16] for out in per_rank), [o["output_positions"] for o in per_rank]
        assert_state_matches_dry_run(argv, world, per_rank, check_ranks=[0, world - 1])
