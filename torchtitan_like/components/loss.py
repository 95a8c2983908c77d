"""Token-sum cross-entropy; the trainer divides by the global token count of the step."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def mask_after_eos(inputs: torch.Tensor, labels: torch.Tensor, eos_id: int) -> torch.Tensor:
    """`labels` (a new tensor) with IGNORE_INDEX wherever the input token is `eos_id` (training.eod_mask_loss).
    inputs, labels: (bs, seqlen), labels[:, i] being the token after inputs[:, i]."""
    return labels.masked_fill(inputs == eos_id, IGNORE_INDEX)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of per-token losses. logits: (bs, seqlen, vocab) (a vocab-sharded DTensor under loss parallel)."""
    # float32 for the softmax: bf16 logits lose too much in log-sum-exp over a 128K vocabulary.
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), reduction="sum", ignore_index=IGNORE_INDEX
    )


def chunked_output_loss(
    hidden: torch.Tensor,
    output: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    *,
    chunk_size: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_sum,
) -> torch.Tensor:
    """`loss_fn(output(hidden), labels)` computed `chunk_size` positions of the sequence at a time.

    Each chunk's projection + loss runs under non-reentrant activation checkpointing, so only one
    chunk's logits (bs, chunk_size, vocab) exist at any time, in forward and in backward (which
    recomputes them): the full (bs, seqlen, vocab) logits of a long sequence are never materialized.
    hidden: (bs, seqlen, dim) after the final norm; labels: (bs, seqlen). Same result as unchunked
    (a token-sum loss is a sum over chunks), up to fp32 summation order.
    """
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(output(h), y)

    total = None
    for start in range(0, hidden.shape[1], chunk_size):
        part = checkpoint(
            chunk_loss, hidden[:, start : start + chunk_size], labels[:, start : start + chunk_size], use_reentrant=False
        )
        total = part if total is None else total + part
    assert total is not None, "empty sequence"
    return total


def model_token_loss(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_sum,
    chunk_size: int = 0,
) -> torch.Tensor:
    """`model`'s token-sum loss on one batch: from its whole logits, or with `chunk_size` > 0 from its
    final-norm hidden states through `model.output`, chunk by chunk (chunked_output_loss)."""
    if chunk_size:
        hidden = model(inputs, skip_output=True)  # (bs, seqlen, dim)
        return chunked_output_loss(hidden, gathered(model.output), labels, chunk_size=chunk_size, loss_fn=loss_fn)
    return loss_fn(model(inputs), labels)


def gathered(output: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`output` as the chunked loss calls it: under FSDP (an FSDPModule has unshard()) each chunk's
    recompute in backward must see the gathered weight. torch 2.11 reshards the output after the first
    chunk's backward, and 2.12 (in a pipeline stage's first backward) runs the recompute without the
    gather: the chunk met a sharded weight ("mixed torch.Tensor and DTensor"). unshard() gathers it
    again there, and is a no-op while it is gathered (forward; torch 2.13)."""
    unshard = getattr(output, "unshard", None)

    def project(h: torch.Tensor) -> torch.Tensor:
        if unshard is not None:
            unshard()
        return output(h)

    return project
