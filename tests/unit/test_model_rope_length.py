"""Transformer.forward refuses a sequence longer than its RoPE table (args.max_seq_len), with a message.

It once sliced the table without a check: most such lengths failed with a cryptic shape error, and
max_seq_len x head_dim / 2 positions broadcast into silently wrong rotations."""

from __future__ import annotations

import pytest
import torch

from torchtitan_like.models.llama3 import Transformer, TransformerArgs

# head_dim 16 -> 8 rotation pairs per position; a 32-position table holds 32 * 8 (cos, sin) pairs.
ARGS = TransformerArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=32)


@pytest.fixture(scope="module")
def model():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    m = Transformer(ARGS)
    m.init_weights(0)
    torch.set_num_threads(n)
    return m.eval()


def test_a_sequence_longer_than_the_rope_table_is_refused(model):
    tokens = torch.randint(0, ARGS.vocab_size, (1, ARGS.max_seq_len * ARGS.head_dim // 2),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), pytest.raises(ValueError, match="256 positions is longer than the RoPE table .32"):
        model(tokens)  # once: position p used cos/sin of table entry (p // 8, p % 8) for every pair


def test_lengths_up_to_the_table_are_unaffected_and_one_more_is_refused(model):
    with torch.no_grad():
        assert model(torch.zeros(1, ARGS.max_seq_len, dtype=torch.long)).shape == (1, 32, 97)
        with pytest.raises(ValueError, match="raise model.max_seq_len"):
            model(torch.zeros(1, ARGS.max_seq_len + 1, dtype=torch.long))
