"""The planner's communication, pipeline, optimizer and memory cost items, each against a value worked out by hand.

Companion of test_planner.py (which covers the compute term, the state bytes and the one-GPU memory items):
here FSDP / HSDP / DDP traffic and its overlap, FSDP under PP, context parallel (both rotations), the
pipeline's P2P, bubble and busiest rank, the optimizer term, and the memory items that only appear with
FSDP, float8, selective AC or PP. Every expected number is arithmetic from the formula in the component's
docstring with the debug model's hand-counted shapes and a hardware profile of round numbers, never a second
call of the component. The tensor-parallel term is in test_planner.py. No process group, no model built.
"""

from __future__ import annotations

import dataclasses

import pytest

from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS
from torchtitan_like.planner.layout import Candidate, Layout, PlanInputs, check
from torchtitan_like.planner.memory import estimate_memory, peak_memory
from torchtitan_like.planner.step_time import estimate_step_time

# The debug model counted by hand, and the profile of round numbers: test_planner.py's.
from test_planner import (
    DEBUG_ARGV,
    FFN,
    H,
    KVD,
    LAYERS,
    PER_LAYER,
    ROUND_HW,
    VOCAB,
    W1,
    W2,
    W3,
    WK,
    WO,
    WQ,
    WV,
)

TABLE = VOCAB * H  # 512_000: the embedding, and the (untied) output projection

# The planner's stage parameters: its blocks plus the vocabulary tables it holds (both without PP, one per stage
# under PP); the final norm (256) is not counted.
ALL_PARAMS = LAYERS * PER_LAYER + 2 * TABLE  # 5_745_664
HALF_STAGE = 3 * PER_LAYER + TABLE  # 2_872_832: 3 blocks + 1 table (a pp=2 stage of the debug model)

NVLINK = 100e9 * 0.5  # intra_node_gbps x link_efficiency, bytes/s
NIC = 10e9 * 0.5  # inter_node_gbps x link_efficiency
FAST_HW = dataclasses.replace(ROUND_HW, intra_node_gbps=10_000.0)  # NVLink 100x faster: 5000 GB/s achievable
FAST_NVLINK = 10_000e9 * 0.5

# Compute rates of ROUND_HW and the per-token work of one block (the trainer's FLOPs formula), compiled.
GEMM_RATE = 100e12 * 0.5  # peak bf16 x gemm_efficiency
ATTN_RATE = 100e12 * 0.25  # peak bf16 x attention_efficiency
HBM = 1000e9
BLOCK_GEMM = 6 * (WQ + WK + WV + WO + W1 + W2 + W3)  # 6 FLOPs per weight per token (fwd + bwd): 4_718_592
OUTPUT_GEMM = 6 * VOCAB * H  # 3_072_000
ELEMENTWISE = 40 * H / HBM  # compiled: 40 bytes per element of h, per token per block


def attention_flops(seq_len: int) -> float:
    return 6 * H * seq_len  # per token per block: 12 h s scores, causal half, fwd + bwd


def block_s(seq_len: int, gemm_rate: float = GEMM_RATE) -> float:
    """Seconds of one block for one token (GEMMs, attention, elementwise traffic)."""
    return BLOCK_GEMM / gemm_rate + attention_flops(seq_len) / ATTN_RATE + ELEMENTWISE


def ring_s(nbytes: float, n: int, bytes_per_s: float) -> float:
    """Ring all-gather / reduce-scatter of `nbytes` (gathered size) over n ranks: (n - 1) / n of it moves."""
    return nbytes * (n - 1) / n / bytes_per_s


def candidate(layout: Layout, *, global_batch_size: int, seq_len: int = 64,
              extra_argv: tuple[str, ...] = (), compile: bool = True) -> Candidate:
    inputs = PlanInputs(base_argv=DEBUG_ARGV + extra_argv, world_size=layout.world_size, hardware=ROUND_HW,
                        seq_len=seq_len, global_batch_size=global_batch_size, compile=compile)
    return check(inputs, layout)


def fsdp4(*, local_batch_size: int = 1, ac: str = "none", float8: bool = False, compile: bool = True) -> Candidate:
    """FSDP over 4 GPUs of one node, 8 sequences of 64 per step: 2 per rank, in microbatches of `local_batch_size`."""
    return candidate(Layout(dp_replicate=1, dp_shard=4, cp=1, tp=1, pp=1, local_batch_size=local_batch_size,
                            microbatch_size=local_batch_size, ac=ac, float8=float8), global_batch_size=8,
                     compile=compile)


def pp2(schedule: str = "1F1B", *, dp_shard: int = 1, ac: str = "none", extra_argv: tuple[str, ...] = (),
        compile: bool = True) -> Candidate:
    """pp 2 (x dp_shard), 4 sequences of 64 per data-parallel rank, microbatches of 1: m = 4."""
    layout = Layout(dp_replicate=1, dp_shard=dp_shard, cp=1, tp=1, pp=2, local_batch_size=4, microbatch_size=1,
                    pp_schedule=schedule, ac=ac)
    return candidate(layout, global_batch_size=4 * dp_shard, extra_argv=extra_argv, compile=compile)


def test_hand_counts_match_the_debug_flavor():
    a = LLAMA3_FLAVORS["debugmodel"]
    assert (a.dim, a.kv_heads * a.head_dim, a.ffn_hidden_dim, a.vocab_size, a.n_layers) == (H, KVD, FFN, VOCAB, LAYERS)
    assert not a.tie_word_embeddings
    assert PER_LAYER == 786_944 and ALL_PARAMS == 5_745_664 and HALF_STAGE == 2_872_832
    assert block_s(64) == pytest.approx(1.08544e-07, rel=1e-12)


# ---- FSDP / HSDP / DDP traffic and its overlap ----------------------------------------------------------


def test_fsdp_traffic_hidden_under_compute_leaves_one_blocks_share_exposed():
    # FSDP 4, 2 microbatches of 1 x 64 tokens per rank. Each microbatch all-gathers the bf16 parameters twice
    # (forward, and backward after the reshard) and reduce-scatters the fp32 gradients once, over the 4 ranks
    # of one node (NVLink, here 100x faster than ROUND_HW's): 3/4 of the bytes move.
    st = estimate_step_time(fsdp4(local_batch_size=1), FAST_HW, compile=True)
    microbatches = 2
    gathers = 2 * microbatches * ring_s(ALL_PARAMS * 2, 4, FAST_NVLINK)
    scatters = microbatches * ring_s(ALL_PARAMS * 4, 4, FAST_NVLINK)
    total = gathers + scatters  # (4 x 2 + 2 x 4) x 5_745_664 x 3/4 / 5e12
    assert st.fsdp_total == pytest.approx(total, rel=1e-12)
    assert st.fsdp_total == pytest.approx(1.37895936e-05, rel=1e-9)
    # 8 x 64 tokens over 4 ranks: 128 tokens of 6 blocks and the output projection on each.
    compute = 128 * (LAYERS * block_s(64) + OUTPUT_GEMM / GEMM_RATE)
    assert st.compute == pytest.approx(compute, rel=1e-12)
    assert total < compute  # the hidden branch: only one block's share (total / layers) is exposed
    assert st.fsdp_exposed == pytest.approx(total / LAYERS, rel=1e-12)
    assert st.fsdp_exposed == pytest.approx(2.2982656e-06, rel=1e-9)
    assert st.total == pytest.approx(st.compute + st.fsdp_exposed + st.optimizer, rel=1e-12)  # fsdp_total is not added

    # One microbatch of 2 instead: half the collectives for the same tokens.
    one = estimate_step_time(fsdp4(local_batch_size=2), FAST_HW, compile=True)
    assert one.fsdp_total == pytest.approx((2 * ring_s(ALL_PARAMS * 2, 4, FAST_NVLINK)
                                            + ring_s(ALL_PARAMS * 4, 4, FAST_NVLINK)), rel=1e-12)
    assert one.fsdp_total == pytest.approx(total / 2, rel=1e-12)


def test_fsdp_traffic_over_a_slow_link_is_exposed_beyond_compute_and_recompute():
    # ROUND_HW: NVLink 100 GB/s x 0.5. Full AC, so the recompute also hides traffic.
    st = estimate_step_time(fsdp4(local_batch_size=1, ac="full"), ROUND_HW, compile=True)
    total = (4 * ring_s(ALL_PARAMS * 2, 4, NVLINK) + 2 * ring_s(ALL_PARAMS * 4, 4, NVLINK))
    assert st.fsdp_total == pytest.approx(total, rel=1e-12)
    assert st.fsdp_total == pytest.approx(1.37895936e-03, rel=1e-9)
    compute = 128 * (LAYERS * block_s(64) + OUTPUT_GEMM / GEMM_RATE)
    recompute = 128 * LAYERS * block_s(64) / 3  # full AC: the blocks' forward again, a third of fwd + bwd
    assert (st.compute, st.recompute) == (pytest.approx(compute, rel=1e-12), pytest.approx(recompute, rel=1e-12))
    assert total > compute + recompute  # the exposed branch
    assert st.fsdp_exposed == pytest.approx(total - compute - recompute + total / LAYERS, rel=1e-12)
    assert st.fsdp_exposed == pytest.approx(1.489772544e-03, rel=1e-9)


@pytest.mark.parametrize(
    "gpus_per_node, replicate_link",
    [
        (8, NVLINK),  # 4 ranks in one node: every group on NVLink
        (2, NIC),  # dp_shard pairs (ranks 0-1, 2-3) are nodes; the replicas (ranks 0 and 2) are on two nodes
    ],
)
def test_hsdp_adds_an_all_reduce_of_the_shard_over_the_replicate_link(gpus_per_node, replicate_link):
    hw = dataclasses.replace(ROUND_HW, gpus_per_node=gpus_per_node)
    c = candidate(Layout(dp_replicate=2, dp_shard=2, cp=1, tp=1, pp=1, local_batch_size=1, microbatch_size=1),
                  global_batch_size=4)
    st = estimate_step_time(c, hw, compile=True)
    # FSDP over dp_shard 2 (span 2 ranks: NVLink either way), 1 microbatch: 2 bf16 gathers, 1 fp32 reduce-scatter.
    shard_dim = 2 * ring_s(ALL_PARAMS * 2, 2, NVLINK) + ring_s(ALL_PARAMS * 4, 2, NVLINK)  # 4 x 5_745_664 / 50e9
    # Then the shard (half the parameters) all-reduced in fp32 over the 2 replicas: reduce-scatter + all-gather.
    replicate_dim = 2 * ring_s(ALL_PARAMS / 2 * 4, 2, replicate_link)  # 2 x 5_745_664 / link
    assert st.fsdp_total == pytest.approx(shard_dim + replicate_dim, rel=1e-12)
    expected = {8: 6 * ALL_PARAMS / 50e9, 2: 4 * ALL_PARAMS / 50e9 + 2 * ALL_PARAMS / 5e9}[gpus_per_node]
    assert st.fsdp_total == pytest.approx(expected, rel=1e-12)
    assert st.fsdp_total == pytest.approx({8: 6.8947968e-04, 2: 2.75791872e-03}[gpus_per_node], rel=1e-9)
    compute = 64 * (LAYERS * block_s(64) + OUTPUT_GEMM / GEMM_RATE)  # 4 x 64 tokens over 4 ranks
    assert st.compute == pytest.approx(compute, rel=1e-12)
    assert st.fsdp_exposed == pytest.approx(st.fsdp_total - compute + st.fsdp_total / LAYERS, rel=1e-12)
    # The optimizer steps the FSDP shard: half the parameters.
    assert st.optimizer == pytest.approx(ALL_PARAMS / 2 * 28 / HBM, rel=1e-12)


@pytest.mark.parametrize("gpus_per_node, link", [(4, NVLINK), (2, NIC)])
def test_ddp_all_reduces_every_gradient_over_the_replicate_link(gpus_per_node, link):
    hw = dataclasses.replace(ROUND_HW, gpus_per_node=gpus_per_node)
    c = candidate(Layout(dp_replicate=4, dp_shard=1, cp=1, tp=1, pp=1, local_batch_size=1, microbatch_size=1),
                  global_batch_size=4)
    st = estimate_step_time(c, hw, compile=True)
    # No FSDP collectives; one all-reduce (reduce-scatter + all-gather) of all fp32 gradients over 4 replicas,
    # which span 4 ranks: one node of 4, or two nodes of 2.
    total = 2 * ring_s(ALL_PARAMS * 4, 4, link)  # 2 x 5_745_664 x 4 x 3/4 = 6 x 5_745_664 bytes
    assert st.fsdp_total == pytest.approx(total, rel=1e-12)
    assert st.fsdp_total == pytest.approx({4: 6.8947968e-04, 2: 6.8947968e-03}[gpus_per_node], rel=1e-9)
    compute = 64 * (LAYERS * block_s(64) + OUTPUT_GEMM / GEMM_RATE)
    assert st.fsdp_exposed == pytest.approx(total - compute + total / LAYERS, rel=1e-12)
    # DDP keeps every parameter (and its optimizer state) on every rank.
    assert st.optimizer == pytest.approx(ALL_PARAMS * 28 / HBM, rel=1e-12)
    assert st.optimizer == pytest.approx(1.60878592e-04, rel=1e-9)


def test_fsdp_under_pp_gathers_and_reduce_scatters_once_per_step():
    # pp 2 x FSDP 2, 1F1B, m = 4 microbatches of 1 x 64. The debug model splits 3 + 3 layers; the busiest rank
    # (either) holds 3 blocks and one vocabulary table. Under PP the blocks never reshard and the reduce-scatter
    # waits for the last microbatch: one bf16 gather and one fp32 reduce-scatter per step, not per microbatch.
    c = pp2(dp_shard=2)
    assert c.pp_plan is not None and c.pp_plan.n_microbatches == 4
    st = estimate_step_time(c, ROUND_HW, compile=True)
    total = ring_s(HALF_STAGE * 2, 2, NVLINK) + ring_s(HALF_STAGE * 4, 2, NVLINK)  # 6 x 2_872_832 x 1/2 / 50e9
    assert st.fsdp_total == pytest.approx(total, rel=1e-12)
    assert st.fsdp_total == pytest.approx(1.7236992e-04, rel=1e-9)
    # Not the per-microbatch count (2 gathers + 1 reduce-scatter each), which would be 4 x (4 + 4) / 6 = 16/3 x.
    compute = 4 * 64 * (3 * block_s(64) + OUTPUT_GEMM / GEMM_RATE)  # 4 sequences per data-parallel rank
    assert st.compute == pytest.approx(compute, rel=1e-12)
    assert st.fsdp_exposed == pytest.approx(total - compute + total / 3, rel=1e-12)  # 3 blocks on this rank
    assert st.optimizer == pytest.approx(HALF_STAGE / 2 * 28 / HBM, rel=1e-12)


# ---- context parallel ------------------------------------------------------------------------------------

CP_ALLTOALL = ("--parallelism.context_parallel_rotate_method", "alltoall")


def cp2(*, ac: str = "none", extra_argv: tuple[str, ...] = ()) -> Candidate:
    """cp 2 on one node: 2 sequences of 64 per step, microbatches of 1 (m = 2), 32 positions per rank.
    (CP needs seq_len divisible by 2 x cp x tp = 4, and model.max_seq_len = seq_len, which it is when unset.)"""
    layout = Layout(dp_replicate=1, dp_shard=1, cp=2, tp=1, pp=1, local_batch_size=1, microbatch_size=1, ac=ac)
    return candidate(layout, global_batch_size=2, extra_argv=extra_argv)


@pytest.mark.parametrize("ac, passes", [("none", 1 + 2), ("full", 1 + 2 + 1)])
def test_cp_allgather_rotation_exposes_every_kv_hop(ac, passes):
    c = cp2(ac=ac)
    assert c.cfg.parallelism.context_parallel_rotate_method == "allgather"  # the default
    st = estimate_step_time(c, ROUND_HW, compile=True)
    # This rank's K and V for one microbatch, expanded to the 16 query heads before attention (repeat_kv): 32
    # positions x 2 x dim 256 x bf16 = 32_768 bytes. It makes cp - 1 = 1
    # hop in forward, K, V, dK, dV (twice the bytes) in backward, and K, V again in a full-AC recompute; per block
    # and microbatch, over the cp group (2 ranks, NVLink; no bus-bandwidth factor on a P2P hop).
    kv = 32 * 2 * H * 2
    assert kv == 32_768
    expected = kv * (2 - 1) * passes / NVLINK * LAYERS * 2
    assert st.cp == pytest.approx(expected, rel=1e-12)
    assert st.cp == pytest.approx({"none": 2.359296e-05, "full": 3.145728e-05}[ac], rel=1e-9)


def test_cp_alltoall_rotation_hides_behind_the_attention_compute():
    kv_hops = 32 * 2 * H * 2 * 3 * LAYERS * 2  # bytes: as above, no AC
    # The step's attention on this rank: 2 x 32 = 64 local positions, each attending 6 h s FLOPs per block.
    attn_s = 64 * LAYERS * attention_flops(64) / ATTN_RATE
    assert attn_s == pytest.approx(1.50994944e-06, rel=1e-12)

    # ROUND_HW: the hops take longer than the attention, the rest is exposed.
    st = estimate_step_time(cp2(extra_argv=CP_ALLTOALL), ROUND_HW, compile=True)
    assert kv_hops / NVLINK > attn_s
    assert st.cp == pytest.approx(kv_hops / NVLINK - attn_s, rel=1e-12)
    assert st.cp == pytest.approx(2.208301056e-05, rel=1e-9)
    # The all-gather rotation on the same hardware exposes all of it.
    assert estimate_step_time(cp2(), ROUND_HW, compile=True).cp == pytest.approx(kv_hops / NVLINK, rel=1e-12)

    # NVLink 100x faster: the hops fit under the attention, nothing exposed.
    fast = estimate_step_time(cp2(extra_argv=CP_ALLTOALL), FAST_HW, compile=True)
    assert kv_hops / FAST_NVLINK < attn_s
    assert fast.cp == 0.0
    assert estimate_step_time(cp2(), FAST_HW, compile=True).cp == pytest.approx(kv_hops / FAST_NVLINK, rel=1e-12)


# ---- pipeline parallel -----------------------------------------------------------------------------------


def layers_per_stage(c: Candidate) -> list[int]:
    assert c.pp_plan is not None
    return [sum(f.startswith("layers.") for f in fqns) for fqns in c.pp_plan.fqns_per_stage]


@pytest.mark.parametrize("ac", ["none", "full"])
def test_pp_1f1b_p2p_fill_and_drain_and_bubble(ac):
    c = pp2("1F1B", ac=ac)
    assert layers_per_stage(c) == [3, 3]  # 6 layers + the embedding and the output counted as one layer each
    st = estimate_step_time(c, ROUND_HW, compile=True)
    # One boundary activation: a microbatch of 1 x 64 positions x h 256 in bf16 = 32_768 bytes, to the
    # neighbour (pp is outermost: ranks 0 and 1, one node, NVLink). Fill and drain: 2 (pp - 1) transfers.
    transfer = 64 * H * 2 / NVLINK
    assert st.pp_p2p == pytest.approx(2 * (2 - 1) * transfer, rel=1e-12)
    assert st.pp_p2p == pytest.approx(1.31072e-06, rel=1e-9)
    # The busiest rank: 3 blocks (both); the last one holds the output projection, so it counts.
    compute = 4 * 64 * (3 * block_s(64) + OUTPUT_GEMM / GEMM_RATE)
    recompute = 4 * 64 * 3 * block_s(64) / 3 if ac == "full" else 0.0
    assert st.compute == pytest.approx(compute, rel=1e-12)
    assert st.compute == pytest.approx(9.9090432e-05, rel=1e-9)
    assert st.recompute == pytest.approx(recompute, rel=1e-12)
    # 1F1B bubble: (p - 1) / m = 1/4 of the busiest rank's work (compute + recompute; no TP or CP here).
    assert st.bubble == pytest.approx((2 - 1) / 4 * (compute + recompute), rel=1e-12)
    assert (st.fsdp_total, st.fsdp_exposed, st.cp) == (0.0, 0.0, 0.0)
    # No FSDP: the rank steps its whole stage (3 blocks and one table).
    assert st.optimizer == pytest.approx(HALF_STAGE * 28 / HBM, rel=1e-12)
    assert st.optimizer == pytest.approx(8.0439296e-05, rel=1e-9)


def test_pp_interleaved_bubble_divides_by_the_stages_per_rank():
    c = pp2("Interleaved1F1B")
    # 4 stages: units of (6 + 2) / 4 = 2, the first and the last giving one to the embedding / output.
    assert layers_per_stage(c) == [1, 2, 2, 1]
    assert c.pp_plan is not None and c.pp_plan.stage_ranks == (0, 1, 0, 1)
    st = estimate_step_time(c, ROUND_HW, compile=True)
    compute = 4 * 64 * (3 * block_s(64) + OUTPUT_GEMM / GEMM_RATE)  # 1 + 2 blocks on each rank; output on rank 1
    assert st.compute == pytest.approx(compute, rel=1e-12)
    # (p - 1) / (v m) = 1 / (2 x 4).
    assert st.bubble == pytest.approx(compute / 8, rel=1e-12)
    assert st.bubble == pytest.approx(1.2386304e-05, rel=1e-9)
    assert st.pp_p2p == pytest.approx(2 * 64 * H * 2 / NVLINK, rel=1e-12)


def test_pp_compute_is_the_busiest_ranks_and_the_output_only_when_that_rank_holds_it():
    # 5 units on the first stage: embedding + 4 blocks; the last: 2 blocks + norm + output.
    c = pp2("1F1B", extra_argv=("--parallelism.pipeline_parallel_layers_per_stage", "5"))
    assert layers_per_stage(c) == [4, 2]
    st = estimate_step_time(c, ROUND_HW, compile=True)
    compute = 4 * 64 * 4 * block_s(64)  # rank 0's 4 blocks; no output projection there
    assert st.compute == pytest.approx(compute, rel=1e-12)
    assert st.compute == pytest.approx(1.11149056e-04, rel=1e-9)
    assert st.bubble == pytest.approx(compute / 4, rel=1e-12)
    # Its stage: 4 blocks and one table.
    assert st.optimizer == pytest.approx((4 * PER_LAYER + TABLE) * 28 / HBM, rel=1e-12)


# ---- optimizer -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dp_shard, expected", [(1, 1.60878592e-04), (4, 4.0219648e-05)])
def test_optimizer_reads_and_writes_28_bytes_per_local_parameter(dp_shard, expected):
    c = candidate(Layout(dp_replicate=1, dp_shard=dp_shard, cp=1, tp=1, pp=1, local_batch_size=2, microbatch_size=2),
                  global_batch_size=2 * dp_shard)
    st = estimate_step_time(c, ROUND_HW, compile=True)
    # AdamW in fp32: read param, grad, exp_avg, exp_avg_sq (16 B), write param, exp_avg, exp_avg_sq (12 B), per
    # parameter of the local shard, at 1000 GB/s.
    assert st.optimizer == pytest.approx(ALL_PARAMS / dp_shard * (16 + 12) / HBM, rel=1e-12)
    assert st.optimizer == pytest.approx(expected, rel=1e-9)
    assert st.total == pytest.approx(st.compute + st.fsdp_exposed + st.optimizer, rel=1e-12)


# ---- memory ----------------------------------------------------------------------------------------------

BLOCK_ACT_NONE = 2 * H + 7 * H + 4 * FFN  # 5376 elements per token, no AC, eager, tp 1 (k, v expanded: h each)
BLOCK_ACT_SELECTIVE = 5 * H + 2 * KVD + 2 * FFN  # 3072: q, attention out, wo out, w2 out, block input; k, v; w1, w3
# Under autocast without FSDP (one GPU, PP alone) the residual stream is fp32: the block input and the residual
# after attention take 2 more bytes each per element.
BLOCK_BYTES_NONE_AUTOCAST = BLOCK_ACT_NONE * 2 + 2 * H * 2  # 11_776 bytes per token


def test_memory_gathered_without_pp_is_two_bf16_blocks_the_tables_and_one_fp32_block():
    m = estimate_memory(fsdp4(), pp_rank=0)
    # The current and the prefetched block in bf16, the embedding and the output kept gathered (bf16), and one
    # block's unsharded fp32 gradients before its reduce-scatter.
    gathered = 2 * PER_LAYER * 2 + 2 * TABLE * 2 + PER_LAYER * 4
    assert m.gathered == gathered == 8_343_552
    assert m.float8 == 0 and m.recompute == 0
    assert m.margin == int(0.10 * (m.activations + m.logits + gathered))


def test_memory_gathered_under_fsdp_and_pp_is_the_whole_stage_in_bf16_and_fp32():
    c = pp2(dp_shard=2)
    # The stage's parameters stay gathered (bf16) for the whole step, and its unsharded fp32 gradients accumulate
    # until the last microbatch: 2 + 4 bytes per parameter of the stage.
    first = estimate_memory(c, pp_rank=0)  # embedding + 3 blocks
    last = estimate_memory(c, pp_rank=1)  # 3 blocks + final norm + output
    assert first.gathered == (3 * PER_LAYER + TABLE) * (2 + 4) == 17_236_992
    assert last.gathered == (3 * PER_LAYER + H + TABLE) * (2 + 4) == 17_238_528
    # The state is the FSDP shard of the stage: half of it, in fp32.
    assert first.state.params == (3 * PER_LAYER + TABLE) // 2 * 4


def test_memory_float8_selective_recompute_and_margin_with_fsdp():
    c = fsdp4(local_batch_size=1, ac="selective_op", float8=True, compile=False)  # eager: the fp32 loss buffers
    m = estimate_memory(c, pp_rank=0)
    tokens = 64  # one microbatch of 1 x 64
    # float8: the gathered block's weights as float8 (1 byte) and their transposes: 2 bytes per block element.
    assert m.float8 == 2 * PER_LAYER == 1_573_888
    # Selective op AC keeps the matmul / attention outputs and the block input; the elementwise rest is recomputed.
    assert BLOCK_ACT_SELECTIVE == 3072
    activations = LAYERS * tokens * BLOCK_ACT_SELECTIVE * 2 + tokens * H * 2  # + the embedding output
    assert m.activations == activations == 2_392_064
    assert m.recompute == tokens * (BLOCK_ACT_NONE - BLOCK_ACT_SELECTIVE) * 2 == 294_912
    assert m.logits == tokens * VOCAB * (2 + 4 + 4) == 1_280_000
    assert m.gathered == 8_343_552
    # Margin: 10% of everything but the state (logits, larger than the recompute, counted once).
    assert m.margin == int(0.10 * (activations + 1_280_000 + 8_343_552 + 1_573_888)) == 1_358_950
    # Two microbatches per step: the gradients exist during the second one's forward, so they count in every phase.
    # The backward starts with the loss buffers and the output weight's whole fp32 gradient (before its
    # reduce-scatter): more than the recompute (294_912) and one block's backward temporaries.
    assert m.grads_accumulate and m.output_grad == TABLE * 4
    assert m.backward_temp == tokens * (3 * FFN + 2 * H) * 2 == 360_448
    assert m.peak_phase == "backward_start"
    assert m.total == m.state.total + activations + 1_280_000 + TABLE * 4 + 8_343_552 + 1_573_888 + 1_358_950

    # The step: selective AC recomputes only the elementwise traffic (a third of its fwd + bwd bytes), and the
    # float8 blocks run at the fp8 GEMM rate (here raised to 200 x 0.5 = 100 TFLOPS, twice the bf16 rate).
    hw = dataclasses.replace(ROUND_HW, fp8_gemm_efficiency=0.5)
    st = estimate_step_time(c, hw, compile=True)
    assert st.recompute == pytest.approx(128 * LAYERS * ELEMENTWISE / 3, rel=1e-12)
    assert st.recompute == pytest.approx(2.62144e-06, rel=1e-9)
    compute = 128 * (LAYERS * block_s(64, gemm_rate=200e12 * 0.5) + OUTPUT_GEMM / GEMM_RATE)  # output stays bf16
    assert st.compute == pytest.approx(compute, rel=1e-12)
    assert st.compute == pytest.approx(5.498732544e-05, rel=1e-9)


def test_memory_of_1f1b_ranks_holds_their_in_flight_microbatches():
    c = pp2("1F1B", compile=False)
    per_block = 64 * BLOCK_BYTES_NONE_AUTOCAST  # one block, one microbatch of 1 x 64, no AC, eager: 753_664 bytes
    # 1F1B with p = 2, m = 4: rank 0 holds p - 0 = 2 microbatches, rank 1 one; 3 blocks each.
    first = estimate_memory(c, pp_rank=0)
    assert first.activations == 2 * 3 * per_block + 2 * 64 * H * 4 == 4_653_056  # + its (fp32) embedding outputs
    assert first.logits == 0 and first.output_grad == 0  # the output is on the last stage
    last = estimate_memory(c, pp_rank=1)
    assert last.activations == 1 * 3 * per_block == 2_260_992
    assert last.logits == 64 * VOCAB * (2 + 4 + 4) == 1_280_000
    # No FSDP: autocast's bf16 weight copies, all kept (the schedule's one autocast region caches them).
    assert first.gathered == 3 * PER_LAYER * 2
    assert last.gathered == 3 * PER_LAYER * 2 + TABLE * 2  # + the output weight
    assert first.margin == int(0.10 * (4_653_056 + first.gathered))
    assert last.margin == int(0.10 * (2_260_992 + 1_280_000 + last.gathered))
    assert first.grads_accumulate and last.grads_accumulate  # the microbatches' gradients accumulate
    assert peak_memory(c).pp_rank == (0 if first.total > last.total else 1)


def test_memory_of_an_interleaved_rank_counts_the_blocks_in_flight_of_uneven_chunks():
    c = pp2("Interleaved1F1B", compile=False)
    assert layers_per_stage(c) == [1, 2, 2, 1]  # rank 0 runs stage 0 (1 block) and stage 2 (2 blocks)
    per_block = 64 * BLOCK_BYTES_NONE_AUTOCAST
    # The documented warm-up (in_flight_chunks): (v - 1) p + 2 (p - rank - 1) + 1 = 2 + 2 + 1 = 5 stage forwards
    # on rank 0. torch's Interleaved1F1B takes them in rounds of p = 2 microbatches (forward_stage_index):
    # stage 0 mb 0, 1; stage 2 mb 0, 1; stage 0 mb 2, before its first backward. In flight: 3 x 1 + 2 x 2 = 7
    # blocks, and 3 embedding outputs (stage 0's forwards only).
    m = estimate_memory(c, pp_rank=0)
    assert m.activations == 7 * per_block + 3 * 64 * H * 4

    # Rank 1 runs stages 1 (2 blocks) and 3 (1 block): (v - 1) p + 0 + 1 = 3 forwards, stage 1 for
    # microbatches 0 and 1, then stage 3 for microbatch 0: 2 + 2 + 1 = 5 blocks, no embedding.
    assert estimate_memory(c, pp_rank=1).activations == 5 * per_block
