"""The planner's cost components (torchtitan_like/planner/), each against a value worked out by hand.

Every expected number here is written out as arithmetic from the formula in the component's docstring,
with small shapes (the debug model, or tiny TransformerArgs) and a hardware profile of round numbers,
never by calling the component a second time. No process group, no model on a real device.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from torchtitan_like.components.flops import model_flops_per_token
from torchtitan_like.config.loader import load_config
from torchtitan_like.errors import ConfigError
from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS, TransformerArgs
from torchtitan_like.planner.hardware import BUILTIN_PROFILES, HardwareProfile, load_profile
from torchtitan_like.planner.layout import FEATURES, Layout, PlanInputs, check
from torchtitan_like.planner.memory import (
    MemoryEstimate,
    activation_bytes_per_block,
    block_params,
    estimate_memory,
    in_flight_chunks,
    peak_memory,
)
from torchtitan_like.planner.plan import GIB, make_plan
from torchtitan_like.planner.state import (
    StateBytes,
    chunk_size,
    predicted_state_bytes,
    rank_coords,
    state_from_local,
)
from torchtitan_like.planner.step_time import StepTime, _collective_s, estimate_step_time, link_gbps, throughput

DEBUG = LLAMA3_FLAVORS["debugmodel"]
DEBUG_ARGV = ("--model.name", "llama3", "--model.flavor", "debugmodel")

# ---- the debug model counted by hand ------------------------------------------------------------
# dim 256, 16 heads -> head_dim 16; 8 kv heads -> kv dim 8 x 16 = 128.
# ffn_hidden_dim: int(2 x 4 x 256 / 3) = int(682.67) = 682, rounded up to multiple_of 256 -> 768.
H, KVD, FFN, VOCAB, LAYERS = 256, 128, 768, 2000, 6
WQ = WO = H * H  # 65_536 each
WK = WV = KVD * H  # 32_768 each
W1 = W2 = W3 = FFN * H  # 196_608 each
NORMS = 2 * H  # attention_norm + ffn_norm
PER_LAYER = WQ + WK + WV + WO + W1 + W2 + W3 + NORMS  # 786_944
EMBEDDING = OUTPUT = VOCAB * H  # 512_000 each (not tied)
FINAL_NORM = H
DEBUG_PARAMS = LAYERS * PER_LAYER + EMBEDDING + OUTPUT + FINAL_NORM  # 5_745_920
DEBUG_TENSORS = LAYERS * 9 + 3  # 9 per layer; embedding, final norm, output


# A profile of round numbers, so the step-time arithmetic below stays readable.
ROUND_HW = HardwareProfile(
    name="round", peak_bf16_tflops=100.0, peak_fp8_tflops=200.0, hbm_gib=80.0, hbm_gbps=1000.0,
    intra_node_gbps=100.0, inter_node_gbps=10.0, gpus_per_node=8, gemm_efficiency=0.5, fp8_gemm_efficiency=0.25,
    attention_efficiency=0.25, link_efficiency=0.5, reserved_gib=2.0,
)


def one_gpu_candidate(*, ac: str = "none", seq_len: int = 64, batch: int = 2, loss_chunk_size: int = 0):
    inputs = PlanInputs(base_argv=DEBUG_ARGV, world_size=1, hardware=ROUND_HW, seq_len=seq_len,
                        global_batch_size=batch, compile=True)
    layout = Layout(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, local_batch_size=batch, microbatch_size=batch, ac=ac,
                    loss_chunk_size=loss_chunk_size)
    return check(inputs, layout)


def test_hand_count_of_the_debug_model_matches_its_own_args():
    # Guards the constants above (a flavor change would otherwise make every test below vacuous).
    assert DEBUG.ffn_hidden_dim == FFN and DEBUG.kv_heads * DEBUG.head_dim == KVD
    assert DEBUG_PARAMS == 5_745_920
    assert DEBUG.num_params() == DEBUG_PARAMS


# ---- state.py -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, parts, sizes",
    [
        (8, 4, [2, 2, 2, 2]),  # even
        (10, 4, [3, 3, 3, 1]),  # ceil(10/4) = 3: 3 + 3 + 3, the last gets what is left
        (5, 4, [2, 2, 1, 0]),  # ceil(5/4) = 2: 2 + 2 + 1, then an empty chunk
        (2, 4, [1, 1, 0, 0]),  # two empty trailing chunks
        (2000, 3, [667, 667, 666]),  # the debug model's vocabulary over 3 FSDP ranks
    ],
)
def test_chunk_size_splits_like_torch_chunk(n, parts, sizes):
    assert [chunk_size(n, parts, i) for i in range(parts)] == sizes
    assert sum(sizes) == n


def test_rank_coords_follow_the_mesh_order_last_dim_fastest():
    degrees = {"pp": 2, "dp_replicate": 3, "dp_shard": 2, "cp": 2, "tp": 2}  # 48 ranks
    # Mesh order pp, dp_replicate, dp_shard, cp, tp, tp fastest:
    # rank = (((pp x 3 + dp_replicate) x 2 + dp_shard) x 2 + cp) x 2 + tp
    # (1, 2, 0, 1, 1) -> (((1 x 3 + 2) x 2 + 0) x 2 + 1) x 2 + 1 = ((10 x 2 + 1) x 2) + 1 = 43.
    assert rank_coords(43, degrees) == {"pp": 1, "dp_replicate": 2, "dp_shard": 0, "cp": 1, "tp": 1}
    assert rank_coords(0, degrees) == {"pp": 0, "dp_replicate": 0, "dp_shard": 0, "cp": 0, "tp": 0}
    assert rank_coords(1, degrees)["tp"] == 1 and rank_coords(1, degrees)["cp"] == 0
    assert rank_coords(24, degrees) == {"pp": 1, "dp_replicate": 0, "dp_shard": 0, "cp": 0, "tp": 0}
    # The same as the position of the rank in arange(world).reshape(degrees in mesh order), which is
    # how init_device_mesh lays ranks out.
    mesh = torch.arange(48).reshape(2, 3, 2, 2, 2)
    for r in range(48):
        pos = [int(i) for i in (mesh == r).nonzero()[0]]
        assert rank_coords(r, degrees) == dict(zip(("pp", "dp_replicate", "dp_shard", "cp", "tp"), pos)), r
    # Missing dims have degree 1.
    assert rank_coords(3, {"tp": 2, "dp_shard": 2}) == {"pp": 0, "dp_replicate": 0, "dp_shard": 1, "cp": 0, "tp": 1}


def test_state_from_local_adam_bytes():
    s = state_from_local([((3, 4), 4), ((5,), 2)])
    # params: 12 x 4 + 5 x 2 = 58 bytes; grads the same; Adam: exp_avg + exp_avg_sq + a 4-byte step per tensor.
    assert (s.params, s.grads, s.optimizer, s.n_tensors, s.n_elements) == (58, 58, 2 * 58 + 4 * 2, 2, 17)
    assert s.total == 58 + 58 + 124


def test_predicted_state_bytes_of_the_debug_model_on_one_rank():
    s = predicted_state_bytes(DEBUG, {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "cp": 1, "tp": 1})
    assert s.n_elements == DEBUG_PARAMS
    assert s.n_tensors == DEBUG_TENSORS
    assert s.params == 4 * DEBUG_PARAMS  # fp32
    assert s.grads == s.params
    assert s.optimizer == 2 * s.params + 4 * DEBUG_TENSORS
    assert s.total == 4 * DEBUG_PARAMS * 4 + 4 * DEBUG_TENSORS


def test_predicted_state_bytes_under_tp2_splits_the_linears_and_embeddings_not_the_norms():
    # TP 2 halves wq, wk, wv, w1, w3 (output dim), wo, w2 (input dim), the embedding and output tables
    # (vocabulary); the norms stay whole on each rank.
    per_layer = (WQ + WK + WV + WO + W1 + W2 + W3) // 2 + NORMS  # 393_728
    expected = LAYERS * per_layer + EMBEDDING // 2 + OUTPUT // 2 + FINAL_NORM  # 2_874_624
    assert expected == 2_874_624
    for rank in (0, 1):
        s = predicted_state_bytes(DEBUG, {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "cp": 1, "tp": 2}, rank=rank)
        assert s.n_elements == expected, rank
        assert s.n_tensors == DEBUG_TENSORS  # every tensor still exists on each rank, only smaller
        assert s.params == 4 * expected and s.grads == s.params
        assert s.optimizer == 2 * s.params + 4 * DEBUG_TENSORS


def test_predicted_state_bytes_under_uneven_fsdp_shards_partition_every_tensor():
    # FSDP 3: dim 0 in ceil-chunks. rank 0: 256 -> 86, 128 -> 43, 768 -> 256, 2000 -> 667, norms 256 -> 86.
    # rank 2: 256 -> 84, 128 -> 42, 768 -> 256, 2000 -> 666.
    degrees = {"pp": 1, "dp_replicate": 1, "dp_shard": 3, "cp": 1, "tp": 1}
    r0 = LAYERS * (86 * H + 43 * H + 43 * H + 86 * H + 256 * H + 86 * FFN + 256 * H + 2 * 86) + 2 * 667 * H + 86
    r2 = LAYERS * (84 * H + 42 * H + 42 * H + 84 * H + 256 * H + 84 * FFN + 256 * H + 2 * 84) + 2 * 666 * H + 84
    got = [predicted_state_bytes(DEBUG, degrees, rank=r).n_elements for r in range(3)]
    assert got[0] == r0 and got[2] == r2
    assert sum(got) == DEBUG_PARAMS


# ---- memory.py ----------------------------------------------------------------------------------

TINY = TransformerArgs(dim=12, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16)
# head_dim 3, kv dim 2 x 3 = 6; ffn: int(2 x 48 / 3) = 32, a multiple of 16 -> 32.


def test_tiny_args_shapes():
    assert (TINY.head_dim, TINY.kv_heads * TINY.head_dim, TINY.ffn_hidden_dim) == (3, 6, 32)
    # Per block: wq, wo 12 x 12; wk, wv 12 x 6; w1, w2, w3 12 x 32; two norms of 12.
    assert block_params(TINY) == 2 * 144 + 2 * 72 + 3 * 384 + 24


@pytest.mark.parametrize(
    "ac, per_token",
    [
        # none, per token with tp 2 (h 12, kvd 6, ffn 32): attention_norm in 6, its gathered out 12, q 6,
        # k 6, v 6 (expanded to every query head for attention), attention out 6, wo in 6, ffn_norm in 6,
        # gathered out 12, w1, w3, silu, product 16 each.
        ("none", 6 + 12 + 6 + 6 + 6 + 6 + 6 + 6 + 12 + 4 * 16),  # 130
        # selective op: q 6, k 3, v 3, attention out 6, wo out 6, w2 out 6, w1 16, w3 16, block input 6.
        ("selective_op", 6 + 3 + 3 + 6 + 6 + 6 + 16 + 16 + 6),  # 68
        # full: the block input only, h / tp.
        ("full", 6),
    ],
)
def test_activation_bytes_per_block(ac, per_token):
    tokens, itemsize = 10, 2
    got = activation_bytes_per_block(TINY, tokens=tokens, tp=2, ac=ac, itemsize=itemsize)
    assert got == tokens * per_token * itemsize


def test_activation_bytes_per_block_without_tp_and_unknown_mode():
    # none, tp 1: 2 x 12 + 7 x 12 + 4 x 32 = 236 per token, fp32.
    assert activation_bytes_per_block(TINY, tokens=3, tp=1, ac="none", itemsize=4) == 3 * 236 * 4
    with pytest.raises(ValueError, match="selective"):
        activation_bytes_per_block(TINY, tokens=3, tp=1, ac="selective", itemsize=4)


def _pp_layout(schedule: str, pp: int = 4) -> Layout:
    return Layout(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=pp, local_batch_size=8, microbatch_size=1,
                  pp_schedule=schedule)


def test_in_flight_chunks():
    # No PP: one microbatch.
    one = Layout(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, local_batch_size=8, microbatch_size=8)
    assert in_flight_chunks(one, n_microbatches=1, stages_per_rank=1, pp_rank=0) == 1
    # GPipe: every forward first: m x v = 8 x 1, on every rank.
    for r in range(4):
        assert in_flight_chunks(_pp_layout("GPipe"), n_microbatches=8, stages_per_rank=1, pp_rank=r) == 8
    # 1F1B: pp - rank (4, 3, 2, 1), capped at m.
    assert [in_flight_chunks(_pp_layout("1F1B"), n_microbatches=8, stages_per_rank=1, pp_rank=r)
            for r in range(4)] == [4, 3, 2, 1]
    assert in_flight_chunks(_pp_layout("1F1B"), n_microbatches=2, stages_per_rank=1, pp_rank=0) == 2
    # Interleaved, v = 2, p = 4, m = 8: (v - 1) p + 2 (p - rank - 1) + 1 -> rank 0: 4 + 6 + 1 = 11,
    # rank 3: 4 + 0 + 1 = 5; capped at m v = 16.
    inter = _pp_layout("Interleaved1F1B")
    assert in_flight_chunks(inter, n_microbatches=8, stages_per_rank=2, pp_rank=0) == 11
    assert in_flight_chunks(inter, n_microbatches=8, stages_per_rank=2, pp_rank=3) == 5
    # m = 4: m v = 8 < 11.
    assert in_flight_chunks(inter, n_microbatches=4, stages_per_rank=2, pp_rank=0) == 8


def _state(params: int) -> StateBytes:
    return StateBytes(params=params, grads=params, optimizer=2 * params + 4, n_tensors=1, n_elements=params // 4)


def test_memory_total_adds_the_larger_of_logits_and_recompute():
    m = MemoryEstimate(pp_rank=0, state=_state(10), activations=100, logits=30, gathered=7, recompute=50, float8=3,
                       margin=11)
    # state 10 + 10 + 24 = 44; + activations 100 + gathered 7 + float8 3 + max(30, 50) + margin 11.
    assert m.total == 44 + 100 + 7 + 3 + 50 + 11
    m2 = dataclasses.replace(m, logits=80)
    assert m2.total == 44 + 100 + 7 + 3 + 80 + 11
    assert m2.items()["total"] == m2.total and m2.items()["optimizer"] == 24


def test_estimate_memory_of_one_gpu_debug_model_by_hand():
    c = one_gpu_candidate(seq_len=64, batch=2)  # compiled (model, loss), bf16 autocast over fp32 storage
    m = estimate_memory(c, pp_rank=0)
    tokens = 2 * 64
    bf16, fp32 = 2, 4
    # One compiled block without AC keeps the block input and the residual after attention (fp32 under
    # autocast: the embedding's output is fp32), q (h), k and v (kvd each), the attention output (h), w1 and
    # w3 outputs (ffn each); inductor recomputes the norms, SiLU, the product and the K/V expansion.
    per_block = tokens * ((H + 2 * KVD + H + 2 * FFN) * bf16 + 2 * H * fp32)  # 128 x (2304 x 2 + 2048)
    assert per_block == 851_968
    activations = LAYERS * per_block + tokens * H * fp32  # + the embedding output (fp32)
    logits = tokens * VOCAB * (bf16 + bf16)  # compiled cross-entropy: the logits and their gradient
    assert m.state.n_elements == DEBUG_PARAMS and m.state.params == 4 * DEBUG_PARAMS
    assert m.activations == activations == 5_242_880
    assert m.logits == logits == 1_024_000
    # No FSDP: autocast's bf16 copy of every block's weights and of the output weight, saved for backward.
    copies = (LAYERS * PER_LAYER + OUTPUT) * bf16
    assert (m.gathered, m.recompute, m.float8) == (copies, 0, 0)  # no AC, no float8
    assert m.output_grad == OUTPUT * fp32  # the output weight's gradient, in the storage dtype
    # One block's backward: the gradients of w1 and w3 outputs and of their product, and two fp32 residual ones.
    assert m.backward_temp == tokens * (3 * FFN * bf16 + 2 * H * fp32) == 851_968
    assert not m.grads_accumulate  # one microbatch per step: no gradient exists during the forward
    assert m.margin == int(0.10 * (activations + logits + copies))
    grads = 4 * DEBUG_PARAMS
    assert m.phases() == {
        "backward_start": activations + copies + logits + OUTPUT * fp32,
        "in_backward": max(activations + copies, grads) + m.backward_temp,
        "optimizer_step": grads,
    }
    # This model's gradients (23 MB) outweigh its activations and weight copies (15.7 MB): the peak is late in the
    # backward, with nearly every gradient made.
    assert m.peak_phase == "in_backward"
    optimizer = 2 * 4 * DEBUG_PARAMS + 4 * DEBUG_TENSORS
    assert m.total == 4 * DEBUG_PARAMS + optimizer + grads + 851_968 + int(0.10 * (activations + logits + copies))
    assert peak_memory(c).total == m.total


def test_memory_phases_count_the_gradients_in_full_when_they_accumulate():
    m = MemoryEstimate(pp_rank=0, state=_state(10), activations=100, logits=30, gathered=7, recompute=50, float8=3,
                       margin=11, output_grad=4, backward_temp=6, grads_accumulate=False)
    # params 10, optimizer 24; backward start 100 + 7 + 3 + 30 + 4, in backward max(107, 10) + 3 + 50 + 6.
    assert m.phases() == {"backward_start": 144, "in_backward": 166, "optimizer_step": 10}
    assert m.total == 10 + 24 + 166 + 11 and m.peak_phase == "in_backward"
    acc = dataclasses.replace(m, grads_accumulate=True)  # PP or gradient accumulation: the grads exist throughout
    assert acc.phases() == {"backward_start": 154, "in_backward": 176, "optimizer_step": 10}
    # Gradients larger than what is saved: late in the backward, the block's recompute and temporaries on top of them.
    big_grads = dataclasses.replace(m, state=_state(1000))
    assert big_grads.phases()["in_backward"] == 1000 + 3 + 50 + 6
    assert big_grads.total == 1000 + 2004 + 1059 + 11


def test_an_sdpa_document_mask_counts_once_per_forward_in_flight():
    layout = Layout(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, local_batch_size=2, microbatch_size=2, ac="none")

    def activations(*args: str) -> int:
        inputs = PlanInputs(base_argv=[*DEBUG_ARGV, *args], world_size=1, hardware=ROUND_HW, seq_len=64,
                            global_batch_size=2, compile=True)
        return estimate_memory(check(inputs, layout), pp_rank=0).activations

    causal = activations()
    # 2 sequences x 64 x 64 positions in bf16, one mask for all 6 blocks.
    assert activations("--model.attn_mask_type", "block_causal") == causal + 2 * 64 * 64 * 2
    assert activations("--model.attn_mask_type", "block_causal", "--model.attn_type", "flex") == causal


def test_bf16_storage_halves_the_predicted_state():
    layout = Layout(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, local_batch_size=2, microbatch_size=2, ac="none")

    def state(*args: str):
        inputs = PlanInputs(base_argv=[*DEBUG_ARGV, *args], world_size=1, hardware=ROUND_HW, seq_len=64,
                            global_batch_size=2, compile=True)
        return estimate_memory(check(inputs, layout), pp_rank=0).state

    fp32, bf16 = state(), state("--training.dtype", "bfloat16")
    assert (bf16.params, bf16.grads) == (fp32.params // 2, fp32.grads // 2) == (2 * DEBUG_PARAMS, 2 * DEBUG_PARAMS)
    assert bf16.optimizer == 2 * 2 * DEBUG_PARAMS + (fp32.optimizer - 2 * 4 * DEBUG_PARAMS)  # (+ the fp32 step counts)


def test_a_chunked_loss_holds_one_chunk_of_logits():
    m = estimate_memory(one_gpu_candidate(seq_len=64, batch=2, loss_chunk_size=16), pp_rank=0)
    # 2 sequences x 16 positions of logits and their gradient (compiled loss: bf16 both), and the final-norm
    # hidden states (2 x 64 x dim, bf16) the chunks are recomputed from.
    assert m.logits == 2 * 16 * VOCAB * (2 + 2) + 2 * 64 * H * 2 == 321_536
    assert m.activations == estimate_memory(one_gpu_candidate(seq_len=64, batch=2), pp_rank=0).activations


def test_estimate_memory_full_ac_saves_block_inputs_and_recomputes_one_block():
    c = one_gpu_candidate(ac="full", seq_len=64, batch=2)
    m = estimate_memory(c, pp_rank=0)
    tokens = 2 * 64
    # Full AC saves only the block input (h per token, fp32 under autocast); recomputing one block needs its
    # whole compiled no-AC activations (the one-GPU test above: 851_968 bytes).
    assert m.activations == LAYERS * tokens * H * 4 + tokens * H * 4 == 917_504
    assert m.recompute == 851_968
    assert m.logits == 1_024_000
    assert m.gathered == (PER_LAYER + OUTPUT) * 2  # autocast's copies: the block recomputed, and the output
    assert m.margin == int(0.10 * (m.activations + max(m.logits, m.recompute) + m.gathered))
    grads = 4 * DEBUG_PARAMS
    assert m.phases()["in_backward"] == max(m.activations + m.gathered, grads) + m.recompute + m.backward_temp
    assert m.total == m.state.params + m.state.optimizer + max(m.phases().values()) + m.margin


# ---- step_time.py -------------------------------------------------------------------------------


def test_link_gbps_picks_nvlink_inside_a_node_and_the_nic_across():
    hw = ROUND_HW  # intra 100, inter 10 GB/s, link efficiency 0.5, 8 GPUs per node
    deg = {"pp": 1, "dp_replicate": 1, "dp_shard": 4, "cp": 1, "tp": 2}  # 8 ranks: one node
    assert link_gbps(hw, deg, ("tp",)) == 100 * 0.5
    assert link_gbps(hw, deg, ("dp_shard",)) == 100 * 0.5  # stride 2 x 4 ranks = 8: still one node
    deg16 = {"pp": 1, "dp_replicate": 1, "dp_shard": 2, "cp": 1, "tp": 8}  # 16 ranks: tp fills a node
    assert link_gbps(hw, deg16, ("tp",)) == 100 * 0.5
    assert link_gbps(hw, deg16, ("dp_shard",)) == 10 * 0.5  # stride 8 x 2 = 16 ranks: two nodes
    # dp_shard x cp flattened: stride 1 (tp 1), span 4 x 4 = 16 > 8.
    deg_cp = {"pp": 1, "dp_replicate": 1, "dp_shard": 4, "cp": 4, "tp": 1}
    assert link_gbps(hw, deg_cp, ("dp_shard", "cp")) == 10 * 0.5
    assert link_gbps(hw, deg_cp, ("cp",)) == 100 * 0.5
    # pp outermost: its neighbours are world / pp apart.
    deg_pp = {"pp": 2, "dp_replicate": 1, "dp_shard": 4, "cp": 1, "tp": 1}
    assert link_gbps(hw, deg_pp, ("pp",)) == 100 * 0.5  # 2 x 4 = 8
    assert link_gbps(dataclasses.replace(hw, gpus_per_node=4), deg_pp, ("pp",)) == 10 * 0.5


def test_collective_s_ring_bus_bandwidth():
    # 8 GB over 4 ranks at 50 GB/s: 8e9 x 3/4 / 50e9 = 0.12 s.
    assert _collective_s(8e9, 4, 50.0) == pytest.approx(0.12)
    # 2 ranks: half the bytes move.
    assert _collective_s(1e9, 2, 10.0) == pytest.approx(0.05)
    assert _collective_s(8e9, 1, 50.0) == 0.0


def test_compute_term_of_one_gpu_step_by_hand():
    c = one_gpu_candidate(seq_len=64, batch=2)
    st = estimate_step_time(c, ROUND_HW, compile=True)
    tokens = 2 * 64  # global batch x seq, all on this one GPU
    gemm_rate = 100e12 * 0.5  # peak x gemm_efficiency
    attn_rate = 100e12 * 0.25  # peak x attention_efficiency
    block_gemm = 6 * (WQ + WK + WV + WO + W1 + W2 + W3)  # 6 FLOPs per param per token: 4_718_592
    attention = 6 * H * 64  # 6 h s per token per block (causal half of 12 h s): 98_304
    elementwise = 40 * H / (1000 * 1e9)  # compiled: 40 bytes per element of h, at 1000 GB/s
    output_gemm = 6 * VOCAB * H  # 3_072_000
    per_token = LAYERS * (block_gemm / gemm_rate + attention / attn_rate + elementwise) + output_gemm / gemm_rate
    assert st.compute == pytest.approx(tokens * per_token, rel=1e-12)
    assert st.compute == pytest.approx(9.1226112e-05, rel=1e-9)
    # One GPU: no communication, no bubble, no recompute.
    assert (st.recompute, st.fsdp_exposed, st.fsdp_total, st.tp, st.cp, st.pp_p2p, st.bubble) == (0, 0, 0, 0, 0, 0, 0)
    assert st.total == pytest.approx(st.compute + st.optimizer)

    # Eager: 120 bytes per element instead of 40.
    eager = estimate_step_time(c, ROUND_HW, compile=False)
    assert eager.compute - st.compute == pytest.approx(tokens * LAYERS * (120 - 40) * H / 1e12, rel=1e-9)

    # Full AC recomputes the blocks' forward: a third of their forward + backward.
    full = estimate_step_time(one_gpu_candidate(ac="full", seq_len=64, batch=2), ROUND_HW, compile=True)
    block_s = tokens * LAYERS * (block_gemm / gemm_rate + attention / attn_rate + elementwise)
    assert full.recompute == pytest.approx(block_s / 3, rel=1e-12)
    assert full.compute == pytest.approx(st.compute, rel=1e-12)


def tp2_candidate(*, ac: str = "none", float8: bool = False, async_tp: bool = False, hw: HardwareProfile = ROUND_HW):
    """The debug model on 2 GPUs as TP 2: 2 sequences of 64 in one microbatch."""
    inputs = PlanInputs(base_argv=DEBUG_ARGV, world_size=2, hardware=hw, seq_len=64, global_batch_size=2)
    return check(inputs, Layout(dp_replicate=1, dp_shard=1, cp=1, tp=2, pp=1, local_batch_size=2, microbatch_size=2,
                                ac=ac, float8=float8, async_tp=async_tp))


# TP 2 inside one node of ROUND_HW: 100 GB/s x 0.5. One collective over 2 ranks moves half of the
# gathered tensor: 128 tokens x 256 x 2 bytes / 2 / 50e9 = 6.5536e-7 s in bf16, half that in float8.
TP_BF16_S = 128 * H * 2 / 2 / 50e9
TP_FP8_S = 128 * H * 1 / 2 / 50e9
# The matmul each TP collective feeds or follows, on one rank (2 x tokens x in x out / tp FLOPs), at
# ROUND_HW's 50 TFLOPS (bf16 100 x 0.5; fp8 200 x 0.25, the same rate).
MM_S = {"wqkv": 2 * 128 * H * (H + 2 * KVD) / 2 / 50e12, "wo": 2 * 128 * H * H / 2 / 50e12,
        "w13": 2 * 128 * H * 2 * FFN / 2 / 50e12, "w2": 2 * 128 * H * FFN / 2 / 50e12}


def test_tp_collectives_by_hand():
    st = estimate_step_time(tp2_candidate(), ROUND_HW, compile=True)
    # 2 all-gathers + 2 reduce-scatters forward, as many backward, per block, one microbatch, 6 blocks.
    assert st.tp == pytest.approx(8 * TP_BF16_S * LAYERS, rel=1e-12)
    assert st.tp == pytest.approx(3.145728e-05, rel=1e-9)
    # Full AC gathers and scatters again in the recompute (the forward's 4).
    full = estimate_step_time(tp2_candidate(ac="full"), ROUND_HW, compile=True)
    assert full.tp == pytest.approx(12 * TP_BF16_S * LAYERS, rel=1e-12)


def test_tp_gathers_float8_on_cuda_only():
    # torchao's float8 TP styles gather float8 activations (forward) and gradients (backward): the 4
    # all-gathers move 1 byte per element, the 4 reduce-scatters stay bf16.
    st = estimate_step_time(tp2_candidate(float8=True), ROUND_HW, compile=True)
    assert st.tp == pytest.approx((4 * TP_FP8_S + 4 * TP_BF16_S) * LAYERS, rel=1e-12)
    assert st.tp == pytest.approx(2.359296e-05, rel=1e-9)
    # On CPU (gloo cannot gather float8) the trainer uses the plain styles, in the activations' dtype:
    # float32 there for mixed_precision_param "auto", bfloat16 when the job asks for it.
    cpu = dataclasses.replace(ROUND_HW, device="cpu")
    st_cpu = estimate_step_time(tp2_candidate(float8=True, hw=cpu), cpu, compile=True)
    assert st_cpu.tp == pytest.approx(8 * 2 * TP_BF16_S * LAYERS, rel=1e-12)
    inputs = PlanInputs(base_argv=DEBUG_ARGV + ("--training.mixed_precision_param", "bfloat16"), world_size=2,
                        hardware=cpu, seq_len=64, global_batch_size=2)
    bf16 = check(inputs, Layout(dp_replicate=1, dp_shard=1, cp=1, tp=2, pp=1, local_batch_size=2, microbatch_size=2,
                                float8=True))
    assert estimate_step_time(bf16, cpu, compile=True).tp == pytest.approx(8 * TP_BF16_S * LAYERS, rel=1e-12)


def test_async_tp_hides_each_collective_under_its_matmul():
    st = estimate_step_time(tp2_candidate(async_tp=True), ROUND_HW, compile=True)
    # tp 2: each collective is split in 2; the local half of the matmul cannot overlap, the other
    # half (tp - 1) / tp = 1/2 of it does. Forward: gather->wqkv, wo->scatter, gather->w1/w3,
    # w2->scatter; backward: wqkv's input gradient->scatter, gather->wo's, and so on: the same pairs.
    per_pass = sum(TP_BF16_S - MM_S[name] / 2 for name in ("wqkv", "wo", "w13", "w2"))
    assert per_pass == pytest.approx(1.61480704e-06, rel=1e-9)  # every collective longer than half its matmul
    assert st.tp == pytest.approx(2 * per_pass * LAYERS, rel=1e-12)
    assert st.tp < estimate_step_time(tp2_candidate(), ROUND_HW, compile=True).tp
    # A link 100x faster: every collective fits under its matmul; nothing is exposed.
    fast = dataclasses.replace(ROUND_HW, intra_node_gbps=10_000.0)
    assert estimate_step_time(tp2_candidate(async_tp=True, hw=fast), fast, compile=True).tp == 0.0
    # Compute is not changed by async TP.
    assert st.compute == estimate_step_time(tp2_candidate(), ROUND_HW, compile=True).compute


def test_fsdp_float8_all_gather_gathers_the_block_linears_in_float8():
    inputs = PlanInputs(base_argv=DEBUG_ARGV, world_size=2, hardware=ROUND_HW, seq_len=64, global_batch_size=2)
    base = Layout(dp_replicate=1, dp_shard=2, cp=1, tp=1, pp=1, local_batch_size=1, microbatch_size=1, float8=True)
    plain, f8ag = (check(inputs, dataclasses.replace(base, float8_all_gather=ag)) for ag in (False, True))
    linears = PER_LAYER - NORMS  # 786_432 per block: everything but the two norms
    # Time: 2 gathers per microbatch (forward, and again in backward), 1 microbatch; one byte less per
    # linear weight element, over 2 ranks (half moves) at 50 GB/s.
    saved = 2 * LAYERS * linears * 1 / 2 / 50e9
    t_plain, t_f8ag = (estimate_step_time(c, ROUND_HW, compile=True) for c in (plain, f8ag))
    assert t_plain.fsdp_total - t_f8ag.fsdp_total == pytest.approx(saved, rel=1e-9)
    assert saved == pytest.approx(9.437184e-05, rel=1e-9)
    # Memory: the two gathered blocks hold their linear weights in float8 (1 byte, not 2), and there
    # is no separate float8 copy of them, only the transposes: one byte per block element.
    m_plain, m_f8ag = (estimate_memory(c, pp_rank=0) for c in (plain, f8ag))
    assert m_plain.gathered - m_f8ag.gathered == 2 * linears == 1_572_864
    assert m_plain.float8 == 2 * PER_LAYER and m_f8ag.float8 == PER_LAYER == 786_944


def test_blocks_that_do_not_reshard_after_forward_gather_once_and_stay_gathered():
    inputs = PlanInputs(base_argv=DEBUG_ARGV, world_size=2, hardware=ROUND_HW, seq_len=64, global_batch_size=2)
    base = Layout(dp_replicate=1, dp_shard=2, cp=1, tp=1, pp=1, local_batch_size=1, microbatch_size=1)
    default, never = (check(inputs, dataclasses.replace(base, reshard_after_forward=r)) for r in (True, False))
    assert never.cfg.parallelism.fsdp_reshard_after_forward == "never"
    assert default.cfg.parallelism.fsdp_reshard_after_forward == "default"
    # One all-gather per microbatch instead of two (forward and backward): the whole model's bf16
    # parameters once less (6 blocks + embedding + output, 5_745_664), half of it moving over 2 ranks.
    t_default, t_never = (estimate_step_time(c, ROUND_HW, compile=True) for c in (default, never))
    saved = (LAYERS * PER_LAYER + 2 * EMBEDDING) * 2 / 2 / 50e9
    assert t_default.fsdp_total - t_never.fsdp_total == pytest.approx(saved, rel=1e-9)
    assert saved == pytest.approx(1.1491328e-04, rel=1e-9)
    # Memory: all 6 blocks gathered in bf16 at the start of backward, not 2.
    m_default, m_never = (estimate_memory(c, pp_rank=0) for c in (default, never))
    assert m_never.gathered - m_default.gathered == (LAYERS - 2) * PER_LAYER * 2 == 6_295_552


def test_the_search_offers_async_tp_and_float8_all_gather_only_where_the_trainer_can_run_them():
    from torchtitan_like.planner.layout import layouts

    def options(**kw) -> set[tuple[int, int, bool, bool, bool]]:
        """(tp, FSDP degree dp_shard x cp, float8, float8 all-gather, async TP) of every layout searched."""
        inputs = PlanInputs(**{"base_argv": DEBUG_ARGV, "world_size": 2, "hardware": ROUND_HW, "seq_len": 64,
                               "global_batch_size": 2, **kw})
        return {(L.tp, L.dp_shard * L.cp, L.float8, L.float8_all_gather, L.async_tp) for L in layouts(inputs, LAYERS)}

    got = options()
    assert (2, 1, False, False, True) in got and (2, 1, True, False, True) in got  # async TP with TP only
    assert not any(atp for tp, _, _, _, atp in got if tp == 1)
    assert (1, 2, True, True, False) in got  # float8 all-gather with FSDP only, and with float8 only
    assert not any(ag for tp, fsdp, f8, ag, _ in got if fsdp == 1 or not f8)
    assert not any(L[4] for L in options(compile=False))  # async TP is an inductor pass
    assert not any(L[4] for L in options(base_argv=(*DEBUG_ARGV, "--compile.backend", "aot_eager")))
    assert not any(L[4] for L in options(hardware=dataclasses.replace(ROUND_HW, device="cpu")))  # and CUDA-only
    assert not any(L[4] for L in options(allow=frozenset(FEATURES) - {"async_tp"}))
    # Not resharding after forward: FSDP without PP only (PP never reshards anyway).
    inputs = PlanInputs(base_argv=DEBUG_ARGV, world_size=4, hardware=ROUND_HW, seq_len=64, global_batch_size=8)
    kept = {(L.dp_shard * L.cp, L.pp) for L in layouts(inputs, LAYERS) if not L.reshard_after_forward}
    assert kept and all(fsdp > 1 and pp == 1 for fsdp, pp in kept)


def test_a_chunked_loss_recomputes_the_output_projection_forward():
    whole = estimate_step_time(one_gpu_candidate(seq_len=64, batch=2), ROUND_HW, compile=True)
    chunked = estimate_step_time(one_gpu_candidate(seq_len=64, batch=2, loss_chunk_size=16), ROUND_HW, compile=True)
    # Each chunk's projection runs again in backward: 2 FLOPs per output weight per token, at the GEMM rate.
    assert chunked.recompute - whole.recompute == pytest.approx(2 * 64 * 2 * VOCAB * H / (100e12 * 0.5), rel=1e-12)
    assert chunked.compute == whole.compute


def test_the_search_tries_a_chunked_loss_only_where_the_vocabulary_is_whole():
    from torchtitan_like.planner.layout import LOSS_CHUNK, layouts

    def tp_and_chunk(seq_len: int, *extra: str) -> set[tuple[int, int]]:
        inputs = PlanInputs(base_argv=(*DEBUG_ARGV, *extra), world_size=2, hardware=ROUND_HW, seq_len=seq_len,
                            global_batch_size=2)
        return {(layout.tp, layout.loss_chunk_size) for layout in layouts(inputs, LAYERS)}

    # TP 2 keeps the logits vocab-sharded (loss parallel, which refuses chunking): never chunked.
    assert tp_and_chunk(4 * LOSS_CHUNK) == {(1, 0), (1, LOSS_CHUNK), (2, 0)}
    assert tp_and_chunk(LOSS_CHUNK) == {(1, 0), (2, 0)}  # one chunk would be the whole sequence
    # A job without loss parallel has whole logits under TP too: chunking is offered there (it was not).
    assert tp_and_chunk(4 * LOSS_CHUNK, "--parallelism.disable_loss_parallel") == {
        (1, 0), (1, LOSS_CHUNK), (2, 0), (2, LOSS_CHUNK)
    }
    inputs = PlanInputs(base_argv=(*DEBUG_ARGV, "--parallelism.disable_loss_parallel"), world_size=2,
                        hardware=ROUND_HW, seq_len=4 * LOSS_CHUNK, global_batch_size=2, allow=frozenset({"tp"}))
    check(inputs, next(L for L in layouts(inputs, LAYERS) if L.tp == 2 and L.loss_chunk_size))  # the trainer accepts it


def test_the_plan_chunks_the_loss_where_only_that_fits():
    # Debug model, one GPU, 16k positions, full AC: the whole logits (16384 x 2000 x 10 bytes) are the
    # biggest item; memory set between the chunked and the whole-logits totals.
    def candidate(chunk: int):
        return one_gpu_candidate(ac="full", seq_len=16384, batch=1, loss_chunk_size=chunk)

    chunked, whole = (peak_memory(candidate(c)).total for c in (2048, 0))
    assert chunked < whole
    hbm = 2.0 + (chunked + whole) / 2 / GIB  # + the profile's reserved 2 GiB
    inputs = PlanInputs(base_argv=DEBUG_ARGV, world_size=1, hardware=dataclasses.replace(ROUND_HW, hbm_gib=hbm),
                        seq_len=16384, global_batch_size=1, allow=frozenset({"ac"}))
    plan = make_plan(inputs, LAYERS)
    assert plan.ranked and {p.layout.loss_chunk_size for p in plan.ranked} == {2048}
    assert any(p.layout.loss_chunk_size == 0 and p.layout.ac == "full" for p in plan.too_big)
    assert "--training.loss_chunk_size" in plan.ranked[0].layout.overrides()


def test_throughput_is_global_tokens_per_step_per_gpu():
    inputs = PlanInputs(base_argv=DEBUG_ARGV, world_size=2, hardware=ROUND_HW, seq_len=64, global_batch_size=4)
    c = check(inputs, Layout(dp_replicate=1, dp_shard=2, cp=1, tp=1, pp=1, local_batch_size=2, microbatch_size=2))
    step = StepTime(compute=0.25, recompute=0.0, fsdp_exposed=0.125, tp=0.0, cp=0.0, pp_p2p=0.0, bubble=0.0,
                    optimizer=0.125, fsdp_total=1.0)
    assert step.total == 0.5  # fsdp_total is not added: only its exposed part is
    t = throughput(c, step, ROUND_HW)
    # 4 sequences x 64 tokens per step, 0.5 s per step, 2 GPUs: 256 tokens/s per GPU.
    assert t.tokens_per_s_per_gpu == 4 * 64 / 0.5 / 2 == 256
    assert t.tflops_per_gpu == pytest.approx(256 * model_flops_per_token(c.model_args, 64) / 1e12)
    assert t.mfu == pytest.approx(t.tflops_per_gpu / 100.0)


# ---- hardware.py --------------------------------------------------------------------------------


def test_load_builtin_profile_by_name_case_insensitive():
    assert load_profile("H100") is BUILTIN_PROFILES["H100"]
    assert load_profile("h100") is BUILTIN_PROFILES["H100"]
    assert load_profile("h100-gt") is BUILTIN_PROFILES["H100-GT"]
    assert load_profile("b200").hbm_gib == pytest.approx(178.4)


def test_profile_json_round_trip(tmp_path: Path):
    path = tmp_path / "gpu.json"
    path.write_text(ROUND_HW.to_json())
    assert load_profile(str(path)) == ROUND_HW
    # A file that leaves out the defaulted fields gets the defaults.
    minimal = {k: v for k, v in json.loads(ROUND_HW.to_json()).items() if k not in ("gemm_efficiency", "reserved_gib")}
    path.write_text(json.dumps(minimal))
    loaded = load_profile(str(path))
    defaults = {f.name: f.default for f in dataclasses.fields(HardwareProfile)}
    assert loaded.gemm_efficiency == defaults["gemm_efficiency"] != ROUND_HW.gemm_efficiency
    assert loaded.reserved_gib == defaults["reserved_gib"]
    assert loaded == dataclasses.replace(ROUND_HW, gemm_efficiency=defaults["gemm_efficiency"])


@pytest.mark.parametrize("field, text", [
    ("hbm_gib", "Infinity"),  # (was accepted: "fit in inf GiB", every layout fits)
    ("hbm_gbps", "-Infinity"),
    ("gemm_efficiency", "NaN"),  # (was "has the wrong type or sign")
    ("peak_fp8_tflops", "1e999"),  # (json reads it as inf)
    ("reserved_gib", "NaN"),
])
def test_a_profile_with_infinity_or_nan_is_refused_naming_the_field(tmp_path: Path, field: str, text: str):
    path = tmp_path / "gpu.json"
    data = json.loads(ROUND_HW.to_json())
    path.write_text(json.dumps({**data, field: "VALUE"}).replace('"VALUE"', text))
    with pytest.raises(ConfigError) as e:
        load_profile(str(path))
    value = {"Infinity": "inf", "-Infinity": "-inf", "NaN": "nan", "1e999": "inf"}[text]
    assert str(e.value) == (f"hardware profile {path}: field {field}={value} must be a finite number: measure it "
                            "with benchmarks/calibrate.py, or use a built-in profile's value")


def test_profile_errors_name_the_problem(tmp_path: Path):
    path = tmp_path / "gpu.json"
    data = json.loads(ROUND_HW.to_json())
    path.write_text(json.dumps({**data, "tensor_cores": 4}))
    with pytest.raises(ConfigError, match=r"unknown fields \['tensor_cores'\]"):
        load_profile(str(path))
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match="neither a built-in") as e:
        load_profile(str(missing))
    assert "nope.json" in str(e.value) and "H100" in str(e.value)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_profile(str(path))
    path.write_text(json.dumps({**data, "device": "tpu"}))
    with pytest.raises(ConfigError, match=r"field device='tpu' must be \"cuda\" or \"cpu\""):
        load_profile(str(path))
    del data["hbm_gib"]
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="hbm_gib"):
        load_profile(str(path))


@pytest.mark.parametrize("field", ["peak_bf16_tflops", "peak_fp8_tflops", "hbm_gib", "hbm_gbps", "intra_node_gbps",
                                   "inter_node_gbps", "gemm_efficiency", "fp8_gemm_efficiency",
                                   "attention_efficiency", "link_efficiency"])
def test_a_profile_rate_of_zero_is_refused_naming_the_field(tmp_path: Path, field: str):
    # The cost model divides by each of them: a 0 (a calibration that measured nothing) was a ZeroDivisionError
    # traceback out of tools/plan.py.
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({**json.loads(ROUND_HW.to_json()), field: 0}))
    with pytest.raises(ConfigError, match=rf"hardware profile .*gpu.json: field {field}=0 must be > 0"):
        load_profile(str(path))
    # reserved_gib may be 0 (nothing held back), and peak_fp8_tflops null (no float8 matmuls).
    path.write_text(json.dumps({**json.loads(ROUND_HW.to_json()), "reserved_gib": 0, "peak_fp8_tflops": None}))
    assert load_profile(str(path)).reserved_gib == 0


# ---- layout.py and plan.py ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, mode, option, converters",
    [
        (Layout(dp_replicate=2, dp_shard=2, cp=1, tp=2, pp=2, local_batch_size=4, microbatch_size=2,
                pp_schedule="Interleaved1F1B", ac="selective_op"), "selective", "op", []),
        (Layout(dp_replicate=1, dp_shard=4, cp=2, tp=1, pp=1, local_batch_size=3, microbatch_size=3, ac="full",
                float8=True, loss_chunk_size=2048, float8_all_gather=True), "full", None, ["float8"]),
        (Layout(dp_replicate=1, dp_shard=2, cp=1, tp=2, pp=1, local_batch_size=1, microbatch_size=1, async_tp=True,
                reshard_after_forward=False), "none", None, []),
    ],
)
def test_layout_overrides_load_back_to_the_same_degrees(layout, mode, option, converters):
    cfg = load_config([*DEBUG_ARGV, *layout.overrides(), "--compile.enable"])  # async TP needs compile
    p = cfg.parallelism
    got = {"dp_replicate": p.data_parallel_replicate_degree, "dp_shard": p.data_parallel_shard_degree,
           "cp": p.context_parallel_degree, "tp": p.tensor_parallel_degree, "pp": p.pipeline_parallel_degree}
    assert got == layout.degrees
    assert cfg.training.local_batch_size == layout.local_batch_size
    assert cfg.activation_checkpoint.mode == mode
    if option is not None:
        assert cfg.activation_checkpoint.selective_ac_option == option
    assert cfg.model.converters == converters
    assert cfg.training.loss_chunk_size == layout.loss_chunk_size
    assert p.enable_async_tensor_parallel == layout.async_tp
    assert p.fsdp_reshard_after_forward == ("default" if layout.reshard_after_forward else "never")
    f8 = cfg.quantize.linear.float8
    assert f8.enable_fsdp_float8_all_gather == f8.precompute_float8_dynamic_scale_for_fsdp == layout.float8_all_gather
    if layout.pp > 1:
        assert p.pipeline_parallel_schedule == layout.pp_schedule
        assert p.pipeline_parallel_microbatch_size == layout.microbatch_size


def test_check_refuses_tp3_on_the_debug_model_with_the_trainers_message():
    inputs = PlanInputs(base_argv=DEBUG_ARGV, world_size=3, hardware=ROUND_HW, seq_len=64, global_batch_size=1)
    layout = Layout(dp_replicate=1, dp_shard=1, cp=1, tp=3, pp=1, local_batch_size=1, microbatch_size=1)
    with pytest.raises(ConfigError, match=r"parallelism\.tensor_parallel_degree=3 must divide model n_heads=16"):
        check(inputs, layout)
    # The same job with tp 2 on 2 GPUs passes the same checks.
    ok = check(dataclasses.replace(inputs, world_size=2), dataclasses.replace(layout, tp=2))
    assert ok.cfg.parallelism.tensor_parallel_degree == 2 and ok.model_args.n_heads == 16


def test_plan_for_the_debug_model_on_8_gpus_ranks_only_layouts_that_fit_fastest_first():
    # 2.1 GiB with 2 GiB reserved leaves 0.1 GiB: some layouts of this job fit, some do not.
    hw = dataclasses.replace(ROUND_HW, hbm_gib=2.1)
    inputs = PlanInputs(base_argv=DEBUG_ARGV, world_size=8, hardware=hw, seq_len=2048, global_batch_size=16,
                        allow=frozenset(FEATURES) - {"float8"})
    plan = make_plan(inputs, DEBUG.n_layers)
    assert plan.ranked, "no layout ranked"
    assert plan.too_big, "the memory limit did not exclude anything: the fit test is not exercised"
    usable = (2.1 - 2.0) * GIB
    for p in plan.ranked:
        assert p.fits and p.memory.total <= usable, p.layout.describe()
        assert p.layout.world_size == 8
    for p in plan.too_big:
        assert not p.fits and p.memory.total > usable, p.layout.describe()
    speeds = [p.speed.tokens_per_s_per_gpu for p in plan.ranked]
    assert speeds == sorted(speeds, reverse=True)
    assert all(s > 0 for s in speeds)
    # More than one kind of layout is on offer (the search is not one point).
    assert len({(p.layout.dp_shard, p.layout.tp, p.layout.pp, p.layout.cp) for p in plan.ranked}) > 3


def test_check_refuses_what_the_profiles_device_refuses_as_the_trainer_does():
    # A CPU profile (benchmarks/calibrate.py on a CPU) plans a CPU job: FlexAttention, which the CPU trainer
    # refuses at start, must not be planned (and "verified" by a CUDA dry run) as a fitting layout.
    cpu = dataclasses.replace(ROUND_HW, device="cpu")
    layout = Layout(dp_replicate=1, dp_shard=2, cp=1, tp=1, pp=1, local_batch_size=1, microbatch_size=1)
    flex = PlanInputs(base_argv=(*DEBUG_ARGV, "--model.attn_type", "flex"), world_size=2, hardware=cpu, seq_len=64,
                      global_batch_size=2)
    with pytest.raises(ConfigError, match=r'model\.attn_type="flex" needs CUDA to train'):
        check(flex, layout)
    plan = make_plan(flex, DEBUG.n_layers)
    assert not plan.ranked and not plan.too_big
    assert any("model.attn_type" in reason for reason in plan.refused), plan.refused
    # The same job on a CUDA profile is planned.
    assert check(dataclasses.replace(flex, hardware=ROUND_HW), layout).cfg.model.attn_type == "flex"


def test_check_refuses_a_float8_layout_whose_tp_split_cuda_cannot_multiply_as_the_dry_run_does():
    # The debug model's 2000-token output projection converted to float8 (filter_fqns = []): under TP 2 each rank
    # multiplies a 1000 x 256 weight, which CUDA's float8 matmul refuses (the trainer's check_gemm_dims, in the dry
    # run and at start). The planner ranked such layouts.
    argv = (*DEBUG_ARGV, "--quantize.linear.float8.filter_fqns", "")
    inputs = PlanInputs(base_argv=argv, world_size=2, hardware=ROUND_HW, seq_len=64, global_batch_size=2)
    tp2 = Layout(dp_replicate=1, dp_shard=1, cp=1, tp=2, pp=1, local_batch_size=1, microbatch_size=1, float8=True)
    message = "float8: linear 'output' multiplies a 1000x256 weight on each rank with tensor parallel's split"
    with pytest.raises(ConfigError, match=re.escape(message)):
        check(inputs, tp2)
    # The dry run of that layout refuses it with the same message.
    from torchtitan_like.dry_run import dry_run

    with pytest.raises(ConfigError, match=re.escape(message)):
        dry_run(inputs.argv(tp2), world_size=2, device="cuda", files=False)
    # Without TP (2000 x 256 is fine), with output kept in high precision, or emulated, it is offered.
    check(inputs, dataclasses.replace(tp2, tp=1, dp_shard=2))
    check(dataclasses.replace(inputs, base_argv=DEBUG_ARGV), tp2)
    check(dataclasses.replace(inputs, base_argv=(*argv, "--quantize.linear.float8.emulate")), tp2)
    plan = make_plan(dataclasses.replace(inputs, global_batch_size=4), DEBUG.n_layers)
    assert not [p for p in plan.ranked + plan.too_big if p.layout.float8 and p.layout.tp > 1]
    assert [p for p in plan.ranked if p.layout.float8]
