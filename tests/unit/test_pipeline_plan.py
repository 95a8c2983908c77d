"""Pipeline planning without a process group: splits, stage placement, schedule names, microbatch
rules, bubble formulas, and every configuration error naming its keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from torchtitan_like.components.validation import check_layout
from torchtitan_like.config.loader import load_config
from torchtitan_like.config.schema import Parallelism, Training, Validation
from torchtitan_like.distributed.pipeline import (
    KNOWN_SCHEDULES,
    available_schedules,
    check_schedule_backend,
    plan_pipeline,
    resolve_schedule_name,
    split_fqns,
    split_model,
)
from torchtitan_like.errors import ConfigError
from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS as FLAVORS
from torchtitan_like.models.llama3.model import Transformer

ROOT = Path(__file__).resolve().parents[2]


def _plan(n_layers: int = 6, local_batch_size: int = 8, *, tied: bool = False, compile_model: bool = False,
          op_ac: bool = False, **kw):
    p = Parallelism(pipeline_parallel_degree=kw.pop("pp", 2), **kw)
    return plan_pipeline(
        p, n_layers=n_layers, local_batch_size=local_batch_size, tie_word_embeddings=tied, compile_model=compile_model,
        op_ac=op_ac,
    )


def _layers(plan) -> list[int]:
    return [sum(f.startswith("layers.") for f in fqns) for fqns in plan.fqns_per_stage]


# ---- splitting ---------------------------------------------------------------------------------


def test_default_split_counts_embedding_and_output_as_a_layer() -> None:
    plan = _plan(pipeline_parallel_schedule="1F1B")
    assert plan.fqns_per_stage == (
        ("tok_embeddings", "layers.0", "layers.1", "layers.2"),
        ("layers.3", "layers.4", "layers.5", "norm", "output"),
    )
    assert plan.stage_ranks == (0, 1) and plan.n_microbatches == 8


def test_leftover_work_goes_to_middle_stages() -> None:
    # 8 layers + 1 + 1 over 4 stages: 10 units = 2, 3, 3, 2 -> layers 1, 3, 3, 1.
    fqns = split_fqns(8, 4)
    assert [sum(f.startswith("layers.") for f in s) for s in fqns] == [1, 3, 3, 1]
    assert fqns[0][0] == "tok_embeddings" and fqns[-1][-2:] == ["norm", "output"]
    assert [f for s in fqns for f in s if f.startswith("layers.")] == [f"layers.{i}" for i in range(8)]


def test_less_layers_keys_move_layers_off_the_ends() -> None:
    assert [len([f for f in s if f.startswith("layers.")]) for s in split_fqns(6, 2, first_less=0, last_less=0)] == [3, 3]
    assert [len([f for f in s if f.startswith("layers.")]) for s in split_fqns(6, 2, first_less=2, last_less=0)] == [2, 4]


def test_interleaved_defaults_to_two_stages_per_rank_looped() -> None:
    plan = _plan(pipeline_parallel_schedule="interleaved1f1b")  # names are case-insensitive
    assert plan.schedule == "Interleaved1F1B"
    assert plan.num_stages == 4 and plan.stages_per_rank == 2
    assert plan.stage_ranks == (0, 1, 0, 1)
    assert plan.stage_ids(0) == [0, 2] and plan.stage_ids(1) == [1, 3]
    assert _layers(plan) == [1, 2, 2, 1]


@pytest.mark.parametrize("schedule", ["ZBVZeroBubble", "DualPipeV"])
def test_v_schedules_put_first_and_last_stage_on_rank_zero(schedule: str) -> None:
    if schedule not in available_schedules():
        pytest.skip(f"torch {torch.__version__} has no {schedule}")
    plan = _plan(pipeline_parallel_schedule=schedule)
    assert plan.stage_ranks == (0, 1, 1, 0)
    assert plan.stage_ids(0) == [0, 3]


def test_v_schedules_on_gloo_need_stages_that_hand_over_in_memory(monkeypatch) -> None:
    from torch.distributed.pipelining import PipelineStage

    plan = _plan(pipeline_parallel_schedule="ZBVZeroBubble")
    check_schedule_backend(plan, "cuda")  # NCCL sends to its own rank
    check_schedule_backend(_plan(pipeline_parallel_schedule="Interleaved1F1B"), "cpu")  # looped: no same-rank pair
    if torch.__version__ >= "2.13":
        # What the check detects, on the class our stages subclass (not on _PipelineStageBase, which
        # never has it: looking there refused V schedules on 2.13 too).
        assert hasattr(PipelineStage, "_is_same_rank")
    if hasattr(PipelineStage, "_is_same_rank"):
        check_schedule_backend(plan, "cpu")
        monkeypatch.delattr(PipelineStage, "_is_same_rank")  # as torch 2.11
    with pytest.raises(ConfigError, match=r"pipeline_parallel_schedule='ZBVZeroBubble' on CPU \(gloo\) needs torch "
                                          r">= 2\.12: .* use a looped schedule"):
        check_schedule_backend(plan, "cpu")


def test_layers_per_stage_sets_the_stage_count() -> None:
    # 6 layers + 1 + 1 = 8 units, 2 per stage -> 4 stages, 2 per rank.
    plan = _plan(pipeline_parallel_schedule="Interleaved1F1B", pipeline_parallel_layers_per_stage=2)
    assert plan.num_stages == 4 and _layers(plan) == [1, 2, 2, 1]


def test_explicit_split_is_used_as_given() -> None:
    parts = [["tok_embeddings", "layers.0"], ["layers.1", "layers.2", "layers.3", "layers.4", "layers.5", "norm", "output"]]
    plan = _plan(module_fqns_per_model_part=parts)
    assert [list(s) for s in plan.fqns_per_stage] == parts


def test_split_model_keeps_parameter_names() -> None:
    args = FLAVORS["debugmodel"].with_seq_len(32)
    with torch.device("meta"):
        whole = Transformer(args)
    plan = _plan(pipeline_parallel_schedule="Interleaved1F1B")
    names = []
    for fqns in plan.fqns_per_stage:
        part = split_model(whole, fqns)
        names += [n for n, _ in part.named_parameters()]
        assert (part.tok_embeddings is not None) == ("tok_embeddings" in fqns)
        assert (part.output is not None) == ("output" in fqns)
    assert sorted(names) == sorted(n for n, _ in whole.named_parameters())
    assert len(whole.layers) == 6  # the whole model is untouched


# ---- bubble formulas -----------------------------------------------------------------------------


def test_bubble_fractions() -> None:
    assert _plan(pipeline_parallel_schedule="GPipe").bubble_fraction() == pytest.approx(1 / 8)  # (p-1)/m
    assert _plan(pipeline_parallel_schedule="1F1B", pp=4).bubble_fraction() == pytest.approx(3 / 8)
    # (p-1)/(v*m) with v=2
    assert _plan(pipeline_parallel_schedule="Interleaved1F1B").bubble_fraction() == pytest.approx(1 / 16)
    assert _plan(pipeline_parallel_schedule="ZBVZeroBubble").bubble_fraction() == 0.0
    assert "theoretical bubble 0.125 = (p-1)/m" in _plan(pipeline_parallel_schedule="GPipe").describe()


# ---- schedules -----------------------------------------------------------------------------------


def test_every_schedule_of_the_issue_is_available_on_this_torch() -> None:
    assert set(available_schedules()) >= set(KNOWN_SCHEDULES) - {"DualPipeV"}


def test_unknown_schedule_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as e:
        resolve_schedule_name("OneFOneB")
    msg = str(e.value)
    assert "parallelism.pipeline_parallel_schedule='OneFOneB' is not a schedule of the installed torch" in msg
    for name in available_schedules():
        assert name in msg


# ---- errors ------------------------------------------------------------------------------------


def _error(**kw) -> str:
    with pytest.raises(ConfigError) as e:
        _plan(**kw)
    return str(e.value)


def test_more_stages_than_layers() -> None:
    # The embedding and norm + output can be stages of their own: 2 layers make at most 4 stages.
    assert _layers(_plan(n_layers=2, pp=4)) == [0, 1, 1, 0]
    msg = _error(n_layers=2, pp=5)
    assert "a pipeline of 5 stages over a model with 2 layers" in msg and "at most 4 stages" in msg


def test_less_layers_too_large() -> None:
    msg = _error(pipeline_parallel_first_stage_less_layers=8)
    assert "leaves first stage" in msg and "pipeline_parallel_first_stage_less_layers=8" in msg


def test_stages_must_divide_over_ranks() -> None:
    # 8 units / 3 per stage -> 3 stages over 2 ranks
    msg = _error(pipeline_parallel_schedule="Interleaved1F1B", pipeline_parallel_layers_per_stage=3)
    assert "3 stages, which do not divide over pipeline_parallel_degree=2" in msg


def test_single_stage_schedule_with_virtual_stages() -> None:
    msg = _error(pipeline_parallel_schedule="1F1B", pipeline_parallel_layers_per_stage=2)
    assert "pipeline_parallel_schedule='1F1B' runs one stage per rank, but the split has 2 per rank" in msg


def test_v_schedule_needs_two_stages_per_rank() -> None:
    msg = _error(pipeline_parallel_schedule="ZBVZeroBubble", pipeline_parallel_layers_per_stage=4)
    assert "needs exactly 2 stages per rank" in msg


@pytest.mark.parametrize(
    "parts, expected",
    [
        ([["tok_embeddings", "layers.0"], ["layers.1", "layers.9", "norm", "output"]], "'layers.9' (stage 1) is not a module"),
        ([["tok_embeddings", "layers.0", "layers.1", "layers.2"], ["layers.2", "layers.3", "layers.4", "layers.5", "norm", "output"]], "'layers.2' is in stage 0 and stage 1"),
        ([["tok_embeddings", "layers.0", "layers.1", "layers.2"], ["layers.3", "layers.4", "norm", "output"]], "no stage owns layers.5"),
        ([["layers.3", "layers.4", "layers.5", "norm", "output"], ["tok_embeddings", "layers.0", "layers.1", "layers.2"]], "must follow the model's order"),
        ([[], ["tok_embeddings"]], "stage 0 is empty"),
    ],
)
def test_explicit_split_errors(parts: list[list[str]], expected: str) -> None:
    msg = _error(module_fqns_per_model_part=parts)
    assert msg.startswith("parallelism.module_fqns_per_model_part: ") and expected in msg


def test_explicit_split_and_layers_per_stage_conflict() -> None:
    msg = _error(module_fqns_per_model_part=[["tok_embeddings"]], pipeline_parallel_layers_per_stage=2)
    assert "both set the split" in msg


def test_microbatch_size_must_divide_local_batch() -> None:
    msg = _error(local_batch_size=6, pipeline_parallel_microbatch_size=4)
    assert "training.local_batch_size=6 must be a multiple of parallelism.pipeline_parallel_microbatch_size=4" in msg
    assert msg.endswith("try a microbatch size of 1, 2 or 3")  # 6 would leave 1 microbatch for 2 ranks


def test_1f1b_needs_a_microbatch_per_stage() -> None:
    msg = _error(pp=4, local_batch_size=2, pipeline_parallel_schedule="1F1B")
    assert "pipeline_parallel_schedule='1F1B' needs at least 4 microbatches" in msg and "gives 2" in msg


def test_interleaved_microbatches_must_fill_rounds() -> None:
    # 5 microbatches on 2 ranks make 2 rounds of 2.5; 3 (one round) or 4 and 6 (2 and 3 rounds of 2) are torch's.
    msg = _error(pp=2, local_batch_size=5, pipeline_parallel_schedule="Interleaved1F1B")
    assert "needs a microbatch count that fills its rounds evenly (m // pipeline_parallel_degree=2 rounds: e.g. 4 or " \
           "6 microbatches)" in msg and "gives 5" in msg
    msg = _error(pp=4, local_batch_size=9, pipeline_parallel_schedule="InterleavedZeroBubble")
    assert "e.g. 8 or 10 microbatches" in msg  # (10 is 2 rounds of 5: not a multiple of 4, and torch runs it)
    for accepted in (3, 7, 10):  # fewer than pp = 4; one round of 7; two rounds of 5
        _plan(pp=4, local_batch_size=accepted, pipeline_parallel_schedule="Interleaved1F1B")


@pytest.mark.parametrize("schedule", ["InterleavedZeroBubble", "ZBVZeroBubble"])
def test_compile_with_zero_bubble_is_refused(schedule: str) -> None:
    msg = _error(pipeline_parallel_schedule=schedule, compile_model=True)
    assert f"pipeline_parallel_schedule={schedule!r} cannot run a compiled model" in msg and "compile.enable=false" in msg
    _plan(pipeline_parallel_schedule="1F1B", compile_model=True)  # works with the others


@pytest.mark.parametrize("schedule", ["InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"])
def test_op_level_ac_with_split_backward_is_refused(schedule: str) -> None:
    """torch's op-level (selective) checkpoint allows one backward per region; a zero-bubble schedule's
    weight-gradient pass is a second one, and the run crashed at its first step."""
    msg = _error(pipeline_parallel_schedule=schedule, op_ac=True)
    assert f"pipeline_parallel_schedule={schedule!r} cannot run activation_checkpoint.selective_ac_option=\"op\"" in msg
    assert 'mode="full"' in msg and "1F1B" in msg
    _plan(pipeline_parallel_schedule="Interleaved1F1B", op_ac=True)  # works with the others


def test_the_job_check_refuses_op_level_ac_with_a_zero_bubble_schedule() -> None:
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.trainer import check_job

    argv = ["--job.config_file", str(ROOT / "train_configs" / "debug_model.toml"),
            "--parallelism.pipeline_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1",
            "--parallelism.pipeline_parallel_schedule", "InterleavedZeroBubble", "--training.local_batch_size", "4",
            "--activation_checkpoint.mode", "selective"]
    with pytest.raises(ConfigError, match='selective_ac_option="op"'):
        check_job(load_config([*argv, "--activation_checkpoint.selective_ac_option", "op"]), 2)
    check_job(load_config([*argv, "--activation_checkpoint.selective_ac_option", "2"]), 2)


def test_tied_embeddings_are_refused() -> None:
    assert "ties tok_embeddings and output" in _error(tied=True)


def test_validation_under_pp_needs_the_training_shape(monkeypatch) -> None:
    switches = "torchtitan_like.components.validation.schedule_switches_modes"
    monkeypatch.setattr(switches, lambda: True)  # the torch 2.13 behaviour, whatever torch runs this
    training = Training(seq_len=64, local_batch_size=4)
    check_layout(Validation(enable=True, seq_len=64, local_batch_size=4), tp=1, cp=1, pp=2, training=training)
    with pytest.raises(ConfigError, match=r"validation.seq_len=128 and validation.local_batch_size=4 must equal "
                                          r"training.seq_len=64 and training.local_batch_size=4"):
        check_layout(Validation(enable=True, seq_len=128, local_batch_size=4), tp=1, cp=1, pp=2, training=training)
    check_layout(Validation(enable=True, seq_len=64, local_batch_size=4), tp=1, cp=2, pp=2, training=training)
    # A torch whose schedules cannot switch between training and eval (2.11) is refused by name.
    monkeypatch.setattr(switches, lambda: False)
    with pytest.raises(ConfigError, match=r"needs pipeline schedules that switch between training and forward-only "
                                          r"steps, which torch .* lacks"):
        check_layout(Validation(enable=True, seq_len=64, local_batch_size=4), tp=1, cp=1, pp=2, training=training)


# ---- custom CSV schedule ---------------------------------------------------------------------------


def _csv(tmp_path: Path, rows: list[str]) -> str:
    path = tmp_path / "schedule.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_csv_schedule_places_stages_as_its_rows_say(tmp_path: Path) -> None:
    path = _csv(tmp_path, ["0F0,0F1,0B0,0B1", "1F0,1F1,1B0,1B1"])
    plan = _plan(local_batch_size=2, pipeline_parallel_schedule_csv=path)
    assert plan.schedule == "csv" and plan.stage_ranks == (0, 1) and plan.bubble_fraction() is None


@pytest.mark.parametrize(
    "rows, expected",
    [
        (["0F0,0B0"], "has 1 rows but pipeline_parallel_degree=2"),
        (["0F0,0F1,0B0,0B1", "1F0,1F1,1B0,1B1,0F0"], "stage 0 appears on ranks [0, 1]"),
        (["0F0,0B0", "1F0,1B0"], "schedules 1 microbatches but"),
        (["0F0,0F1,0B0,0B1", "1X0"], "row 2: cannot parse action '1X0'"),
    ],
)
def test_csv_errors(tmp_path: Path, rows: list[str], expected: str) -> None:
    msg = _error(local_batch_size=2, pipeline_parallel_schedule_csv=_csv(tmp_path, rows))
    assert "parallelism.pipeline_parallel_schedule_csv" in msg and expected in msg


def test_missing_csv() -> None:
    assert "no such file" in _error(pipeline_parallel_schedule_csv="/nonexistent/schedule.csv")


# ---- config ----------------------------------------------------------------------------------------


def test_explicit_split_on_the_command_line() -> None:
    cfg = load_config([
        "--job.config_file", str(ROOT / "train_configs/debug_model.toml"),
        "--parallelism.module_fqns_per_model_part", "tok_embeddings,layers.0;layers.1,norm,output",
    ])
    assert cfg.parallelism.module_fqns_per_model_part == [["tok_embeddings", "layers.0"], ["layers.1", "norm", "output"]]
