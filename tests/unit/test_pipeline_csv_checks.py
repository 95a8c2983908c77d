"""Custom CSV pipeline schedules (parallelism.pipeline_parallel_schedule_csv) that cannot run are refused
by plan_pipeline, so by the dry run and before the model is built.

plan_pipeline once only parsed the CSV (rows = pp ranks, stage indices, microbatch indices, one rank
per stage). Three problems followed:

1. a CSV that leaves a pp rank without any stage is accepted; the dry run reports "OK" with 0 bytes
   for that rank, and the real run crashes on it with an IndexError traceback in build_schedule
   (torch's schedule reads stages[0]), not a ConfigError;
2. a CSV whose actions torch refuses (e.g. a backward before its forward) passes plan_pipeline and the
   whole dry run: torch validates it only in build_schedule, which the dry run never calls and the real
   run calls after the model is built and materialized;
3. a CSV with split backward actions (I / W, a zero-bubble schedule) is accepted with compiled blocks,
   although the README refuses compiled blocks with the zero-bubble schedules; with the trainer's
   per-block torch.compile the first step fails inside torch ("donated buffers ... retain_graph").
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage
from torch import nn

from torchtitan_like.config.schema import Parallelism
from torchtitan_like.distributed.pipeline import build_schedule, plan_pipeline, split_model
from torchtitan_like.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

# Evidence tests run two stages on one rank in this process: torch < 2.12 sends between them, which gloo
# cannot ("Pair is not connected"); from 2.12 they hand over in memory.
needs_same_rank_handover = pytest.mark.skipif(
    not hasattr(PipelineStage, "_is_same_rank"),
    reason="torch < 2.12 sends between a rank's own two stages, which gloo cannot",
)


def _csv(tmp_path: Path, rows: list[str]) -> str:
    path = tmp_path / "schedule.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def _plan(csv_path: str, *, pp: int, local_batch_size: int = 1, compile_model: bool = False):
    p = Parallelism(pipeline_parallel_degree=pp, pipeline_parallel_schedule_csv=csv_path)
    return plan_pipeline(
        p, n_layers=6, local_batch_size=local_batch_size, tie_word_embeddings=False, compile_model=compile_model
    )


def _dry_run_argv(csv_path: str, pp: int) -> list[str]:
    return [
        "--job.config_file", str(ROOT / "train_configs/debug_model.toml"), "--training.dataset", "synthetic",
        "--training.seq_len", "64", "--training.local_batch_size", "1",
        "--parallelism.pipeline_parallel_degree", str(pp), "--parallelism.pipeline_parallel_schedule_csv", csv_path,
    ]


# ---- 1. a pp rank without a stage ----------------------------------------------------------------

# Rank 0 runs stages 0 and 1, rank 1 stage 2, rank 2 nothing (an empty row).
IDLE_RANK_ROWS = ["0F0,1F0,1B0,0B0", "2F0,2B0", ""]


def test_csv_with_an_idle_rank_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"pipeline_parallel_schedule_csv=.* gives pipeline rank\(s\) \[2\] no stage"):
        _plan(_csv(tmp_path, IDLE_RANK_ROWS), pp=3)


# ---- 2. a CSV torch refuses passes every pre-model check and the dry run --------------------------

BACKWARD_BEFORE_FORWARD = ["0B0,0F0", "1F0,1B0"]


def _build_on_fake_pg(plan, rank: int) -> None:
    from torch.distributed.pipelining import PipelineStage
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=plan.pp)
    try:
        stages = [
            PipelineStage(nn.Linear(2, 2), s, plan.num_stages, torch.device("cpu"), group=dist.group.WORLD)
            for s in plan.stage_ids(rank)
        ]
        build_schedule(plan, stages, loss_fn=lambda out, target: out.sum())
    finally:
        dist.destroy_process_group()


def test_csv_torch_refuses_is_refused_before_the_model(tmp_path: Path) -> None:
    path = _csv(tmp_path, BACKWARD_BEFORE_FORWARD)
    with pytest.raises(ConfigError, match="torch refuses it: .*without first running Forward"):
        _plan(path, pp=2)
    # The dry run fails the same way (it plans with the same code).
    from torchtitan_like.dry_run import dry_run

    with pytest.raises(ConfigError, match="torch refuses it"):
        dry_run(_dry_run_argv(path, 2), world_size=2, rank=0, device="cuda", files=False)


# ---- 3. split-backward (zero-bubble) CSV with compiled blocks -------------------------------------

# Two stages on one rank (so the evidence runs in this process), backward split into I and W.
ZERO_BUBBLE_ROWS = ["0F0,1F0,0F1,1F1,1I0,0I0,1W0,0W0,1I1,0I1,1W1,0W1"]


@needs_same_rank_handover
def test_compiled_blocks_fail_under_a_split_backward_csv(tmp_path: Path) -> None:
    """Why it is refused: the trainer's per-block compile + a CSV with I/W actions fails at the first step."""
    from torch.distributed.pipelining import schedules

    from torchtitan_like.distributed.compile import apply_compile
    from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS
    from torchtitan_like.models.llama3.model import Transformer

    path = _csv(tmp_path, ZERO_BUBBLE_ROWS)
    torch.manual_seed(0)
    whole = Transformer(LLAMA3_FLAVORS["debugmodel"].with_seq_len(16))
    with torch.no_grad():
        whole.init_weights(0, buffer_device=torch.device("cpu"))
    fqns = [["tok_embeddings", "layers.0", "layers.1", "layers.2"], ["layers.3", "layers.4", "layers.5", "norm", "output"]]
    parts = [split_model(whole, f) for f in fqns]
    for part in parts:
        apply_compile(part, backend="aot_eager")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        stages = [PipelineStage(p, i, 2, torch.device("cpu"), group=dist.group.WORLD) for i, p in enumerate(parts)]

        def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(out.flatten(0, 1).float(), target.flatten())

        sched = schedules._PipelineScheduleRuntime(stages, n_microbatches=2, loss_fn=loss_fn, scale_grads=False)
        sched._load_csv(path, format="compute_only")
        x, y = torch.randint(0, 2000, (2, 16)), torch.randint(0, 2000, (2, 16))
        with pytest.raises(RuntimeError, match="stage backward input|donated buffers"):  # (2.13 | 2.12 wording)
            sched.step(x, target=y, losses=[])
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()


def test_compiled_blocks_with_a_split_backward_csv_are_refused(tmp_path: Path) -> None:
    # The same refusal the named zero-bubble schedules get (COMPILE_INCOMPATIBLE).
    rows = ["0F0,0F1,0I0,0W0,0I1,0W1", "1F0,1F1,1I0,1W0,1I1,1W1"]
    path = _csv(tmp_path, rows)
    with pytest.raises(ConfigError, match="cannot run a compiled model .*I/W actions split each backward"):
        _plan(path, pp=2, local_batch_size=2, compile_model=True)
    p = Parallelism(pipeline_parallel_degree=2, pipeline_parallel_schedule_csv=path)
    with pytest.raises(ConfigError, match="cannot run a compiled loss"):
        plan_pipeline(p, n_layers=6, local_batch_size=2, tie_word_embeddings=False, compile_model=False,
                      compile_loss=True)
    assert _plan(path, pp=2, local_batch_size=2).schedule == "csv"  # uncompiled it is fine


def test_a_csv_with_adjacent_stages_on_one_rank_needs_in_memory_handover_on_gloo(tmp_path: Path, monkeypatch) -> None:
    """As the V schedules: on torch 2.11 a CSV putting stages 0 and 1 on one rank crashed on CPU at the first
    step (gloo cannot send to its own rank); refused at start there, with the fix."""
    from torchtitan_like.distributed.pipeline import check_schedule_backend

    rows = ["0F0,1F0,1B0,0B0,3F0,3B0", "2F0,2B0"]  # rank 0: stages 0 and 1 (adjacent), and 3
    plan = _plan(_csv(tmp_path, rows), pp=2)
    check_schedule_backend(plan, "cuda")
    if hasattr(PipelineStage, "_is_same_rank"):
        check_schedule_backend(plan, "cpu")
        monkeypatch.delattr(PipelineStage, "_is_same_rank")  # as torch 2.11
    with pytest.raises(ConfigError, match=r"pipeline_parallel_schedule_csv=.* \(stages 0 and 1 on one rank\) on CPU "
                                          r"\(gloo\) needs torch >= 2\.12"):
        check_schedule_backend(plan, "cpu")
