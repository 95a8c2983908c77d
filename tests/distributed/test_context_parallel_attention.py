"""Context parallel (torch's ring attention, driven on CPU by our shim) computes exactly full attention.

- Attention alone, CP(2) and CP(4), causal GQA (4 query heads / 2 KV heads, expanded by repeat_kv as
  the model does): each rank's output and q/k/v gradients equal the matching rows of one process's
  full causal SDPA, for every rotate method the installed torch offers, with the head-tail load
  balancer on (and once off). The rows a rank holds are read from a position buffer sharded with the
  data, and checked against the head-tail layout, so a disabled balancer cannot pass unnoticed.
- The real model (2-layer debugmodel), CP(2), with inputs, labels and the RoPE table sharded: the
  token-sum loss and the parameter gradients, summed over the cp ranks, equal one process's.
- The user-facing errors (rotate method, sequence length, RoPE length, a torch without the pieces).
"""

from __future__ import annotations

import re
import sys
import types
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from harness import run_on_ranks
from torchtitan_like.distributed import context_parallel as cp_mod
from torchtitan_like.distributed.context_parallel import (
    check_cp_supported,
    context_parallel_ctx,
    set_rotate_method,
    supported_rotate_methods,
)
from torchtitan_like.errors import ConfigError
from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS, TransformerArgs
from torchtitan_like.models.llama3.model import Transformer, repeat_kv

# fp32; seen: <= 1.5e-6 (attention), loss 1.2e-7 relative, grads <= 7e-7 absolute (largest 3.6).
ATOL = RTOL = 1e-5

BS, SEQ, N_HEADS, N_KV, HEAD_DIM = 2, 16, 4, 2, 8


# ---- attention alone --------------------------------------------------------------------------


def _qkv() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"q": (BS, SEQ, N_HEADS, HEAD_DIM), "k": (BS, SEQ, N_KV, HEAD_DIM), "v": (BS, SEQ, N_KV, HEAD_DIM),
              "dout": (BS, SEQ, N_HEADS, HEAD_DIM)}  # (bs, seqlen, heads, head_dim), the model's layout
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention as the model calls it: repeat KV heads, SDPA on (bs, heads, seqlen, head_dim)."""
    n_rep = q.shape[2] // k.shape[2]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), repeat_kv(k, n_rep).transpose(1, 2), repeat_kv(v, n_rep).transpose(1, 2), is_causal=True
    )
    return out.transpose(1, 2)


def _count_exchanges_in_flight(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the functional collectives (the ring's exchanges) issued and not yet waited for; returns the
    dict whose "max" and "issued" it keeps up to date."""
    import torch.distributed._functional_collectives as ft_c

    in_flight: set[int] = set()
    seen = {"max": 0, "issued": 0}
    wrap, wait_tensor = ft_c._maybe_wrap_tensor, ft_c.wait_tensor

    def issue(tensor):  # every functional collective hands its output out through this (torch 2.11-2.13)
        out = wrap(tensor)
        if isinstance(out, ft_c.AsyncCollectiveTensor):  # in flight until waited
            in_flight.add(tensor.untyped_storage().data_ptr())
            seen["issued"] += 1
            seen["max"] = max(seen["max"], len(in_flight))
        return out

    def waiting(tensor):
        in_flight.discard(tensor.untyped_storage().data_ptr())
        return wait_tensor(tensor)

    # Both looked up as module globals at call time.
    monkeypatch.setattr(ft_c, "_maybe_wrap_tensor", issue)
    monkeypatch.setattr(ft_c, "wait_tensor", waiting)
    return seen


def _attention_rank(cases: list[tuple[str, bool]]) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    world = torch.distributed.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    sdpa = F.scaled_dot_product_attention
    results = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        exchanges = _count_exchanges_in_flight(monkeypatch)
        for case in cases:
            results[case] = _ring_case(mesh, *case)
    # Never two ring exchanges in flight on the cp group: two functional collectives in flight on one gloo
    # group corrupted the heap now and then (context_parallel._WaitedRotater).
    results["exchanges"] = exchanges
    results["sdpa_restored"] = F.scaled_dot_product_attention is sdpa
    return results


def _ring_case(mesh, rotate_method: str, load_balance: bool) -> dict:
    data = _qkv()
    positions = torch.arange(SEQ).expand(BS, SEQ).clone()  # sharded like the data: which rows we hold
    buffers = [data["q"], data["k"], data["v"], data["dout"], positions]
    with context_parallel_ctx(
        mesh, buffers=buffers, seq_dims=[1] * len(buffers), no_restore_buffers=set(buffers),
        rotate_method=rotate_method, load_balance=load_balance,
    ):
        q, k, v = (t.detach().requires_grad_() for t in buffers[:3])
        out = _attention(q, k, v)
        out.backward(buffers[3])  # backward inside the context: the ring backward needs it too
    return {
        "positions": positions[0].clone(), "out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad,
    }


def _expected_positions(rank: int, world: int, load_balance: bool) -> list[int]:
    chunks = torch.arange(SEQ).chunk(2 * world if load_balance else world)
    if not load_balance:
        return chunks[rank].tolist()
    # Head-tail: rank r holds chunks r and 2*world-1-r, so every rank has the same causal work.
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]]).tolist()


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_matches_full_attention(world: int, tmp_path) -> None:
    cases = [(m, True) for m in supported_rotate_methods()] + [("allgather", False)]
    ranks = run_on_ranks(_attention_rank, world_size=world, tmp_path=tmp_path, args=(cases,))

    data = _qkv()
    q, k, v = (data[n].clone().requires_grad_() for n in ("q", "k", "v"))
    ref_out = _attention(q, k, v)
    ref_out.backward(data["dout"])
    ref = {"out": ref_out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}

    for r, got in enumerate(ranks):
        assert got["sdpa_restored"], f"rank {r}: F.scaled_dot_product_attention still patched after the context"
        # Forward and backward of each case: (world - 1) K/V exchanges each way, world K/V-gradient permutes.
        assert got["exchanges"]["issued"] >= len(cases) * world, got["exchanges"]
        assert got["exchanges"]["max"] == 1, f"rank {r}: {got['exchanges']['max']} ring exchanges in flight at once"
        for case in cases:
            res = got[case]
            pos = res["positions"]
            assert pos.tolist() == _expected_positions(r, world, load_balance=case[1]), (
                f"cp={world} {case} rank {r}: holds positions {pos.tolist()}"
            )
            for name, want in ref.items():
                torch.testing.assert_close(
                    res[name], want[:, pos], atol=ATOL, rtol=RTOL,
                    msg=lambda m: f"cp={world} rotate={case[0]} load_balance={case[1]} rank {r} {name}: {m}",
                )


# ---- the real model ---------------------------------------------------------------------------

MODEL_SEQ = 16


def _tiny_args() -> TransformerArgs:
    # debugmodel shape (16 query / 8 KV heads: GQA), 2 layers; RoPE length = seq_len, as CP requires.
    return replace(LLAMA3_FLAVORS["debugmodel"], n_layers=2).with_seq_len(MODEL_SEQ)


def _tokens(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (BS, MODEL_SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # (bs, seq) inputs, labels


def _model_loss_and_grads(model: Transformer, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)  # (bs, local seq, vocab)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    loss.backward()
    return loss.detach()


def _model_rank() -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("cp",))
    args = _tiny_args()
    model = Transformer(args)
    model.init_weights(seed=0)
    full_freqs = model.freqs_cis.clone()
    inputs, labels = _tokens(args.vocab_size)
    errors = {}
    for case, rope, rotate_method in (
        ("long_rope", torch.cat([model.freqs_cis, model.freqs_cis]), "allgather"),  # RoPE longer than seq_len
        ("rotate", model.freqs_cis, "ring"),
    ):
        try:
            with context_parallel_ctx(
                mesh, buffers=[inputs, rope], seq_dims=[1, 0], no_restore_buffers={inputs}, rotate_method=rotate_method
            ):
                pass
        except ConfigError as e:
            errors[case] = str(e)
    untouched = inputs.shape == (BS, MODEL_SEQ)  # the errors come before any sharding
    with context_parallel_ctx(
        mesh, buffers=[inputs, labels, model.freqs_cis], seq_dims=[1, 1, 0], no_restore_buffers={inputs, labels},
        rotate_method="allgather",
    ):
        local_seq = (inputs.shape[1], model.freqs_cis.shape[0])
        loss = _model_loss_and_grads(model, inputs, labels)
    # Each cp rank holds the loss and the gradient of its own tokens: the whole is their sum.
    group = mesh.get_group()
    dist.all_reduce(loss, group=group)
    grads = {}
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad, group=group)
        grads[name] = p.grad
    return {
        "loss": loss, "grads": grads, "local_seq": local_seq, "errors": errors, "untouched": untouched,
        "freqs_restored": torch.equal(model.freqs_cis, full_freqs),
    }


def test_model_forward_backward_under_cp_matches_one_process(tmp_path) -> None:
    world = 2
    ranks = run_on_ranks(_model_rank, world_size=world, tmp_path=tmp_path)

    args = _tiny_args()
    model = Transformer(args)
    model.init_weights(seed=0)
    inputs, labels = _tokens(args.vocab_size)
    ref_loss = _model_loss_and_grads(model, inputs, labels)
    ref_grads = {name: p.grad for name, p in model.named_parameters()}

    for r, got in enumerate(ranks):
        assert got["local_seq"] == (MODEL_SEQ // world, MODEL_SEQ // world), f"rank {r}: inputs / RoPE not sharded"
        assert got["freqs_restored"], f"rank {r}: the RoPE table was not restored after the context"
        assert got["untouched"], f"rank {r}: a rejected context sharded its buffers anyway"
        assert "model.max_seq_len must equal training.seq_len" in got["errors"].get("long_rope", ""), got["errors"]
        assert "parallelism.context_parallel_rotate_method='ring'" in got["errors"].get("rotate", ""), got["errors"]
        torch.testing.assert_close(got["loss"], ref_loss, atol=0, rtol=RTOL, msg=lambda m: f"rank {r} loss: {m}")
        assert got["grads"].keys() == ref_grads.keys()
        for name, want in ref_grads.items():
            torch.testing.assert_close(
                got["grads"][name], want, atol=ATOL, rtol=RTOL, msg=lambda m: f"rank {r} grad {name}: {m}"
            )


# ---- long context: the RoPE table at 128K --------------------------------------------------------

LONG_SEQ = 131072


def _long_rope_rank() -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from torchtitan_like.models.llama3.model import precompute_freqs_cis

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("cp",))
    a = LLAMA3_FLAVORS["1B"].with_seq_len(LONG_SEQ)  # Llama 3.2 RoPE scaling (factor 32)
    freqs = precompute_freqs_cis(a.head_dim, a.max_seq_len, a.rope_theta, a.rope_scaling)  # (seq, head_dim // 2, 2)
    full = freqs.clone()
    positions = torch.arange(LONG_SEQ).unsqueeze(0)  # (1, seq): the token positions, sharded alongside
    with context_parallel_ctx(
        mesh, buffers=[positions, freqs], seq_dims=[1, 0], no_restore_buffers={positions}, rotate_method="allgather"
    ):
        # The rotation this rank applies at each of its positions is the full table's at that position.
        local_positions = positions[0].clone()
        matches = torch.equal(freqs, full[local_positions])
    return {"positions": local_positions, "matches": matches, "restored": torch.equal(freqs, full)}


def test_rope_table_at_128k_is_sharded_with_the_positions(tmp_path) -> None:
    ranks = run_on_ranks(_long_rope_rank, world_size=2, tmp_path=tmp_path)
    quarter = LONG_SEQ // 4
    for r, got in enumerate(ranks):
        assert got["matches"] and got["restored"], f"rank {r}"
        # Head-tail load balancing over 4 chunks of 32K: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
        first, second = (0, 3) if r == 0 else (1, 2)
        want = torch.cat([torch.arange(first * quarter, (first + 1) * quarter),
                          torch.arange(second * quarter, (second + 1) * quarter)])
        assert torch.equal(got["positions"], want), f"rank {r}"


# ---- user-facing errors -----------------------------------------------------------------------


def test_unknown_rotate_method_names_the_key_and_the_choices() -> None:
    assert set(supported_rotate_methods()) >= {"allgather", "alltoall"}  # torch 2.11-2.13 offer both
    with pytest.raises(ConfigError) as e:
        set_rotate_method("ring")
    msg = str(e.value)
    assert "parallelism.context_parallel_rotate_method='ring'" in msg
    assert "'allgather'" in msg and "'alltoall'" in msg and torch.__version__ in msg


def test_sequence_length_rules() -> None:
    check_cp_supported(cp_degree=2, seq_len=16, rope_len=16)
    check_cp_supported(cp_degree=4, seq_len=12, load_balance=False)
    balanced = r"training.seq_len=12 must be divisible by 2 x context_parallel_degree\(4\) = 8 .*; try 16"
    with pytest.raises(ConfigError, match=balanced):
        check_cp_supported(cp_degree=4, seq_len=12)
    unbalanced = r"training.seq_len=6 must be divisible by context_parallel_degree\(4\); try 8"
    with pytest.raises(ConfigError, match=unbalanced):
        check_cp_supported(cp_degree=4, seq_len=6, load_balance=False)
    with pytest.raises(ConfigError, match=r"model.max_seq_len=32 must equal training.seq_len=16"):
        check_cp_supported(cp_degree=2, seq_len=16, rope_len=32)


def test_torch_without_the_cp_pieces_is_named(monkeypatch) -> None:
    empty = types.ModuleType("empty")
    for name in (
        "torch.distributed.tensor.experimental._context_parallel._attention",
        "torch.distributed.tensor.experimental._attention",
    ):
        monkeypatch.setitem(sys.modules, name, empty)
    cp_mod._torch_cp_internals.cache_clear()
    try:
        missing = rf"torch {re.escape(torch.__version__)} lacks the private CP pieces.*custom_ops"
        with pytest.raises(RuntimeError, match=missing):
            supported_rotate_methods()
    finally:
        monkeypatch.undo()
        cp_mod._torch_cp_internals.cache_clear()
