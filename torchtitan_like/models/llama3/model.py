"""Llama 3 decoder: GQA attention with RoPE (Llama 3.1 scaling), SwiGLU FFN, RMSNorm.

Meta-device friendly: `__init__` only declares modules; `init_weights()` fills every parameter and
buffer. Initialization draws each parameter's *full* tensor from a generator seeded by (seed, name)
and keeps the local shard, so the weights are identical whatever the parallel layout.

Parameter names match Meta's Llama 3 checkpoints (`tok_embeddings`, `layers.N.attention.wq`, ...).
Layers live in an `nn.ModuleDict` keyed by layer id so names survive a pipeline split; a stage that
does not own `tok_embeddings`, `norm` or `output` has them set to None.

Attention is causal over the whole sequence, or with `attn_mask_type="block_causal"` causal within each
document of a packed sequence (document masking): a document starts at a bos token or right after an eos
token. `attn_type` picks the kernel: SDPA (is_causal, or a dense boolean mask for block_causal) or
FlexAttention (a BlockMask that skips the masked tiles; compiled on CUDA).
"""

from __future__ import annotations

import functools
import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from torchtitan_like.distributed.utils import plain_name
from torchtitan_like.models.llama3.args import RopeScaling, TransformerArgs


def precompute_freqs_cis(head_dim: int, end: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """The rotations e^{i m w_k} for positions m < end, as (end, head_dim // 2, 2) float32 holding
    (cos, sin) of the angle m * w_k (computed in float64, then rounded).

    Real, not complex64: inductor generates no code for complex ops (it calls view_as_complex, the
    complex mul and view_as_real as separate eager kernels, each a pass over q and k in fp32), while the
    same rotation in real arithmetic compiles into one fused kernel. The table is still a single
    buffer indexed by position on dim 0, which is what context parallel shards. Every block takes it
    as a forward input, which FSDP must not cast to bf16 (fsdp.py shards the blocks accordingly)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64)[: head_dim // 2] / head_dim))
    if scaling is not None:
        freqs = _apply_llama31_scaling(freqs, scaling)
    t = torch.arange(end, dtype=torch.float64)
    angles = torch.outer(t, freqs)
    return torch.stack((angles.cos(), angles.sin()), dim=-1).to(torch.float32)


def _apply_llama31_scaling(freqs: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly between.
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / s.factor, freqs)
    mid = (1 - smooth) * freqs / s.factor + smooth * freqs
    is_mid = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
    return torch.where(is_mid, mid, scaled)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # x: (bs, seqlen, n_local_heads, head_dim), rotated as interleaved (real, imag) pairs (Meta layout),
    # in fp32: (x0 + i x1)(cos + i sin) = (x0 cos - x1 sin) + i (x0 sin + x1 cos).
    cos = freqs_cis[..., 0].view(1, xq.shape[1], 1, -1)  # (1, seqlen, 1, head_dim // 2)
    sin = freqs_cis[..., 1].view(1, xq.shape[1], 1, -1)
    return _rotate(xq, cos, sin), _rotate(xk, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(3).type_as(x)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    # (bs, seqlen, n_local_kv_heads, head_dim) -> (bs, seqlen, n_local_kv_heads * n_rep, head_dim)
    if n_rep == 1:
        return x
    bs, seqlen, n_kv, head_dim = x.shape
    return x[:, :, :, None, :].expand(bs, seqlen, n_kv, n_rep, head_dim).reshape(bs, seqlen, n_kv * n_rep, head_dim)


def document_ids(tokens: torch.Tensor, bos_id: int, eos_id: int) -> torch.Tensor:
    """(bs, seqlen) int32: the number of document starts at or before each position. A document starts
    at a bos token, or at the token after an eos (Megatron-style data has eos between documents and no
    bos); positions before the window's first start (the end of a document cut by the window) are 0."""
    starts = tokens == bos_id
    starts[:, 1:] |= tokens[:, :-1] == eos_id
    return starts.cumsum(dim=1, dtype=torch.int32)


AttentionMask = torch.Tensor | BlockMask
"""What each block's attention takes besides causality: a dense additive (bs, 1, seqlen, seqlen) mask (SDPA:
0 = attend, -inf = not) or a FlexAttention BlockMask; None = plain causal SDPA."""

@functools.cache
def _compiled_flex_attention():
    """flex_attention compiled, as it runs on CUDA (eager it materializes the whole score matrix). Eager on
    CPU: only its forward runs there (tests); the trainer refuses it for CPU training."""
    return torch.compile(flex_attention)


def build_attention_mask(
    attn_type: str, doc_ids: torch.Tensor | None, *, batch: int, seqlen: int, device: torch.device,
    dtype: torch.dtype,
) -> AttentionMask | None:
    """The mask for `attn_type` ("sdpa" or "flex"): causal within documents when `doc_ids` (bs, seqlen) is
    given, else causal over the whole sequence (None for SDPA: its is_causal path).

    SDPA's is additive (0 where attended, -inf elsewhere) in `dtype`, the attention's compute dtype: SDPA
    would convert a boolean mask to that in every layer and each layer's backward would keep its own copy
    (n_layers x bs x seqlen² elements); this one tensor is shared by every layer."""
    if attn_type == "sdpa" or device.type == "meta":
        # (meta: a pipeline stage's shape inference on older torch runs on meta tensors; only shapes matter.)
        if doc_ids is None:
            return None
        causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).tril()
        allowed = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal).unsqueeze(1)
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    if doc_ids is None:
        return _causal_block_mask(seqlen, device)

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return create_block_mask(mask_mod, batch, None, seqlen, seqlen, device=device, _compile=device.type == "cuda")


@functools.lru_cache(maxsize=8)
def _causal_block_mask(seqlen: int, device: torch.device) -> BlockMask:
    """FlexAttention's plain causal mask: the same for every batch (one sequence, broadcast), so built once
    per sequence length and device rather than every forward."""
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return create_block_mask(causal, 1, None, seqlen, seqlen, device=device, _compile=device.type == "cuda")


class Attention(nn.Module):
    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.n_rep = args.n_heads // args.kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, *, mask: AttentionMask | None = None) -> torch.Tensor:
        # mask: a keyword argument, so tensor parallel's input plan (x, freqs_cis) passes it through as is.
        bs, seqlen, _ = x.shape
        # -1 for the head count: tensor parallel shards heads, so the local count is not args.n_heads.
        xq = self.wq(x).view(bs, seqlen, -1, self.head_dim)
        xk = self.wk(x).view(bs, seqlen, -1, self.head_dim)
        xv = self.wv(x).view(bs, seqlen, -1, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        if isinstance(mask, BlockMask):
            # (bs, heads, seqlen, head_dim); FlexAttention shares each KV head among its query heads itself.
            flex = _compiled_flex_attention() if xq.is_cuda else flex_attention
            out = flex(
                xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2), block_mask=mask, enable_gqa=self.n_rep > 1
            )
        else:
            keys = repeat_kv(xk, self.n_rep)
            values = repeat_kv(xv, self.n_rep)
            # (bs, n_local_heads, seqlen, head_dim) for SDPA
            out = F.scaled_dot_product_attention(
                xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                is_causal=mask is None, attn_mask=mask,
            )
        out = out.transpose(1, 2).contiguous().view(bs, seqlen, -1)  # (bs, seqlen, n_local_heads * head_dim)
        return self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: TransformerArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        if args.depth_init:
            self.weight_init_std = 0.02 / (2 * (layer_id + 1)) ** 0.5
        else:
            self.weight_init_std = 0.02 / (2 * args.n_layers) ** 0.5

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, *, mask: AttentionMask | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask=mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm: nn.RMSNorm | None = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output: nn.Linear | None = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Not persistent: recomputed by init_weights, never loaded from a checkpoint.
        self.register_buffer("freqs_cis", self._freqs_cis(device=None), persistent=False)
        # True: forward always skips `output` (as skip_output=True does). For a pipeline's last stage with a
        # chunked loss: the schedule calls forward itself, and its loss function applies `output` by chunks.
        self.output_in_loss = False

    def _freqs_cis(self, device: torch.device | None) -> torch.Tensor:
        a = self.args
        return precompute_freqs_cis(a.head_dim, a.max_seq_len, a.rope_theta, a.rope_scaling).to(device)

    def document_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """Document ids of a (bs, seqlen) batch of token ids, for attn_mask_type="block_causal"."""
        a = self.args
        if a.bos_id is None or a.eos_id is None:
            raise ValueError(
                'model.attn_mask_type="block_causal" needs the tokenizer\'s bos and eos ids in the model args '
                "(TransformerArgs.bos_id / eos_id): the trainer sets them from model.tokenizer_path"
            )
        return document_ids(tokens, a.bos_id, a.eos_id)

    def forward(
        self, tokens: torch.Tensor, *, skip_output: bool = False, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        # tokens: (bs, seqlen) ids on the first pipeline stage, (bs, seqlen, dim) hidden states after it.
        # skip_output: return the final-norm hidden states; the caller applies `output` (chunked loss).
        # doc_ids: (bs, seqlen) document ids for a block_causal mask (document_ids()); computed from the
        # tokens when not given. A pipeline stage after the first has no tokens: the schedule passes them.
        block_causal = self.args.attn_mask_type == "block_causal"
        if block_causal and doc_ids is None:
            if self.tok_embeddings is None:
                raise ValueError(
                    "this pipeline stage has no token ids to find documents in: pass doc_ids "
                    "(attn_mask_type=block_causal)"
                )
            doc_ids = self.document_ids(tokens)
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if h.shape[1] > self.freqs_cis.shape[0]:
            # Slicing would give a shorter table, which some lengths broadcast into wrong rotations.
            raise ValueError(
                f"a sequence of {h.shape[1]} positions is longer than the RoPE table ({self.freqs_cis.shape[0]}, "
                "model.max_seq_len): raise model.max_seq_len"
            )
        freqs_cis = self.freqs_cis[: h.shape[1]]
        device = freqs_cis.device
        # The dtype q and k will have: autocast's where it is on (mixed precision without FSDP), else the
        # hidden states' (FSDP's param_dtype, or the model's).
        # (Meta, a shape-only forward, has no autocast.)
        autocast = device.type != "meta" and torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else h.dtype
        mask = build_attention_mask(
            self.args.attn_type, doc_ids if block_causal else None, batch=h.shape[0], seqlen=h.shape[1],
            device=device, dtype=dtype,
        )
        for layer in self.layers.values():
            h = layer(h, freqs_cis, mask=mask) if mask is not None else layer(h, freqs_cis)
        h = self.norm(h) if self.norm is not None else h
        if skip_output or self.output_in_loss or self.output is None:
            return h
        return self.output(h)  # (bs, seqlen, vocab) on the last stage

    @torch.no_grad()
    def init_weights(self, seed: int, buffer_device: torch.device | None = None) -> None:
        """Initialize every parameter and buffer, identically for any sharding of the parameters."""
        device = buffer_device
        if device is None:
            device = next(iter(self.parameters())).device
        self.freqs_cis = self._freqs_cis(device)
        a = self.args
        if a.tie_word_embeddings and self.output is not None and self.tok_embeddings is not None:
            # to_empty() materializes each module's parameters separately, which unties them.
            self.output.weight = self.tok_embeddings.weight
        for wrapped_name, param in self.named_parameters():
            # Seed by the checkpoint name: activation checkpointing and torch.compile wrappers add
            # path parts that the state dict (and so the weights' identity) does not have.
            name = plain_name(wrapped_name)
            leaf = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):
                _fill_(param, 1.0)
            elif name.startswith("tok_embeddings"):
                _init_from_full_(param, seed, name, std=0.02 if a.tie_word_embeddings else 1.0, device=device)
            elif name.startswith("output"):
                std = a.dim**-0.5
                _init_from_full_(param, seed, name, std=std, cutoff=3 * std, device=device)
            elif leaf in ("wq", "wk", "wv", "w1"):
                _init_from_full_(param, seed, name, std=0.02, device=device)
            elif leaf in ("wo", "w2", "w3"):
                layer = self.layers[name.split(".")[1]]
                _init_from_full_(param, seed, name, std=layer.weight_init_std, device=device)
            else:
                raise AssertionError(f"init_weights does not know parameter {name}")


def _local(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The part of `full` that `param` holds on this rank (all of it for a plain tensor)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return full
    # Private but stable since torch 2.4; the public alternative (distribute_tensor) needs a collective.
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
    return full[tuple(slice(o, o + s) for o, s in zip(offset, shape))]


def _target(param: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param


def _fill_(param: torch.Tensor, value: float) -> None:
    _target(param).fill_(value)


def _init_from_full_(
    param: torch.Tensor, seed: int, name: str, *, std: float, cutoff: float | None = None,
    device: torch.device | None = None,
) -> None:
    """Draw the whole tensor on `device` (default: where the parameter lives) from a generator seeded by
    (seed, name), and keep this rank's part: the same values whatever the sharding. Parameters kept on
    the CPU (FSDP CPU offload) are drawn on the compute device, so offload does not change them."""
    local = _target(param)
    if local.device.type == "meta":
        raise RuntimeError(f"{name} is still on the meta device: call to_empty() before init_weights()")
    device = local.device if device is None else device
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    full = torch.empty(param.shape, device=device, dtype=torch.float32)
    if cutoff is None:
        # torchtitan's hidden weights: trunc_normal_'s default bounds, -2 and 2 in absolute terms (100
        # std at 0.02: in effect no truncation). A cut at +-2 std would lower the std by 12%.
        cutoff = 2.0
    full.normal_(0.0, std, generator=gen)
    if std < 1.0:
        _truncate_(full, std=std, cutoff=cutoff, generator=gen)
    local.copy_(_local(full, param))


def _truncate_(full: torch.Tensor, *, std: float, cutoff: float, generator: torch.Generator) -> None:
    """Make normal draws a truncated normal: while any value is outside [-cutoff, cutoff], a whole new
    tensor of draws is made and those values are taken from it. This is what nn.init.trunc_normal_ does on
    torch 2.13 for bounds that keep most of the mass, written out because torch 2.11's trunc_normal_ used
    another algorithm: one seed gave other weights on each version. Normal draws are the same on both, so
    now the weights are too (for a cutoff of many std, as the hidden weights', nothing is redrawn)."""
    while True:
        outside = full.abs() > cutoff
        if not outside.any():
            return
        fresh = torch.empty_like(full).normal_(0.0, std, generator=generator)
        full.copy_(torch.where(outside, fresh, full))
