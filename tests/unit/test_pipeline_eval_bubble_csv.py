"""Pipeline parallel: what torchtitan_like/distributed/pipeline.py once got wrong, each now tested.

1. `PipelinePlan.bubble_fraction()` gives (p-1)/(v*m) for the looped schedules also when m < p, which
   plan_pipeline accepts ("a multiple of p, or < p"); there the bubble is larger.
2. A CSV schedule with communication actions (SEND_F, RECV_B, UNSHARD, REDUCE_GRAD: torch's
   "compute_comms" format) passes plan_pipeline and so the dry run; torch refuses it only in
   build_schedule, after the model is built and materialized.
3. A compute-only CSV with OVERLAP_F_B actions (what torch's own `_dump_csv(format="compute_only")` writes
   for DualPipeV), which torch validates and runs, is refused by plan_pipeline with a wrong reason
   ("stage indices must be 0..N-1 ..., got [-1, 0, 1, 2, 3]").
4. `Pipeline.compute_s()` leaves out the last stage's loss (with training.loss_chunk_size also the output
   projection): torch's schedules compute it outside forward_one_chunk, so the time is logged as waiting.
5. `Pipeline.eval()` reads the CUDA compute clock without synchronizing: torch's Event.elapsed_time
   raises "Both events must be completed" while the GPU still runs the forward it just queued.
6. Validation under PP with a V schedule (ZBVZeroBubble, DualPipeV) was accepted by check_job, and the
   first validation crashed inside torch (now refused at start): its runtime still runs the backward
   actions in eval(), and for the two adjacent stages of a rank it hands the (absent) input gradient
   over in memory: AssertionError "can't steal_bwd_input if this stage doesn't have backward". Seen
   with the real Trainer on 2 gloo ranks.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_pipeline_csv_checks import _build_on_fake_pg
from torch import nn

from torchtitan_like.config.loader import load_config
from torchtitan_like.config.schema import Parallelism
from torchtitan_like.distributed.pipeline import (
    Pipeline,
    PipelinePlan,
    _ComputeClock,
    available_schedules,
    plan_pipeline,
    schedule_switches_modes,
)
from torchtitan_like.errors import ConfigError
from torchtitan_like.trainer import check_job

ROOT = Path(__file__).resolve().parents[2]


def _plan(n_layers: int = 6, local_batch_size: int = 8, **kw) -> PipelinePlan:
    p = Parallelism(pipeline_parallel_degree=kw.pop("pp", 2), **kw)
    return plan_pipeline(p, n_layers=n_layers, local_batch_size=local_batch_size, tie_word_embeddings=False,
                         compile_model=False)


def _csv(tmp_path: Path, rows: list[str]) -> str:
    path = tmp_path / "schedule.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


# ---- 1. bubble formula of the looped schedules with fewer microbatches than ranks --------------------


@pytest.mark.parametrize("schedule", ["Interleaved1F1B", "LoopedBFS"])
def test_looped_bubble_with_fewer_microbatches_than_ranks(schedule: str) -> None:
    # Each rank runs v*m chunks of 1/v of a stage's work. With m < p a round of microbatches cannot fill
    # the loop: the last microbatch enters stage 0 at (m-1)/v and crosses all v*p stages (1/v each), so a
    # forward (and likewise a backward) pass lasts (v*p + m - 1)/v against m of work per rank. Replaying
    # torch's own action order for these schedules (Interleaved1F1B, LoopedBFS) with the F -> F and
    # B <- B dependencies between stages gives the same numbers: 1.0 (p=2, m=1), 1.25 (p=4, m=2),
    # 3.0 (p=4, m=1), 0.667 (p=4, m=3), and (p-1)/(v*m) from m = p on.
    assert _plan(pp=4, local_batch_size=4, pipeline_parallel_schedule=schedule).bubble_fraction() == pytest.approx(3 / 8)
    cases = [(2, 1, 1.0), (4, 2, 1.25), (4, 1, 3.0), (4, 3, 2 / 3)]
    for pp, m, want in cases:
        plan = _plan(pp=pp, local_batch_size=m, pipeline_parallel_schedule=schedule)
        assert plan.stages_per_rank == 2 and plan.n_microbatches == m
        assert plan.bubble_fraction() == pytest.approx(want), (schedule, pp, m)


# ---- 2. a CSV with communication actions ------------------------------------------------------------

# GPipe over 2 ranks, 2 microbatches, written with its sends and receives (torch's "compute_comms" format,
# the default of _PipelineScheduleRuntime._dump_csv).
COMMS_ROWS = [
    "0F0,0SEND_F0,0F1,0SEND_F1,0RECV_B0,0B0,0RECV_B1,0B1",
    "1RECV_F0,1F0,1RECV_F1,1F1,1B0,1SEND_B0,1B1,1SEND_B1",
]




@pytest.mark.parametrize("rows", [COMMS_ROWS, ["0F0,0F1,0B0,0B1,0REDUCE_GRAD", "1F0,1F1,1B0,1B1"]],
                         ids=["send-recv", "reduce-grad"])
def test_csv_with_communication_actions_is_refused_before_the_model(tmp_path: Path, rows: list[str]) -> None:
    path = _csv(tmp_path, rows)
    p = Parallelism(pipeline_parallel_degree=2, pipeline_parallel_schedule_csv=path)
    try:
        plan = plan_pipeline(p, n_layers=6, local_batch_size=2, tie_word_embeddings=False, compile_model=False)
    except ConfigError as e:
        assert "pipeline_parallel_schedule_csv" in str(e)
        return
    # What the real run then meets, once the model is built: torch's compute-only loader refuses it.
    with pytest.raises(ConfigError, match="torch refused the schedule: Expected compute-only schedule"):
        _build_on_fake_pg(plan, 0)
    pytest.fail("plan_pipeline accepted a CSV that build_schedule refuses")


# ---- 3. a compute-only CSV with OVERLAP_F_B actions -----------------------------------------------------

# torch 2.13's own DualPipeV (pp 2, 4 microbatches), dumped with _dump_csv(format="compute_only"). Run through
# _PipelineScheduleRuntime._load_csv on 2 gloo ranks, it trains (gradients equal to one process to 2e-7).
DUALPIPEV_ROWS = [
    "0F0,0F1,0F2,3F0,3I0,3W0,3F1,(0F3;3B1)OVERLAP_F_B,(3F2;0B0)OVERLAP_F_B,3B2,(3F3;0B1)OVERLAP_F_B,3B3,0I2,0W2,"
    "0I3,0W3",
    "1F0,2F0,1F1,2F1,1F2,2B0,(2F2;1B0)OVERLAP_F_B,(1F3;2B1)OVERLAP_F_B,(2F3;1B1)OVERLAP_F_B,2B2,1B2,2I3,1I3,2W3,1W3",
]


def test_csv_with_overlapped_actions_is_accepted(tmp_path: Path) -> None:
    from torch.distributed.pipelining.schedules import _Action, _validate_schedule

    path = _csv(tmp_path, DUALPIPEV_ROWS)
    actions = {r: [_Action.from_str(c) for c in row.split(",")] for r, row in enumerate(DUALPIPEV_ROWS)}
    assert _validate_schedule(actions, 2, 4, 4) == {0: 0, 1: 1, 2: 1, 3: 0}  # torch's own check accepts it
    p = Parallelism(pipeline_parallel_degree=2, pipeline_parallel_schedule_csv=path)
    plan = plan_pipeline(p, n_layers=6, local_batch_size=4, tie_word_embeddings=False, compile_model=False)
    assert plan.stage_ranks == (0, 1, 1, 0) and plan.n_microbatches == 4


# ---- 4. and 5. the compute clock ----------------------------------------------------------------------


def _single_rank_pipeline(loss_fn) -> Pipeline:
    """A one-stage GPipe Pipeline on this process (a world of 1), over a small Linear."""
    plan = PipelinePlan(
        schedule="GPipe", csv_path=None, pp=1, fqns_per_stage=(("linear",),), stage_ranks=(0,),
        microbatch_size=1, n_microbatches=2,
    )
    torch.manual_seed(0)
    return Pipeline(plan, pp_rank=0, parts=[nn.Linear(4, 4)], pp_group=dist.group.WORLD,
                    device=torch.device("cpu"), loss_fn=loss_fn)


LOSS_S = 0.1


def _slow_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    time.sleep(LOSS_S)  # stands for the last stage's loss work (output projection + cross entropy)
    return ((out - target) ** 2).sum()


def test_compute_clock_counts_the_last_stage_loss() -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        pipe = _single_rank_pipeline(_slow_loss)
        losses: list[torch.Tensor] = []
        pipe.step(torch.randn(2, 4), torch.randn(2, 4), losses, denominator=1.0)
        assert len(losses) == 2  # the loss ran once per microbatch (a sleep of LOSS_S each)
        assert pipe.compute_s() >= 2 * LOSS_S
    finally:
        dist.destroy_process_group()


class _FakeCudaEvents:
    """torch.cuda.Event as the GPU sees it: elapsed_time raises (as c10's CUDAEvent does) unless a
    torch.cuda.synchronize() came after the events were recorded."""

    def __init__(self) -> None:
        self.synchronized = True
        outer = self

        class Event:
            def __init__(self, enable_timing: bool = False) -> None:
                pass

            def record(self, stream=None) -> None:
                outer.synchronized = False  # queued work: not complete until the host synchronizes

            def elapsed_time(self, other) -> float:
                if not outer.synchronized:
                    raise RuntimeError("Both events must be completed before calculating elapsed time.")
                return 1.0

        self.Event = Event

    def synchronize(self, *args, **kwargs) -> None:
        self.synchronized = True


def test_eval_does_not_read_unfinished_cuda_events(monkeypatch) -> None:
    fake = _FakeCudaEvents()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        pipe = _single_rank_pipeline(lambda out, target: ((out - target) ** 2).sum())
        # The clock as it runs on a CUDA device (the stages and the schedule stay on the CPU here).
        clock = _ComputeClock(torch.device("cuda"))
        pipe.clock = clock
        for stage in pipe.stages:
            stage.clock = clock
        monkeypatch.setattr(torch.cuda, "Event", fake.Event)
        monkeypatch.setattr(torch.cuda, "synchronize", fake.synchronize)
        # The training path synchronizes before it reads the clock (trainer._pipeline_forward_backward):
        pipe.step(torch.randn(2, 4), torch.randn(2, 4), [], denominator=1.0)
        fake.synchronize()
        assert pipe.compute_s() > 0
        # Validation calls eval() and then nothing that synchronizes before eval() reads the clock.
        losses: list[torch.Tensor] = []
        with torch.no_grad():
            pipe.eval(torch.randn(2, 4), torch.randn(2, 4), losses)
        assert len(losses) == 2
    finally:
        dist.destroy_process_group()


# ---- 6. validation through a V schedule ------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["ZBVZeroBubble", "DualPipeV"])
def test_validation_through_a_v_schedule_is_refused(schedule: str) -> None:
    if schedule not in available_schedules():
        pytest.skip(f"torch {torch.__version__} has no {schedule}")
    if not schedule_switches_modes():
        pytest.skip(f"torch {torch.__version__} refuses validation under PP altogether")
    argv = [
        "--job.config_file", str(ROOT / "train_configs/debug_model.toml"), "--training.dataset", "synthetic",
        "--training.seq_len", "64", "--training.local_batch_size", "4",
        "--parallelism.pipeline_parallel_degree", "2", "--parallelism.pipeline_parallel_schedule", schedule,
        "--validation.enable", "--validation.dataset", "synthetic", "--validation.steps", "1",
        "--validation.seq_len", "64", "--validation.local_batch_size", "4",
    ]
    cfg = load_config(argv)
    with pytest.raises(ConfigError, match=rf"validation.enable=true with parallelism.pipeline_parallel_schedule="
                                          rf"'{schedule}': stages 1 and 2 run on the same rank"):
        check_job(cfg, 2)
    # Without validation the same layout is fine.
    check_job(load_config([*argv, "--validation.no_enable"]), 2)
