"""Pipeline parallel trains exactly like one process: every torch schedule (and a CSV one), with FSDP,
with TP, with both (3D, 8 ranks), with activation checkpointing + compile + float8, and across checkpoint
resumes.

Every run is the real Trainer (trainer_runs.py): the debug model (4 layers where a schedule places 2
stages per rank, else 2) in fp32 with
deterministic algorithms, seq 64, global batch 8, compared per step (loss, grad norm) and on the
final weights with a single-process run of the same config. The loss on the pipeline ranks is the
last stage's, all-reduced over the pipeline: a wrong normalization (torch's default grad scaling
by the microbatch count, or a mean instead of the global-token sum) shows as a factor of 2-8.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.pipelining import PipelineStage

from harness import run_on_ranks
from torchtitan_like.components.manifest import complete_steps
from torchtitan_like.distributed.pipeline import V_SCHEDULES, available_schedules
from trainer_runs import LAYOUTS, assert_same_training, assert_state_matches_dry_run, merged_params, series, train_run, trainer_argv

STEPS = 6  # the grad-norm clip (max_norm 1) is active from step 2
SCHEDULE_LAYERS = 4  # a layer for each of the 4 stages of the interleaved and V schedules
# assert_same_training: the tolerances and reasons of test_trainer_parity.py (seen here: loss <= 3e-7,
# grad norm <= 2e-7 relative).

SCHEDULE_RUNS: dict[str, tuple[str, ...]] = {
    # 8 microbatches of 1 per step.
    **{name: ("--parallelism.pipeline_parallel_schedule", name) for name in available_schedules()},
    # Gradient accumulation under PP: 2 schedule steps per optimizer step, each of 2 microbatches of 2.
    "GPipe-accumulating": (
        "--parallelism.pipeline_parallel_schedule", "GPipe",
        "--training.local_batch_size", "4",
        "--parallelism.pipeline_parallel_microbatch_size", "2",
    ),
    # Interleaved with its 4 stages placed by an explicit split (2 virtual stages per rank).
    "Interleaved1F1B-explicit": (
        "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
        "--parallelism.module_fqns_per_model_part",
        "tok_embeddings,layers.0;layers.1;layers.2;layers.3,norm,output",
    ),
}
V_ON_GLOO = hasattr(PipelineStage, "_is_same_rank")
"""False on torch 2.11, where gloo jobs refuse the V schedules (tests/unit/test_pipeline_plan.py checks the error)."""
CSV_RUN = "csv"  # GPipe written out as a CSV: 4 accumulation steps of 2 microbatches of 1


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("reference")
    (ref,) = run_on_ranks(
        train_run, world_size=1, tmp_path=tmp,
        args=(trainer_argv(tmp / "run", "one", steps=STEPS, n_layers=SCHEDULE_LAYERS),)
    )
    assert max(h["grad_norm"] for h in ref["history"]) > 1.0, "the clip must be active for the norm check to bite"
    return ref


def test_every_schedule_matches_one_process(reference: dict, tmp_path: Path) -> None:
    csv = tmp_path / "gpipe.csv"
    csv.write_text("0F0,0F1,0B0,0B1\n1F0,1F1,1B0,1B1\n")
    runs = dict(SCHEDULE_RUNS)
    runs[CSV_RUN] = ("--parallelism.pipeline_parallel_schedule_csv", str(csv), "--training.local_batch_size", "2")
    names = list(runs)
    if not V_ON_GLOO:
        names = [n for n in names if n not in V_SCHEDULES]
    for name in names:
        # One launch per run: a Trainer's process groups are only ever released by ending the process.
        argv = trainer_argv(tmp_path / name, "pp2", *runs[name], steps=STEPS, n_layers=SCHEDULE_LAYERS)
        per_rank = run_on_ranks(train_run, world_size=2, tmp_path=tmp_path, args=(argv,), timeout_s=300)
        for r, out in enumerate(per_rank):
            # The loss is reported on every pp rank, not only where the last stage ran.
            assert_same_training(out, reference, f"{name} (rank {r})")
        assert_same_training(per_rank[0], reference, name, params=merged_params(per_rank))
        stage0 = set(per_rank[0]["params"])
        v_schedule = name in ("ZBVZeroBubble", "DualPipeV")
        # V schedules keep the first and the last stage on rank 0; the others put the output on rank 1.
        assert ("output.weight" in stage0) == v_schedule and "tok_embeddings.weight" in stage0, name


COMPOSED: dict[str, tuple[str, tuple[str, ...]]] = {
    # Interleaved (2 stages per rank, each its own FSDP root), with the last stage's loss chunked over the
    # sequence (its forward stops before `output`, the loss applies it).
    "pp2xfsdp2": ("Interleaved1F1B", ("--training.loss_chunk_size", "16")),
    # Zero bubble: its input backward frees each stage output's graph in place, which a stage under TP once
    # returned as a view (tensor_parallel.py: _settle_stage_output).
    "pp2xtp2": ("InterleavedZeroBubble", ()),
    # 3D on 8 ranks, a V zero-bubble schedule: the first and the last stage on pipeline rank 0, and each
    # stage's FSDP reduce-scatter after the weight backward that the schedule runs last.
    "pp2xfsdp2xtp2": ("ZBVZeroBubble" if V_ON_GLOO else "InterleavedZeroBubble", ()),
}


@pytest.mark.parametrize("layout", list(COMPOSED))
def test_pp_composes_with_fsdp_and_tp(layout: str, reference: dict, tmp_path: Path) -> None:
    world, _ = LAYOUTS[layout]
    schedule, chunk = COMPOSED[layout]
    argv = trainer_argv(
        tmp_path / "run", layout, "--parallelism.pipeline_parallel_schedule", schedule, *chunk, steps=STEPS,
        n_layers=SCHEDULE_LAYERS,
    )
    ranks = run_on_ranks(train_run, world_size=world, tmp_path=tmp_path, args=(argv,), timeout_s=300)
    assert_same_training(ranks[0], reference, layout, params=merged_params(ranks))
    # The 3D layout's ranks all differ (stages, TP and FSDP split each): check every one.
    check = list(range(world)) if world == 8 else [0, world - 1]
    assert_state_matches_dry_run(argv, world, ranks, check_ranks=check)
    # The output projection runs on the last stage's ranks only, on chunks of 16 positions where asked.
    assert sorted({p for r in ranks for p in r["output_positions"]}) == [16 if chunk else 64]
    v = schedule in V_SCHEDULES  # the last stage is on pipeline rank 0 (the first half of the ranks)
    assert [bool(r["output_positions"]) for r in ranks] == [v] * (world // 2) + [not v] * (world // 2)


FEATURES = (
    "--activation_checkpoint.mode", "full",
    "--compile.enable", "--compile.backend", "aot_eager",  # AOT autograd: the joint graph PP runs backward on
    "--model.converters", "float8", "--quantize.linear.float8.emulate",  # CPU float8 matmul: see test_float8_fsdp.py
)


def test_pp_composes_with_ac_compile_and_float8(tmp_path: Path) -> None:
    steps = 4
    (one,) = run_on_ranks(
        train_run, world_size=1, tmp_path=tmp_path, args=(trainer_argv(tmp_path / "one", "one", *FEATURES, steps=steps),)
    )
    ranks = run_on_ranks(
        train_run, world_size=2, tmp_path=tmp_path, timeout_s=300,
        args=(trainer_argv(tmp_path / "pp", "pp2", *FEATURES, steps=steps),),
    )
    # float8 rounds each microbatch's activations with its own scale (amax over 1 sequence here, 8 in
    # the reference): the same training up to that rounding. Seen: loss <= 5e-6, grad norm <= 3e-4.
    torch.testing.assert_close(series(ranks[0]["history"], "loss"), series(one["history"], "loss"), rtol=1e-4, atol=0)
    torch.testing.assert_close(
        series(ranks[0]["history"], "grad_norm"), series(one["history"], "grad_norm"), rtol=2e-3, atol=0
    )


# ---- checkpoints ---------------------------------------------------------------------------------

CKPT = ("--checkpoint.enable", "--checkpoint.interval", "3")
PP_DP = "pp2xfsdp2"


def test_pp_checkpoint_resumes_exactly_and_under_one_process(tmp_path: Path) -> None:
    steps = STEPS

    def run(layout: str, dump: Path, crash_at_step: int | None = None) -> list[dict]:
        world, _ = LAYOUTS[layout]
        argv = trainer_argv(dump, layout, *CKPT, steps=steps)
        return run_on_ranks(train_run, world_size=world, tmp_path=tmp_path, args=(argv, crash_at_step), timeout_s=300)

    straight = run(PP_DP, tmp_path / "straight")
    assert sorted(complete_steps(tmp_path / "straight" / "checkpoint")) == [3, 6]

    # Same layout: crash after step 3's checkpoint, resume, and get every bit of the straight run.
    dump = tmp_path / "crashed"
    crashed = run(PP_DP, dump, crash_at_step=4)
    assert all(r["crashed"] for r in crashed)
    resumed = run(PP_DP, dump)
    for r, out in enumerate(resumed):
        assert out["history"] == straight[r]["history"][3:], f"rank {r}: resumed training differs"
    got, want = merged_params(resumed), merged_params(straight)
    assert got.keys() == want.keys()
    for name, w in want.items():
        assert torch.equal(got[name], w), f"final {name} differs after resume"

    # Another layout: step 3 of the PP x FSDP run, loaded by one process (all names on one rank, whole
    # tensors, one model part instead of one per stage), continues the same training.
    one_dump = tmp_path / "one"
    shutil.copytree(tmp_path / "straight" / "checkpoint" / "step-3", one_dump / "checkpoint" / "step-3")
    (one,) = run("one", one_dump)
    reference = {"history": straight[0]["history"][3:], "params": want}
    assert_same_training(one, reference, "PP(2)xFSDP(2) step 3 -> one process", params=one["params"])
