"""Llama 3 model arguments and the named flavors (real published dimensions)."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling (the "llama3" rope_type in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class TransformerArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 128256
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 8192
    tie_word_embeddings: bool = False
    depth_init: bool = True
    """Scale the init std of each block's output projections by its depth (torchtitan's default)."""
    attn_type: str = "sdpa"
    """Attention kernel: "sdpa" (scaled_dot_product_attention) or "flex" (FlexAttention)."""
    attn_mask_type: str = "causal"
    """"causal" over the whole sequence, or "block_causal": causal within each packed document."""
    bos_id: int | None = None
    eos_id: int | None = None
    """The tokenizer's document delimiters, for block_causal (set by the trainer)."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden size: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def with_seq_len(self, seq_len: int) -> "TransformerArgs":
        return replace(self, max_seq_len=seq_len)

    def num_params(self, *, exclude_embedding: bool = False) -> int:
        h, ffn, kvd = self.dim, self.ffn_hidden_dim, self.kv_heads * self.head_dim
        per_layer = h * h * 2 + 2 * h * kvd + 3 * h * ffn + 2 * h
        n = self.n_layers * per_layer + h  # final norm
        emb = self.vocab_size * h
        out = 0 if self.tie_word_embeddings else self.vocab_size * h
        if exclude_embedding:
            return n + out
        return n + emb + out


_LLAMA31_ROPE = RopeScaling(factor=8.0)
_LLAMA32_ROPE = RopeScaling(factor=32.0)

LLAMA3_FLAVORS: dict[str, TransformerArgs] = {
    # Tiny: trains on a laptop CPU. vocab 2000 = the embedded tokenizer (1744 BPE + 256 special).
    "debugmodel": TransformerArgs(
        dim=256, n_layers=6, n_heads=16, n_kv_heads=8, vocab_size=2000, rope_theta=500000.0, max_seq_len=2048
    ),
    # The debug model with tied embeddings (one table for input and output, as Llama 3.2 1B / 3B): the
    # tests train the tied code paths (FSDP's root group, TP's shared vocab shard, float8) on CPU.
    "debugmodel_tied": TransformerArgs(
        dim=256, n_layers=6, n_heads=16, n_kv_heads=8, vocab_size=2000, rope_theta=500000.0, max_seq_len=2048,
        tie_word_embeddings=True,
    ),
    # Wider debug models (the planner's CPU memory checks measure a few widths).
    "debugmodel_w512": TransformerArgs(
        dim=512, n_layers=4, n_heads=16, n_kv_heads=8, vocab_size=2000, rope_theta=500000.0, max_seq_len=2048
    ),
    "debugmodel_w1024": TransformerArgs(
        dim=1024, n_layers=2, n_heads=16, n_kv_heads=8, vocab_size=2000, rope_theta=500000.0, max_seq_len=2048
    ),
    # Llama 3.2 1B / 3B (tied embeddings, rope factor 32).
    "1B": TransformerArgs(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5, multiple_of=256,
        rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True, max_seq_len=131072,
    ),
    "3B": TransformerArgs(
        dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim_multiplier=1.0, multiple_of=256,
        rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True, max_seq_len=131072,
    ),
    # Llama 3.1 8B / 70B / 405B.
    "8B": TransformerArgs(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024,
        rope_scaling=_LLAMA31_ROPE, max_seq_len=131072,
    ),
    # Benchmark slice: Llama 3.1 8B width (dim 4096, ffn 14336, 32/8 heads, vocab 128256), 8 of its 32
    # layers, so one GPU measures the real 8B per-layer shapes.
    "8B_slice8": TransformerArgs(
        dim=4096, n_layers=8, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024,
        rope_scaling=_LLAMA31_ROPE, max_seq_len=131072,
    ),
    "70B": TransformerArgs(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096,
        rope_scaling=_LLAMA31_ROPE, max_seq_len=131072,
    ),
    "405B": TransformerArgs(
        dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim_multiplier=1.2, multiple_of=4096,
        rope_scaling=_LLAMA31_ROPE, max_seq_len=131072,
    ),
}
