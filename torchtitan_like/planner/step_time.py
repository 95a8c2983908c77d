"""Step time of one layout, itemized, and the throughput it implies.

Compute: the FLOPs of this rank's share of the step (the trainer's FLOPs formula, with the causal
half of the attention scores, plus the recomputation its AC mode and a chunked loss add), at the profile's
achievable GEMM rate (fp8 for the float8 linears) and attention rate, plus the elementwise traffic
at HBM bandwidth (eager moves ~3x the bytes a compiled block does).

Communication, each over the link its mesh dim maps to (NVLink when the group fits in a node,
else the NIC), bus-bandwidth convention (bytes x (n-1)/n per rank). "bf16" below stands for
training.mixed_precision_param as the trainer resolves it on the profile's device (float32 for "auto"
on a CPU profile), "fp32 gradients" for training.mixed_precision_reduce:
- FSDP: all-gather of the bf16 parameters (the block linears' weights in float8 with FSDP float8
  all-gather; twice per microbatch when blocks reshard after forward, once per microbatch when they
  do not, once per step under PP, which never reshards) and reduce-scatter of the fp32 gradients per
  microbatch; HSDP adds an all-reduce of the shard across replicas, DDP an all-reduce of all
  gradients. Overlap model: these run under the compute of the other blocks; what exceeds the
  compute is exposed, plus one block's share of the traffic (the total over the blocks: the first
  gather and the last reduce-scatter have no compute to hide under).
- TP (sequence parallel): per block and microbatch, 2 all-gathers (the attention and feed-forward
  inputs, before wq/wk/wv and w1/w3) and 2 reduce-scatters (after wo and w2) of the activations in
  forward; in backward 2 all-gathers (the gradients of wo's and w2's outputs, before their input
  gradient matmuls) and 2 reduce-scatters (the input gradients of wq/wk/wv and w1/w3, after their
  matmuls); the forward's 4 again in a full-AC recompute. Reduce-scatters move bf16; all-gathers
  move float8 under float8 tensorwise on CUDA (torchao's float8 TP styles cast before gathering, and
  the gradients before their backward gather), bf16 otherwise. Exposed in full, unless async TP:
  then each collective is split into tp chunks pipelined with the matmul it feeds or follows, and
  only what exceeds that matmul's (tp - 1) / tp is exposed (one chunk's matmul cannot overlap).
- CP: each rank's K and V go around the ring (cp - 1 hops) in forward, K, V and their gradients in
  backward; exposed with the all-gather rotation, hidden under the attention compute with
  all-to-all.
- PP: P2P of the boundary activations; the fill and drain are exposed (2 (pp - 1) transfers); the
  bubble is the schedule's theoretical one (PipelinePlan.bubble_fraction, the trainer's formula).
- Optimizer: reading and writing the fp32 state at HBM bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchtitan_like.components.flops import model_flops_per_token
from torchtitan_like.planner.hardware import HardwareProfile
from torchtitan_like.planner.layout import Candidate
from torchtitan_like.planner.memory import FP8, block_params, compute_itemsize, reduce_itemsize
from torchtitan_like.planner.state import MESH_ORDER

ELEMENTWISE_BYTES_EAGER = 120
"""Bytes moved per activation element (h per token per block) by the elementwise ops of one block,
forward and backward, in eager mode: fp32 norms and RoPE, SiLU, residual adds, casts."""
ELEMENTWISE_BYTES_COMPILED = 40
"""The same once compile fuses them."""
OPTIMIZER_BYTES_PER_PARAM = 28
"""AdamW on fp32: read param, grad, exp_avg, exp_avg_sq (16 B), write param and the two states (12 B)."""


@dataclass(frozen=True)
class StepTime:
    compute: float
    recompute: float
    fsdp_exposed: float
    tp: float
    cp: float
    pp_p2p: float
    bubble: float
    optimizer: float
    fsdp_total: float
    """All FSDP/HSDP/DDP traffic time, exposed or not (the overlap model's input)."""

    @property
    def total(self) -> float:
        return (self.compute + self.recompute + self.fsdp_exposed + self.tp + self.cp + self.pp_p2p + self.bubble
                + self.optimizer)

    def items(self) -> dict[str, float]:
        return {"compute": self.compute, "recompute": self.recompute, "fsdp_exposed": self.fsdp_exposed,
                "tp": self.tp, "cp": self.cp, "pp_p2p": self.pp_p2p, "bubble": self.bubble,
                "optimizer": self.optimizer, "total": self.total, "fsdp_total": self.fsdp_total}


def link_gbps(hw: HardwareProfile, degrees: dict[str, int], dims: tuple[str, ...]) -> float:
    """Achievable bus bandwidth (GB/s) of a group over the mesh dims `dims` (adjacent in
    MESH_ORDER): NVLink when the group's ranks fit in one node, else the NIC."""
    inner = MESH_ORDER[MESH_ORDER.index(dims[-1]) + 1:]
    stride = 1
    for d in inner:
        stride *= degrees[d]
    span = stride
    for d in dims:
        span *= degrees[d]
    bw = hw.intra_node_gbps if span <= hw.gpus_per_node else hw.inter_node_gbps
    return bw * hw.link_efficiency


def _collective_s(nbytes: float, n: int, gbps: float) -> float:
    """Ring all-gather / reduce-scatter time of `nbytes` (the whole gathered size) over n ranks."""
    return 0.0 if n <= 1 else nbytes * (n - 1) / n / (gbps * 1e9)


def estimate_step_time(c: Candidate, hw: HardwareProfile, *, compile: bool) -> StepTime:
    L, a, cfg = c.layout, c.model_args, c.cfg
    s = cfg.training.seq_len
    deg = L.degrees
    tokens_per_rank = cfg.training.global_batch_size * s // L.dp // L.cp  # per step, this rank's sequence shards
    microbatches = cfg.training.global_batch_size // L.dp // L.microbatch_size  # per step (PP: per schedule)
    mb_tokens = L.microbatch_size * s // L.cp

    # Compute on the busiest pipeline rank: its blocks, plus the output projection if it holds it.
    layers = a.n_layers
    has_output = True
    if c.pp_plan is not None:
        per_rank = [sum(f.startswith("layers.") for s_ in c.pp_plan.stage_ids(r) for f in c.pp_plan.fqns_per_stage[s_])
                    for r in range(L.pp)]
        layers = max(per_rank)
        last = c.pp_plan.stage_ranks[-1]
        has_output = per_rank[last] == layers
    kvd = a.kv_heads * a.head_dim
    block_gemm = 6 * (2 * a.dim * a.dim + 2 * a.dim * kvd + 3 * a.dim * a.ffn_hidden_dim)  # per token
    attn = 6 * a.dim * s  # per token per block: 12·h·s scores, causal half (fwd + bwd)
    output_gemm = 6 * a.vocab_size * a.dim if has_output else 0
    gemm_rate = hw.peak_bf16_tflops * 1e12 * hw.gemm_efficiency
    block_gemm_rate = gemm_rate
    if L.float8 and hw.peak_fp8_tflops:
        block_gemm_rate = hw.peak_fp8_tflops * 1e12 * hw.fp8_gemm_efficiency
    attn_rate = hw.peak_bf16_tflops * 1e12 * hw.attention_efficiency
    per_token_block_s = block_gemm / block_gemm_rate + attn / attn_rate
    elementwise = (ELEMENTWISE_BYTES_COMPILED if compile else ELEMENTWISE_BYTES_EAGER) * a.dim / (hw.hbm_gbps * 1e9)
    per_token_block_s += elementwise
    work_tokens = tokens_per_rank / L.tp  # TP splits each token's matmuls; tokens counted per rank
    compute = work_tokens * (layers * per_token_block_s + output_gemm / gemm_rate)
    # Recompute: a forward is a third of forward + backward.
    recompute_share = {"none": 0.0, "selective_op": 0.0, "full": 1 / 3}[L.ac]
    recompute = work_tokens * layers * per_token_block_s * recompute_share
    if L.ac == "selective_op":
        recompute = work_tokens * layers * elementwise / 3
    chunk = cfg.training.loss_chunk_size
    if output_gemm and chunk and chunk < s // L.cp:
        recompute += work_tokens * (output_gemm / 3) / gemm_rate  # each chunk's projection again in backward

    # FSDP / HSDP / DDP traffic of this rank's stage parameters.
    stage_params = layers * block_params(a) / L.tp
    block_linears = layers * (block_params(a) - 2 * a.dim) / L.tp  # all but the two norms
    tables = 1 if L.pp > 1 or a.tie_word_embeddings else 2  # a stage holds the embedding or the output
    stage_params += (a.vocab_size * a.dim / L.tp) * tables
    act, grad = compute_itemsize(c), reduce_itemsize(c)  # bytes per parameter/activation, per reduced gradient
    gathered_bytes = stage_params * act
    if L.float8 and L.float8_all_gather:
        gathered_bytes -= block_linears * (act - FP8)
    n_fsdp = L.dp_shard * L.cp
    fsdp_total = 0.0
    if n_fsdp > 1:
        bw = link_gbps(hw, deg, tuple(d for d in ("dp_shard", "cp") if deg[d] > 1))
        # Blocks that reshard after forward gather again in backward; PP never reshards (one gather per step).
        gathers = 1 if L.pp > 1 else (2 if L.reshard_after_forward else 1) * microbatches
        scatters = 1 if L.pp > 1 else microbatches
        fsdp_total += gathers * _collective_s(gathered_bytes, n_fsdp, bw)
        fsdp_total += scatters * _collective_s(stage_params * grad, n_fsdp, bw)
    if L.dp_replicate > 1:
        bw = link_gbps(hw, deg, ("dp_replicate",))
        shard = stage_params / n_fsdp
        fsdp_total += 2 * _collective_s(shard * grad, L.dp_replicate, bw)  # all-reduce = RS + AG
    block_share = fsdp_total / max(layers, 1)
    fsdp_exposed = max(0.0, fsdp_total - compute - recompute) + (block_share if fsdp_total else 0.0)

    tp_s = 0.0
    if L.tp > 1:
        bw = link_gbps(hw, deg, ("tp",))
        float8_styles = L.float8 and cfg.quantize.linear.float8.recipe_name == "tensorwise" and hw.device == "cuda"
        gather = _collective_s(mb_tokens * a.dim * (FP8 if float8_styles else act), L.tp, bw)
        scatter = _collective_s(mb_tokens * a.dim * act, L.tp, bw)
        # The matmul each collective feeds or follows, on this rank's share (one microbatch).
        mm = {name: 2 * mb_tokens * a.dim * width / L.tp / block_gemm_rate for name, width in
              (("wqkv", a.dim + 2 * kvd), ("wo", a.dim), ("w13", 2 * a.ffn_hidden_dim), ("w2", a.ffn_hidden_dim))}
        forward = [(gather, mm["wqkv"]), (scatter, mm["wo"]), (gather, mm["w13"]), (scatter, mm["w2"])]
        backward = [(scatter, mm["wqkv"]), (gather, mm["wo"]), (scatter, mm["w13"]), (gather, mm["w2"])]
        passes = forward + backward + (forward if L.ac == "full" else [])
        hidden = (L.tp - 1) / L.tp if L.async_tp else 0.0
        per_block = sum(max(0.0, comm - matmul * hidden) for comm, matmul in passes)
        tp_s = per_block * layers * microbatches
    cp_s = 0.0
    if L.cp > 1:
        bw = link_gbps(hw, deg, ("cp",))
        # This rank's K and V shard as attention gets them: expanded to every query head (the model's
        # repeat_kv comes before SDPA, so the ring moves n_heads x head_dim = dim per token, not kvd).
        kv = mb_tokens * 2 * a.dim / L.tp * act
        hops = (L.cp - 1) * (1 + 2 + (1 if L.ac == "full" else 0))  # forward, backward (K, V, dK, dV), recompute
        cp_s = kv * hops / (bw * 1e9) * layers * microbatches
        if cfg.parallelism.context_parallel_rotate_method == "alltoall":
            attn_s = work_tokens * layers * attn / attn_rate
            cp_s = max(0.0, cp_s - attn_s)
    pp_p2p = bubble = 0.0
    if c.pp_plan is not None:
        bw = link_gbps(hw, deg, ("pp",))
        transfer = mb_tokens * a.dim / L.tp * act / (bw * 1e9)
        pp_p2p = 2 * (L.pp - 1) * transfer
        frac = c.pp_plan.bubble_fraction() or 0.0
        bubble = frac * (compute + recompute + tp_s + cp_s)
    local_params = stage_params / n_fsdp
    optimizer = local_params * OPTIMIZER_BYTES_PER_PARAM / (hw.hbm_gbps * 1e9)
    return StepTime(compute=compute, recompute=recompute, fsdp_exposed=fsdp_exposed, tp=tp_s, cp=cp_s, pp_p2p=pp_p2p,
                    bubble=bubble, optimizer=optimizer, fsdp_total=fsdp_total)


@dataclass(frozen=True)
class Throughput:
    tokens_per_s_per_gpu: float
    tflops_per_gpu: float
    mfu: float


def throughput(c: Candidate, step: StepTime, hw: HardwareProfile) -> Throughput:
    """Tokens/s per GPU, and TFLOPS and MFU by the trainer's own FLOPs formula and the bf16 peak."""
    cfg = c.cfg
    tokens = cfg.training.global_batch_size * cfg.training.seq_len
    tps = tokens / step.total / c.layout.world_size
    tflops = tps * model_flops_per_token(c.model_args, cfg.training.seq_len) / 1e12
    return Throughput(tokens_per_s_per_gpu=tps, tflops_per_gpu=tflops, mfu=tflops / hw.peak_bf16_tflops)
