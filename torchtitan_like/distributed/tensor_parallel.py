"""Tensor parallel (Megatron-style) with sequence parallel and optional loss parallel, for Llama 3.

Linear layers are split column-wise (wq/wk/wv, w1/w3, output) or row-wise (wo, w2); between blocks
the activations are sharded on the sequence dim (Shard(1)), and the norms run on those shards
(SequenceParallel). Attention heads, query and KV alike, are split across TP ranks: KV heads are
not replicated, so TP must divide n_kv_heads (ParallelDims.validate checks it).

The residual stream stays a DTensor (Shard(1)) from the embedding to the final norm: the model reads
`h.shape[1]` as the sequence length to slice its RoPE table, and a DTensor reports the global
length where a local shard would report seqlen / tp.
"""

from __future__ import annotations

import logging

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from torchtitan_like.models.llama3.model import Transformer

logger = logging.getLogger(__name__)


def apply_tp(model: Transformer, tp_mesh: DeviceMesh, *, loss_parallel: bool, async_tp: bool) -> None:
    """Shard `model` (on any device, meta included) over `tp_mesh`, in place.

    loss_parallel: the output projection keeps its logits sharded on vocab, as a DTensor
    (Shard(-1)); the caller computes the loss inside `torch.distributed.tensor.parallel.loss_parallel()`.
    Otherwise the logits are gathered into a plain tensor.
    """
    if async_tp:
        # Async TP is a torch.compile (inductor micro-pipeline) pass; ParallelDims.from_config rejects it.
        raise NotImplementedError("async tensor parallel needs torch.compile, which is not supported yet")
    tied = model.args.tie_word_embeddings and model.tok_embeddings is not None and model.output is not None

    top: dict[str, ParallelStyle] = {}
    if model.tok_embeddings is not None:
        # Vocab-sharded table; the partial sums are reduce-scattered onto sequence shards.
        top["tok_embeddings"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False
        )
    if model.norm is not None:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        top["output"] = ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    parallelize_module(model, tp_mesh, top)
    if tied:
        # parallelize_module made a separate DTensor parameter for each module; both are
        # Shard(0) over the vocab (row-wise embedding, column-wise output), so they can be one again.
        assert model.output.weight.placements == model.tok_embeddings.weight.placements  # type: ignore[union-attr]
        model.output.weight = model.tok_embeddings.weight  # type: ignore[union-attr]

    block_plan: dict[str, ParallelStyle] = {
        "attention_norm": SequenceParallel(),
        # x: sequence shards -> whole sequence; freqs_cis (whole, replicated) passes through as is.
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "feed_forward.w3": ColwiseParallel(),
    }
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan)

    logger.info(
        "applied tensor parallel (degree %d, sequence parallel, loss parallel %s%s)",
        tp_mesh.size(),
        "on" if loss_parallel else "off",
        ", tied embeddings" if tied else "",
    )

