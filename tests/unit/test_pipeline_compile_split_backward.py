"""A compiled loss with a zero-bubble pipeline schedule is refused before anything is built.

plan_pipeline refuses compiled blocks with InterleavedZeroBubble / ZBVZeroBubble / DualPipeV
(COMPILE_INCOMPATIBLE), because those schedules split each backward into an input part and a weight
part. `compile.components = ["loss"]` was once accepted (and the refusal even suggested it); yet the
loss runs inside the schedule on the last stage,
and its input-gradient backward (torch's stage_backward_input: autograd.grad(..., retain_graph=True))
goes through the compiled loss's backward, which torch refuses ("compiled with non-empty donated
buffers which requires ... retain_graph=False"), as the first test shows on torch's own schedule.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from test_pipeline_csv_checks import needs_same_rank_handover
from torchtitan_like.config.loader import load_config
from torchtitan_like.errors import ConfigError
from torchtitan_like.trainer import check_job

ROOT = Path(__file__).resolve().parents[2]


def _cfg(*components: str):
    argv = [
        "--job.config_file", str(ROOT / "train_configs/debug_model.toml"), "--training.dataset", "synthetic",
        "--training.seq_len", "64", "--training.local_batch_size", "2",
        "--parallelism.pipeline_parallel_degree", "2",
        "--parallelism.pipeline_parallel_schedule", "InterleavedZeroBubble",
        "--compile.enable", "true", "--compile.components", ",".join(components),
    ]
    return load_config(argv)


@needs_same_rank_handover
def test_compiled_loss_fails_under_a_zero_bubble_schedule() -> None:
    """Why it is refused: torch's InterleavedZeroBubble cannot run a compiled loss (it runs the plain one).
    Should this start to pass the `raises` below, the refusal can be lifted."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining import schedules

    from torchtitan_like.components.loss import cross_entropy_sum
    from torchtitan_like.distributed.compile import compile_loss
    from torchtitan_like.distributed.pipeline import split_model
    from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS
    from torchtitan_like.models.llama3.model import Transformer

    # The same schedule class, loss and stage split the trainer uses; two stages on one rank so that it
    # runs in this process. Uncompiled, the step runs; with the compiled loss it fails.
    torch.manual_seed(0)
    whole = Transformer(LLAMA3_FLAVORS["debugmodel"].with_seq_len(16))
    with torch.no_grad():
        whole.init_weights(0, buffer_device=torch.device("cpu"))
    fqns = [["tok_embeddings", "layers.0", "layers.1", "layers.2"], ["layers.3", "layers.4", "layers.5", "norm", "output"]]
    x, y = torch.randint(0, 2000, (2, 16)), torch.randint(0, 2000, (2, 16))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for compiled in (False, True):
            loss = compile_loss(cross_entropy_sum, backend="aot_eager") if compiled else cross_entropy_sum
            parts = [split_model(whole, f) for f in fqns]
            stages = [PipelineStage(p, i, 2, torch.device("cpu"), group=dist.group.WORLD) for i, p in enumerate(parts)]
            sched = schedules.ScheduleInterleavedZeroBubble(
                stages, n_microbatches=2, loss_fn=lambda out, target: loss(out, target) / 32.0, scale_grads=False
            )
            if not compiled:
                sched.step(x, target=y, losses=[])
                assert all(p.grad is not None for part in parts for p in part.parameters())
            else:
                # torch 2.13 wraps it ("Failed to run stage backward input ..."); 2.12 raises it as it is.
                with pytest.raises(RuntimeError, match="stage backward input|donated buffers") as e:
                    sched.step(x, target=y, losses=[])
                assert "donated buffers" in f"{e.value} {e.value.__cause__}"
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()


def test_compiled_loss_with_a_zero_bubble_schedule_is_refused() -> None:
    with pytest.raises(ConfigError, match="cannot run a compiled loss .* drop 'loss' from compile.components"):
        check_job(_cfg("loss"), 2)
    with pytest.raises(ConfigError, match="cannot run a compiled model or loss"):
        check_job(_cfg("model", "loss"), 2)
