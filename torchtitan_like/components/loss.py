"""Token-sum cross-entropy; the trainer divides by the global token count of the step."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of per-token losses. logits: (bs, seqlen, vocab) (a vocab-sharded DTensor under loss parallel)."""
    # float32 for the softmax: bf16 logits lose too much in log-sum-exp over a 128K vocabulary.
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), reduction="sum", ignore_index=IGNORE_INDEX
    )
