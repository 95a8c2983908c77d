"""The training/validation dataloader: a torchdata StatefulDataLoader over a packed, indexed or synthetic stream.

`state_dict()` is the same on every DP rank at a step boundary (it records the stream position, not
the rank's slice), so it can be saved once and loaded with a different number of DP ranks.
"""

from __future__ import annotations

import warnings

from torchdata.stateful_dataloader import StatefulDataLoader

from torchtitan_like.components.tokenizer import Tokenizer
from torchtitan_like.config.schema import Training
from torchtitan_like.config.validate import resolve_global_batch
from torchtitan_like.data.dataset import Batch, BatchLayout, PackedDataset, SyntheticDataset
from torchtitan_like.data.indexed import IndexedDataset, open_indexed
from torchtitan_like.data.sources import build_source
from torchtitan_like.errors import ConfigError


def global_batch_size(training: Training, dp_degree: int) -> int:
    """training.global_batch_size resolved (-1 = local_batch_size x dp_degree) and checked for divisibility."""
    return resolve_global_batch("training", training.local_batch_size, training.global_batch_size, dp_degree)


def grad_accum_steps(training: Training, dp_degree: int) -> int:
    """Microbatches per optimizer step on each DP rank."""
    return global_batch_size(training, dp_degree) // (training.local_batch_size * dp_degree)


def _as_is(batch: Batch) -> Batch:
    # The default collate (default_convert) would turn the (inputs, labels) tuple into a list.
    return batch


def build_dataloader(
    *,
    training: Training,
    tokenizer: Tokenizer | None,
    vocab_size: int,
    dp_rank: int,
    dp_degree: int,
    seed: int,
    infinite: bool = True,
) -> StatefulDataLoader:
    """Loader yielding (inputs, labels) int64 tensors of shape (local_batch_size, seq_len) for this DP rank."""
    if training.seq_len < 1:
        raise ConfigError(f"training.seq_len={training.seq_len} must be >= 1")
    layout = BatchLayout(
        global_batch_size=global_batch_size(training, dp_degree),
        local_batch_size=training.local_batch_size,
        dp_rank=dp_rank,
        dp_degree=dp_degree,
    )
    if training.dataset == "synthetic":
        dataset = SyntheticDataset(seed=seed, seq_len=training.seq_len, vocab_size=vocab_size, layout=layout)
    elif training.dataset == "indexed":
        assert training.dataset_path  # (config validation)
        dataset = IndexedDataset(
            sources=open_indexed(training.dataset_path, section="training"), weights=training.dataset_weights,
            seq_len=training.seq_len, layout=layout, infinite=infinite, vocab_size=vocab_size,
            shuffle_seed=seed if training.dataset_shuffle else None, tokenizer=tokenizer,
        )
    else:
        assert tokenizer is not None, f"training.dataset={training.dataset!r} needs a tokenizer"
        dataset = PackedDataset(
            source=build_source(training, seed), tokenizer=tokenizer, seq_len=training.seq_len, layout=layout,
            infinite=infinite,
        )
    # num_workers=0: tokenizing a few global batches per step is cheap next to the model, and the
    # single-process loader saves the iterator's own state_dict() verbatim.
    with warnings.catch_warnings():
        # torchdata 0.11 calls torch.set_vital, which torch 2.13 deprecates with a UserWarning.
        warnings.filterwarnings("ignore", message=".*set_vital.*is deprecated")
        return StatefulDataLoader(dataset, batch_size=None, num_workers=0, collate_fn=_as_is)
