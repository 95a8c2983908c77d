"""training.loss_chunk_size: the output projection + loss chunked over the sequence gives the same loss
and gradients, and never holds more than one chunk's logits (forward, saved for backward, recompute)."""

from __future__ import annotations

import pytest
import torch

from torchtitan_like.components.loss import IGNORE_INDEX, chunked_output_loss, cross_entropy_sum
from torchtitan_like.config.schema import Parallelism, Training
from torchtitan_like.distributed.parallel_dims import ParallelDims
from torchtitan_like.errors import ConfigError
from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS
from torchtitan_like.models.llama3.model import Transformer

BS, SEQ, CHUNK = 2, 64, 16


def _model_and_batch() -> tuple[Transformer, torch.Tensor, torch.Tensor]:
    args = LLAMA3_FLAVORS["debugmodel"].with_seq_len(SEQ)
    model = Transformer(args)
    model.init_weights(seed=0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (BS, SEQ + 1), generator=g)
    labels = tokens[:, 1:].clone()
    labels[0, :5] = IGNORE_INDEX  # ignored positions stay ignored in every chunk
    return model, tokens[:, :-1], labels


def _loss_and_grads(model: Transformer, inputs: torch.Tensor, labels: torch.Tensor, chunk: int) -> tuple:
    model.zero_grad(set_to_none=True)
    if chunk:
        loss = chunked_output_loss(model(inputs, skip_output=True), model.output, labels, chunk_size=chunk)
    else:
        loss = cross_entropy_sum(model(inputs), labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk", [CHUNK, 24])  # 24: a last chunk shorter than the others
def test_chunked_loss_equals_the_whole_loss(chunk: int) -> None:
    model, inputs, labels = _model_and_batch()
    want_loss, want_grads = _loss_and_grads(model, inputs, labels, 0)
    got_loss, got_grads = _loss_and_grads(model, inputs, labels, chunk)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
    # output.weight's gradient sums over the tokens chunk by chunk: fp32 order, seen <= 2.7e-7 absolute.
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_full_logits_never_exist() -> None:
    model, inputs, labels = _model_and_batch()
    vocab = model.args.vocab_size
    produced: list[tuple[int, ...]] = []  # every output of the projection, forward and recompute
    model.output.register_forward_hook(lambda m, args, out: produced.append(tuple(out.shape)))
    saved: list[tuple[int, ...]] = []  # every tensor autograd keeps for backward

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_output_loss(model(inputs, skip_output=True), model.output, labels, chunk_size=CHUNK)
    loss.backward()
    assert produced == [(BS, CHUNK, vocab)] * (2 * SEQ // CHUNK), produced  # forward + one recompute per chunk
    vocab_sized = [s for s in saved if vocab in s and s[-1] == vocab and s != (vocab, model.args.dim)]
    assert all(s[0] * s[1] <= BS * CHUNK for s in vocab_sized if len(s) == 3), vocab_sized
    assert all(s[0] <= BS * CHUNK for s in vocab_sized if len(s) == 2), vocab_sized

    # Unchunked, the same checks see the whole (bs, seqlen, vocab) logits: the test can fail.
    produced.clear()
    cross_entropy_sum(model(inputs), labels)
    assert produced == [(BS, SEQ, vocab)]


def test_chunking_is_refused_with_loss_parallel_only() -> None:
    chunked = Training(seq_len=64, loss_chunk_size=16)
    pd = ParallelDims.from_config(Parallelism(tensor_parallel_degree=2, data_parallel_shard_degree=1), 2)
    with pytest.raises(ConfigError) as e:
        pd.validate(model_args=LLAMA3_FLAVORS["debugmodel"], training=chunked)
    assert "training.loss_chunk_size=16 does not work with loss parallel" in str(e.value)
    assert "already keeps the logits sharded on the vocabulary: set it to 0, or set parallelism.disable_loss_parallel=true" in str(e.value)
    # Without loss parallel, TP gathers the logits and chunking applies; under PP the last stage chunks
    # (tests/distributed/test_pipeline.py trains it).
    for ok in (
        Parallelism(tensor_parallel_degree=2, data_parallel_shard_degree=1, disable_loss_parallel=True),
        Parallelism(pipeline_parallel_degree=2, data_parallel_shard_degree=1),
    ):
        ParallelDims.from_config(ok, 2).validate(model_args=LLAMA3_FLAVORS["debugmodel"], training=chunked)
