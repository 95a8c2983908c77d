"""Data: document sources, tokenize + pack, and the stateful, DP-layout-independent loader."""

from torchtitan_like.data.loader import build_dataloader, global_batch_size, grad_accum_steps

__all__ = ["build_dataloader", "global_batch_size", "grad_accum_steps"]
