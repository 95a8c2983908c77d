"""Parallel layouts train exactly like one process: per-step loss, grad norm and final weights.

Each case runs the tiny loop (tiny_loop.py) on 2 or 4 spawned CPU ranks and compares it with the
single-process run of the same spec (fp32, deterministic). The grad norm comparison is also the
proof that data parallelism SUMS gradients (an average would halve or quarter the norm).
"""

from __future__ import annotations

import pytest
import torch

from harness import run_on_ranks
from tiny_loop import LoopSpec, init_params, reference_run, train
from torchtitan_like.config.schema import Parallelism

RTOL = 1e-4  # relative, on the loss of every step (fp32; seen ~1e-7)
# Grad norm: torch's CPU fp32 vector_norm loses ~1e-4 relative on a 512k-element tensor (the
# output projection's gradient: fp64 norm 1.4590554, one fp32 norm 1.4589360, two halves combined
# 1.4590096). Sharded norms are the more accurate ones, yet differ from the one-process norm by up to
# 8e-5; 2e-4 leaves room for that while an averaged (not summed) gradient is off by 50% or more.
NORM_RTOL = 2e-4
# Weights after AdamW: Adam divides by sqrt(v), so where a gradient is ~0 the fp32 noise of a
# different summation order (~1e-7) becomes a visible step difference. The whole update is at most
# lr x steps = 1e-2 per element; 5e-5 absolute is 0.5% of that. Seen: <= 1e-5 on one machine; on
# another (Xeon with AMX, other fp32 kernels) one element of 196608 at 2.6e-5, the same every run
# (fsdp2xtp2_tied, layers.0.feed_forward.w1). A wrong reduction moves every element by far more.
PARAM_ATOL = 5e-5

# Global batch 8, one microbatch per step on every rank (the reference takes 4 of 2: the split never
# changes the math). The plain FSDP(2), DDP(2), TP(2) and FSDP(2) x TP(2) layouts are covered by the
# real Trainer in test_trainer_parity.py; these are the variants it does not run.
CASES = {
    # name: (world size, parallelism, spec overrides)
    "fsdp4_reshard_always": (4, Parallelism(fsdp_reshard_after_forward="always"), {}),
    "hsdp2x2_reshard_never": (
        4, Parallelism(data_parallel_replicate_degree=2, data_parallel_shard_degree=2,
                       fsdp_reshard_after_forward="never"), {},
    ),
    "tp2_no_loss_parallel": (
        2, Parallelism(data_parallel_shard_degree=1, tensor_parallel_degree=2, disable_loss_parallel=True),
        {"local_batch_size": 8},
    ),
    "fsdp2xtp2_tied": (
        4, Parallelism(data_parallel_shard_degree=2, tensor_parallel_degree=2),
        {"local_batch_size": 4, "tie_word_embeddings": True},
    ),
    "ddp2xtp2": (
        4, Parallelism(data_parallel_replicate_degree=2, data_parallel_shard_degree=1, tensor_parallel_degree=2),
        {"local_batch_size": 4},
    ),
}


def _assert_parity(name: str, ranks: list[dict], ref: dict) -> None:
    for r, out in enumerate(ranks):
        torch.testing.assert_close(
            torch.tensor(out["losses"]), torch.tensor(ref["losses"]), rtol=RTOL, atol=0,
            msg=lambda m: f"{name} rank {r} loss per step: {m}",
        )
        torch.testing.assert_close(
            torch.tensor(out["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=NORM_RTOL, atol=0,
            msg=lambda m: f"{name} rank {r} grad norm per step: {m}",
        )
    final = ranks[0]["final"]
    assert final.keys() == ref["final"].keys()
    for key, want in ref["final"].items():
        torch.testing.assert_close(
            final[key], want, rtol=RTOL, atol=PARAM_ATOL, msg=lambda m: f"{name} final {key}: {m}"
        )


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_one_process(name: str, tmp_path) -> None:
    world, parallelism, overrides = CASES[name]
    spec = LoopSpec(parallelism=parallelism, **overrides)
    ranks = run_on_ranks(train, world_size=world, tmp_path=tmp_path, args=(spec,))
    ref = reference_run(spec)
    assert ref["grad_norms"][0] > spec.max_norm, "the clip must be active for the grad-norm check to bite"
    _assert_parity(name, ranks, ref)
    # Loss parallel really is on with TP: the loss comes back as a (replicated, scalar) DTensor.
    loss_parallel = parallelism.tensor_parallel_degree > 1 and not parallelism.disable_loss_parallel
    assert ranks[0]["loss_type"] == ("DTensor" if loss_parallel else "Tensor")


def test_init_is_layout_independent(tmp_path) -> None:
    """Every weight after init_weights under FSDP(2) x TP(2) is bitwise the one-process init."""
    for tied in (False, True):
        spec = LoopSpec(
            parallelism=Parallelism(data_parallel_shard_degree=2, tensor_parallel_degree=2), tie_word_embeddings=tied
        )
        ranks = run_on_ranks(init_params, world_size=4, tmp_path=tmp_path, args=(spec,))
        ref = init_params(spec.reference())
        assert ranks[0].keys() == ref.keys()
        for key, want in ref.items():
            for r, got in enumerate(ranks):
                assert torch.equal(got[key], want), f"tied={tied}: rank {r} init of {key} differs under FSDP(2) x TP(2)"
