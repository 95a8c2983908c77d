import math

import pytest
import torch

from torchtitan_like.models.llama3 import LLAMA3_FLAVORS, RopeScaling, Transformer, TransformerArgs
from torchtitan_like.models.llama3.model import precompute_freqs_cis

SMALL = TransformerArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=32)


def build(args: TransformerArgs, seed: int = 0) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model


@pytest.mark.parametrize(
    "flavor, params, ffn",
    [
        # Published sizes (billions of parameters) and intermediate sizes of the Llama 3.x releases.
        ("1B", 1.236, 8192),
        ("3B", 3.213, 8192),
        ("8B", 8.030, 14336),
        ("70B", 70.554, 28672),
        ("405B", 405.853, 53248),
    ],
)
def test_flavors_have_published_sizes(flavor, params, ffn):
    args = LLAMA3_FLAVORS[flavor]
    assert args.ffn_hidden_dim == ffn
    assert args.num_params() / 1e9 == pytest.approx(params, abs=1e-3)
    with torch.device("meta"):
        model = Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == args.num_params()


def test_parameter_names_follow_meta_checkpoints():
    names = {n for n, _ in build(SMALL).named_parameters()}
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    for i in range(SMALL.n_layers):
        expected |= {f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
        expected |= {f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
        expected |= {f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"}
    assert names == expected


def test_init_is_deterministic_and_seeded():
    a, b, c = build(SMALL, 1), build(SMALL, 1), build(SMALL, 2)
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
        if not n.endswith("norm.weight"):
            assert not torch.equal(pa, pc), n
    assert a.layers["0"].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.2)


def test_init_weights_on_meta_is_an_error():
    with torch.device("meta"):
        model = Transformer(SMALL)
    with pytest.raises(RuntimeError, match="to_empty"):
        model.init_weights(0)


def test_forward_is_causal_and_shapes():
    model = build(SMALL)
    x = torch.randint(0, SMALL.vocab_size, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % SMALL.vocab_size
    lx, ly = model(x), model(y)
    assert lx.shape == (2, 16, SMALL.vocab_size)
    torch.testing.assert_close(lx[:, :10], ly[:, :10])
    assert not torch.allclose(lx[:, 10:], ly[:, 10:])


def test_tied_embeddings_share_one_parameter():
    args = TransformerArgs(dim=64, n_layers=1, n_heads=4, vocab_size=50, max_seq_len=8, tie_word_embeddings=True)
    model = build(args)
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) == args.num_params()


def test_rope_llama31_scaling_matches_the_published_rule():
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    head_dim, theta = 128, 500000.0
    cos_sin = precompute_freqs_cis(head_dim, 2, theta, scaling)[1].double()  # position 1: angles = the frequencies
    freqs = torch.atan2(cos_sin[:, 1], cos_sin[:, 0])
    base = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    for f_scaled, f in zip(freqs.tolist(), base.tolist()):
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:  # high frequency: unchanged
            want = f
        elif wavelen > 8192 / 1:  # low frequency: divided by the factor
            want = f / 8
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            want = (1 - smooth) * f / 8 + smooth * f
        # atan2 wraps to (-pi, pi]; all frequencies are < pi here
        assert f_scaled == pytest.approx(want, rel=1e-5, abs=1e-9)


def test_rope_long_context_positions_are_exact():
    # At 128K positions, the table must equal direct evaluation (no accumulated drift).
    scaling = LLAMA3_FLAVORS["8B"].rope_scaling
    table = precompute_freqs_cis(128, 131072, 500000.0, scaling)
    for pos in (0, 1, 8191, 65537, 131071):
        direct = precompute_freqs_cis(128, pos + 1, 500000.0, scaling)[pos]
        torch.testing.assert_close(table[pos], direct)


def test_rope_rotation_is_the_complex_product_in_real_ops():
    # The rotation Meta's layout defines: each interleaved pair (x0, x1) times e^{i m w_k}, here with
    # torch's complex arithmetic as the reference; ours must equal it and use no complex op (inductor
    # cannot fuse those: it would call each as a separate eager kernel).
    from torch.fx.experimental.proxy_tensor import make_fx

    from torchtitan_like.models.llama3.model import apply_rotary_emb

    scaling = LLAMA3_FLAVORS["8B"].rope_scaling
    table = precompute_freqs_cis(64, 96, 500000.0, scaling)
    assert table.shape == (96, 32, 2) and table.dtype == torch.float32
    g = torch.Generator().manual_seed(0)
    xq, xk = torch.randn(2, 96, 4, 64, generator=g), torch.randn(2, 96, 2, 64, generator=g)
    rot = torch.polar(torch.ones(96, 32, dtype=torch.float64), torch.atan2(table[..., 1], table[..., 0]).double())
    rot = rot.to(torch.complex64).view(1, 96, 1, 32)
    for dtype in (torch.float32, torch.bfloat16):
        q, k = xq.to(dtype), xk.to(dtype)
        got_q, got_k = apply_rotary_emb(q, k, table)
        for got, x in ((got_q, q), (got_k, k)):
            want = torch.view_as_real(torch.view_as_complex(x.float().reshape(*x.shape[:-1], 32, 2)) * rot).flatten(3)
            assert got.dtype == dtype
            torch.testing.assert_close(got, want.to(dtype), rtol=1e-6, atol=1e-6)
    graph = make_fx(apply_rotary_emb)(xq, xk, table).graph
    ops = {str(n.target) for n in graph.nodes if n.op == "call_function"}
    assert not any("complex" in op or "view_as_real" in op for op in ops), sorted(ops)
    assert not any(isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_complex() for n in graph.nodes)
