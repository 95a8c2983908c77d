"""Peak memory of one GPU under a layout, itemized.

Items (bytes, for the pipeline rank that peaks: the first holds the most microbatches in flight,
the last holds the logits):
- state: parameters, gradients, optimizer states: exact (planner/state.py), fp32;
- activations: what autograd saves per transformer block for one microbatch, under the AC mode,
  times the blocks and microbatches in flight (`activation_bytes_per_block`, `in_flight_chunks`); with
  model.attn_mask_type="block_causal" under SDPA, also each in-flight forward's dense additive mask
  (microbatch x seq_len² in the compute dtype, shared by the stage's blocks);
- logits: the output projection's logits and the loss's fp32 log-softmax and gradient for one
  microbatch, on the last stage (vocab sharded under loss parallel); with training.loss_chunk_size
  for one chunk of positions only, plus the final-norm hidden states the chunks are recomputed from;
- gathered: FSDP's gathered parameters (the current and the prefetched block in bf16, or every
  block when they do not reshard after forward: fsdp_reshard_after_forward="never", and always
  under PP) and one block's unsharded fp32 gradients before the reduce-scatter (the whole stage's
  under PP);
- recompute: a checkpointed block's recomputed activations during its backward (never at the same
  time as the logits, so the peak takes the larger of the two);
- float8: the float8 weight copies (and their transposes) of the gathered block; with FSDP float8
  all-gather the gathered linear weights are float8 already (1 byte in `gathered`, no copy);
- cp_kv: context parallel's K/V exchange buffer during one attention call (forward, or backward with
  the recomputed block): with the allgather rotation every cp rank's K and V (expanded to every query
  head, as the ring moves them), with alltoall the current and the next rank's;
- output_grad: the output projection's weight gradient, made at the start of the backward while the
  logits and their gradient are alive;
- backward_temp: the gradients of one block's largest intermediates while its backward runs (the three
  FFN-wide ones and two residual-wide ones);
- margin: FRAGMENTATION of everything but the state, for the caching allocator's fragmentation.

The items do not all coexist. The peak is the parameters and optimizer states plus the largest of three
phases (`phases`):
- backward_start: the saved activations, the logits and loss buffers, the output weight's gradient;
- in_backward: a block's backward (its recompute under AC, its temporaries) with the larger of what is
  left of the activations (and gathered weights) and what exists of the gradients (one shrinks as the
  other grows);
- optimizer_step: the gradients.
The gradients exist from the first microbatch's backward on, so under pipeline parallelism or gradient
accumulation they are counted in full in the first two phases too.

Under `torch.compile` (compile.components "model"), a block saves what inductor's partitioner keeps: the
matmul and attention inputs, not the norm, SiLU, product and K/V-expansion outputs it recomputes. With
"loss" compiled, the cross-entropy keeps no fp32 copy of the logits: the logits and their gradient, in the
compute dtype. Under autocast without FSDP/DDP (one GPU, float32 storage) the residual stream is float32,
because the embedding's output is: the block inputs and residuals count 4 bytes.
The hardware profile's `reserved_gib` (CUDA context, NCCL) is added when checking the fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchtitan_like.distributed.utils import param_dtype, reduce_dtype
from torchtitan_like.models.llama3.args import TransformerArgs
from torchtitan_like.planner.layout import Candidate, Layout
from torchtitan_like.planner.state import StateBytes, predicted_state_bytes, state_itemsize

FP8 = 1
BF16 = 2
FP32 = 4
FRAGMENTATION = 0.10
"""Stated allowance for allocator fragmentation, as a fraction of the non-state memory."""
LOSS_FP32_BYTES = FP32 + FP32
"""Per logit element at the loss, besides the logits themselves: the fp32 log-softmax and its gradient."""


def compute_itemsize(c: Candidate) -> int:
    """Bytes per activation element (and per gathered parameter): training.mixed_precision_param as the
    trainer resolves it on the profile's device ("auto": bfloat16 on CUDA, float32 on CPU)."""
    return param_dtype(c.cfg.training, c.device).itemsize


def reduce_itemsize(c: Candidate) -> int:
    """Bytes per reduced gradient element: training.mixed_precision_reduce."""
    return reduce_dtype(c.cfg.training.mixed_precision_reduce).itemsize


@dataclass(frozen=True)
class MemoryEstimate:
    pp_rank: int
    state: StateBytes
    activations: int
    logits: int
    gathered: int
    recompute: int
    float8: int
    margin: int
    cp_kv: int = 0
    output_grad: int = 0
    backward_temp: int = 0
    grads_accumulate: bool = True
    """The gradients exist while activations are saved: pipeline parallelism, gradient accumulation."""

    def phases(self) -> dict[str, int]:
        """Bytes above the parameters and optimizer states in each phase of a step (module docstring)."""
        grads = self.state.grads
        held = self.activations + self.gathered  # (autocast's weight copies are saved for backward too)
        saved = held + grads if self.grads_accumulate else max(held, grads)
        # The logits and loss buffers are freed before the first block's backward, which is where an AC
        # recomputation, its attention's K/V exchange and the block's temporaries happen: they never coexist.
        return {
            "backward_start": held + self.float8 + self.logits + self.output_grad
            + (grads if self.grads_accumulate else 0),
            "in_backward": saved + self.float8 + self.recompute + self.cp_kv + self.backward_temp,
            "optimizer_step": grads,
        }

    @property
    def peak_phase(self) -> str:
        phases = self.phases()
        return max(phases, key=phases.__getitem__)

    @property
    def total(self) -> int:
        return self.state.params + self.state.optimizer + max(self.phases().values()) + self.margin

    def items(self) -> dict[str, int]:
        return {
            "params": self.state.params, "grads": self.state.grads, "optimizer": self.state.optimizer,
            "activations": self.activations, "logits": self.logits, "gathered": self.gathered,
            "recompute": self.recompute, "cp_kv": self.cp_kv, "float8": self.float8,
            "output_grad": self.output_grad, "backward_temp": self.backward_temp, "margin": self.margin,
            "total": self.total,
        }


def block_params(a: TransformerArgs) -> int:
    kvd = a.kv_heads * a.head_dim
    return 2 * a.dim * a.dim + 2 * a.dim * kvd + 3 * a.dim * a.ffn_hidden_dim + 2 * a.dim


def activation_bytes_per_block(a: TransformerArgs, *, tokens: int, tp: int, ac: str, itemsize: int = BF16,
                               compiled: bool = False, residual_itemsize: int | None = None) -> int:
    """Bytes autograd keeps for one block's backward over `tokens` local tokens (bs x seq / cp).

    Without AC, per token (sequence parallel: the residual stream is sharded over TP, the inputs of
    the column-parallel linears are gathered whole):
      attention_norm input h/tp, its gathered output h (the input of wq/wk/wv), q h/tp, k and v as
      attention gets them, expanded to every query head (repeat_kv), h/tp each, the attention output h/tp, wo's input h/tp, ffn_norm input h/tp, its gathered
      output h (input of w1/w3), w1 and w3 outputs, SiLU output and their product ffn/tp each;
    plus fp32 per-row statistics (norms' rstd, attention logsumexp), negligible next to these.
    selective_op: the matmul and attention outputs (q, k and v as wk/wv make them, kvd/tp each,
    attention output, wo and w2 outputs, w1, w3) and the block input; the elementwise ops and the
    K/V expansion are recomputed.
    full: only the block input (the rest is recomputed during backward: see `recompute`).
    compiled (no AC): the block input and the residual after attention, q, k and v as wk/wv make them,
    the attention output, w1 and w3 outputs; inductor recomputes the norms, RoPE, SiLU, the product and
    the K/V expansion in the backward.
    The block input and the residual after attention count `residual_itemsize` (float32 under autocast).
    """
    h, ffn = a.dim, a.ffn_hidden_dim
    kvd = a.kv_heads * a.head_dim
    res = itemsize if residual_itemsize is None else residual_itemsize
    if ac == "full":
        per_token = h / tp * res
    elif ac == "selective_op":
        per_token = (h + h + 2 * kvd + h + h + 2 * ffn) / tp * itemsize + h / tp * res
    elif ac == "none" and compiled:
        per_token = (h + 2 * kvd + h + 2 * ffn) / tp * itemsize + 2 * h / tp * res
    elif ac == "none":
        per_token = (2 * h + (5 * h + 4 * ffn) / tp) * itemsize + 2 * h / tp * res
    else:
        raise ValueError(f"unknown AC mode {ac!r}")
    return int(tokens * per_token)


def backward_temp_bytes(a: TransformerArgs, *, tokens: int, tp: int, itemsize: int, residual_itemsize: int) -> int:
    """One block's backward temporaries: the gradients of its w1 and w3 outputs and of their product
    (FFN-wide), and the residual stream's incoming and outgoing gradients."""
    return int(tokens * (3 * a.ffn_hidden_dim * itemsize + 2 * a.dim * residual_itemsize) / tp)


def in_flight_chunks(layout: Layout, *, n_microbatches: int, stages_per_rank: int, pp_rank: int) -> int:
    """Microbatch x stage activations that pipeline rank `pp_rank` holds at its peak.

    GPipe and LoopedBFS run every forward first (all of them); 1F1B keeps pp - rank (its warm-up
    plus one); the interleaved and zero-bubble schedules warm up (v - 1) x pp + 2 x (pp - rank - 1)
    stage forwards, plus one (Megatron's interleaved warm-up, which torch's schedules follow).
    """
    p, m, v = layout.pp, n_microbatches, stages_per_rank
    if p == 1:
        return 1
    if layout.pp_schedule in ("GPipe", "LoopedBFS"):
        return m * v
    if layout.pp_schedule == "1F1B":
        return min(m, p - pp_rank)
    return min(m * v, (v - 1) * p + 2 * (p - pp_rank - 1) + 1)


def estimate_memory(c: Candidate, *, pp_rank: int) -> MemoryEstimate:
    """The itemized peak of pipeline rank `pp_rank` (data/tensor/context rank 0: the largest shards)."""
    L, a = c.layout, c.model_args
    stage_fqns = None
    stage_layers = [a.n_layers]  # blocks of each of this rank's stages, in local order
    has_output = has_embedding = True
    embedding_stage = 0
    n_mb, v = 1, 1
    if c.pp_plan is not None:
        plan = c.pp_plan
        stages = plan.stage_ids(pp_rank)
        stage_fqns = [plan.fqns_per_stage[s] for s in stages]
        names = [f for fqns in stage_fqns for f in fqns]
        stage_layers = [sum(f.startswith("layers.") for f in fqns) for fqns in stage_fqns]
        has_output, has_embedding = "output" in names, "tok_embeddings" in names
        embedding_stage = next((i for i, fqns in enumerate(stage_fqns) if "tok_embeddings" in fqns), 0)
        n_mb, v = plan.n_microbatches, plan.stages_per_rank
    # Global rank of (pp_rank, 0, 0, 0, 0): pp is the outermost mesh dim.
    rank = pp_rank * (L.world_size // L.pp)
    state = predicted_state_bytes(a, L.degrees, rank=rank, stage_fqns=stage_fqns,
                                  param_itemsize=state_itemsize(c.cfg.training))

    tokens = L.microbatch_size * c.cfg.training.seq_len // L.cp
    act = compute_itemsize(c)
    fsdp = L.dp_shard * L.cp > 1
    autocast = act < FP32 and not fsdp and L.dp_replicate == 1
    # Under autocast the embedding's output, and so the residual stream, stays in the storage dtype.
    res = state_itemsize(c.cfg.training) if autocast else act
    compiled = c.cfg.compile.enable and "model" in c.cfg.compile.components
    compiled_loss = c.cfg.compile.enable and "loss" in c.cfg.compile.components
    per_block = activation_bytes_per_block(a, tokens=tokens, tp=L.tp, ac=L.ac, itemsize=act, compiled=compiled,
                                           residual_itemsize=res)
    chunks = in_flight_chunks(L, n_microbatches=n_mb, stages_per_rank=v, pp_rank=pp_rank)
    # Which local stage each of those forwards ran: the multi-stage schedules take the microbatches in
    # rounds of pp per local stage (stage 0 for microbatches 0..pp-1, then stage 1, ...), so with
    # uneven stages the blocks in flight are counted stage by stage.
    ran = [(k // L.pp) % len(stage_layers) for k in range(chunks)]
    activations = per_block * sum(stage_layers[i] for i in ran)
    if has_embedding:
        # The embedding output (the first residual), kept by the first stage's forwards only.
        activations += sum(i == embedding_stage for i in ran) * tokens * a.dim * res // L.tp

    if a.attn_mask_type == "block_causal" and a.attn_type == "sdpa":
        # (Context parallel refuses block_causal: the whole sequence. FlexAttention's BlockMask is tiny.)
        activations += chunks * L.microbatch_size * c.cfg.training.seq_len**2 * act

    logits = 0
    if has_output:
        # Loss parallel keeps the logits sharded on the vocabulary (rank 0's shard is the larger one);
        # without it the output projection returns them whole on every TP rank.
        loss_parallel = L.tp > 1 and not c.cfg.parallelism.disable_loss_parallel
        vocab_shard = -(-a.vocab_size // L.tp) if loss_parallel else a.vocab_size
        chunk = c.cfg.training.loss_chunk_size
        positions = c.cfg.training.seq_len // L.cp
        # A compiled cross-entropy keeps the logits and makes their gradient, both in the compute dtype.
        per_logit = 2 * act if compiled_loss else act + LOSS_FP32_BYTES
        if chunk and chunk < positions:  # (chunking is refused with loss parallel: the vocab is whole)
            logits = L.microbatch_size * chunk * vocab_shard * per_logit + tokens * a.dim * act
        else:
            logits = tokens * vocab_shard * per_logit

    unsharded_block = block_params(a) // L.tp
    # With FSDP float8 all-gather a block's linear weights arrive (and stay gathered) in float8.
    f8_gather = L.float8 and L.float8_all_gather
    gathered_block = unsharded_block * act - (((block_params(a) - 2 * a.dim) // L.tp) * (act - FP8) if f8_gather else 0)
    gathered = recompute = 0
    if fsdp and L.pp > 1:
        # Under PP the gathered parameters are kept for the whole step (reshard never), and torch's
        # pipeline stages defer FSDP's reduce-scatter to the last microbatch: the whole stage's
        # unsharded fp32 gradients accumulate until then.
        stage_params = state.n_elements * L.dp_shard * L.cp
        gathered += stage_params * (act + FP32)
        if f8_gather:
            gathered -= sum(stage_layers) * (unsharded_block * act - gathered_block)
    elif fsdp:
        if L.reshard_after_forward:
            gathered += 2 * gathered_block  # the current block and the prefetched next one
        else:
            gathered += a.n_layers * gathered_block  # every block stays gathered from its forward to its backward
        # The root (embedding) and [norm, output] stay gathered from their forward to their backward.
        tables = (1 if a.tie_word_embeddings else 2) * a.vocab_size * a.dim // L.tp
        gathered += tables * act
        gathered += unsharded_block * FP32  # one block's whole gradients before the reduce-scatter
    elif act < FP32 and L.dp_replicate > 1:
        # DDP (replicate, FSDP2-based) never reshards after forward: every block's parameters, cast to
        # the compute dtype, stay from its forward to its backward, and the tables this rank holds too.
        tables = ((a.vocab_size * a.dim // L.tp if has_embedding else 0)
                  + (a.vocab_size * a.dim // L.tp if has_output and not a.tie_word_embeddings else 0))
        gathered += sum(stage_layers) * gathered_block + tables * act
        gathered += unsharded_block * FP32  # one block's gradients in the reduce dtype, all-reduced
    elif autocast:
        # Neither FSDP nor DDP: autocast casts each linear weight, and the copy is saved for its backward
        # (an activation-checkpointed block saves none: it casts again in its recompute). Under PP the
        # schedule runs forward and backward in one autocast region, whose cast cache keeps them all.
        # float8 linears cast their weights to float8 themselves (the `float8` item), not through autocast.
        held = sum(stage_layers) if L.pp > 1 or L.ac == "none" else 1
        gathered += (0 if L.float8 else held * gathered_block) + (a.vocab_size * a.dim // L.tp * act if has_output else 0)
    unsaved = activation_bytes_per_block(a, tokens=tokens, tp=L.tp, ac="none", itemsize=act, compiled=compiled,
                                         residual_itemsize=res)
    if L.ac == "full":
        recompute = unsaved
    elif L.ac == "selective_op":
        recompute = max(unsaved - per_block, 0)
    # float8 copies of the gathered block's weights and their transposes (the copies are what
    # FSDP float8 all-gather gathers: only the transposes are extra).
    float8 = (1 if f8_gather else 2) * unsharded_block if L.float8 else 0
    cp_kv = 0
    if L.cp > 1:
        local_kv = 2 * tokens * a.n_heads * a.head_dim // L.tp * act  # this rank's K and V, expanded
        cp_kv = (L.cp if c.cfg.parallelism.context_parallel_rotate_method == "allgather" else 2) * local_kv
    margin = int(FRAGMENTATION * (activations + max(logits, recompute + cp_kv) + gathered + float8))
    # The output weight's gradient: whole (the reduce dtype) under FSDP before its reduce-scatter, else in
    # the storage dtype; a tied one is the embedding's, held from here to the step either way.
    output_grad = a.vocab_size * a.dim // L.tp * (reduce_itemsize(c) if fsdp else state_itemsize(c.cfg.training)) \
        if has_output else 0
    gb = c.cfg.training.global_batch_size
    accumulation = gb // (L.dp * L.local_batch_size) if gb > 0 else 1
    return MemoryEstimate(pp_rank=pp_rank, state=state, activations=activations, logits=logits,
                          gathered=gathered, recompute=recompute, float8=float8, margin=margin, cp_kv=cp_kv,
                          output_grad=output_grad,
                          backward_temp=backward_temp_bytes(a, tokens=tokens, tp=L.tp, itemsize=act, residual_itemsize=res),
                          grads_accumulate=L.pp > 1 or accumulation > 1)


def peak_memory(c: Candidate) -> MemoryEstimate:
    """The estimate of the pipeline rank with the highest peak."""
    # Every pipeline rank: an uneven split (first/last_stage_less_layers) can make a middle one the highest.
    return max((estimate_memory(c, pp_rank=r) for r in range(c.layout.pp)), key=lambda m: m.total)
