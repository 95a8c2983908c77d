"""The planner's memory estimate for layouts it once got wrong: logits without loss parallel, DDP's and
autocast's bf16 parameter copies, and a middle pipeline rank that peaks. No process group, no model on
a device."""

from __future__ import annotations

import pytest

from torchtitan_like.planner.layout import Layout, PlanInputs, check
from torchtitan_like.planner.memory import estimate_memory, peak_memory

from test_planner import DEBUG_ARGV, LAYERS, PER_LAYER, ROUND_HW, VOCAB, H

BLOCK_LINEARS = PER_LAYER - 2 * H  # one block's linear weights (the two norms left out)


def _candidate(layout: Layout, *, global_batch_size: int, seq_len: int = 64, extra: tuple[str, ...] = ()):
    inputs = PlanInputs(base_argv=DEBUG_ARGV + extra, world_size=layout.world_size, hardware=ROUND_HW,
                        seq_len=seq_len, global_batch_size=global_batch_size, compile=True)
    return check(inputs, layout)


def _weights_held_at_backward_start(m) -> int:
    """Bytes the estimate holds when the backward starts besides the saved activations, the loss buffers and the
    output weight's gradient: the weights kept from the forward."""
    return m.phases()["backward_start"] - m.activations - m.logits - m.output_grad - (
        m.state.grads if m.grads_accumulate else 0)


def test_logits_are_whole_on_the_vocabulary_when_loss_parallel_is_disabled():
    layout = Layout(dp_replicate=1, dp_shard=1, cp=1, tp=2, pp=1, local_batch_size=2, microbatch_size=2)
    c = _candidate(layout, global_batch_size=2, extra=("--parallelism.disable_loss_parallel",))
    assert c.cfg.parallelism.disable_loss_parallel
    m = estimate_memory(c, pp_rank=0)
    tokens = 2 * 64
    # tensor_parallel.py: output_layouts=Replicate() without loss parallel, so every TP rank holds
    # (bs, seq, vocab) logits (bf16) and, the loss being compiled, their bf16 gradient.
    assert m.logits == tokens * VOCAB * (2 + 2)


def test_ddp_holds_every_blocks_bf16_parameters_from_forward_to_backward():
    # distributed/fsdp.py apply_ddp: replicate(block, mp_policy=bf16) per block. replicate() has no
    # post-forward reshard (torch's replicate_with_fsdp passes post_forward_mesh_info=None), so each
    # block's bf16 unsharded parameters stay allocated until its backward, as with
    # fsdp_reshard_after_forward="never" (which the planner does count: n_layers x gathered block).
    layout = Layout(dp_replicate=2, dp_shard=1, cp=1, tp=1, pp=1, local_batch_size=1, microbatch_size=1)
    m = estimate_memory(_candidate(layout, global_batch_size=2), pp_rank=0)
    assert _weights_held_at_backward_start(m) >= LAYERS * PER_LAYER * 2


def test_autocast_layouts_hold_the_bf16_weight_copies_saved_for_backward():
    # trainer._amp: bf16 without FSDP or replicate means torch.autocast. F.linear under autocast casts the
    # fp32 weight (its TP shard) to bf16 and saves that copy for the input-gradient matmul: every block's
    # linear weights exist twice (fp32 + bf16) from their forward to their backward.
    layout = Layout(dp_replicate=1, dp_shard=1, cp=1, tp=2, pp=1, local_batch_size=2, microbatch_size=2)
    m = estimate_memory(_candidate(layout, global_batch_size=2), pp_rank=0)
    assert _weights_held_at_backward_start(m) >= LAYERS * BLOCK_LINEARS // 2 * 2


def test_peak_memory_is_the_highest_pipeline_rank_even_a_middle_one():
    layout = Layout(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=3, local_batch_size=3, microbatch_size=1,
                    pp_schedule="1F1B")
    c = _candidate(layout, global_batch_size=3, extra=("--parallelism.pipeline_parallel_first_stage_less_layers", "2"))
    per_rank = [estimate_memory(c, pp_rank=r).total for r in range(3)]
    # The split is (embedding + 1 block), 3 blocks, (2 blocks + output): 1F1B rank 1 keeps 2 microbatches
    # of 3 blocks in flight, more than rank 0 (3 x 1 block) or rank 2 (1 x 2 blocks + logits).
    assert max(per_rank) == per_rank[1] > max(per_rank[0], per_rank[2])
    assert peak_memory(c).total == per_rank[1]
    assert peak_memory(c).pp_rank == 1
