"""FLOPs per token (NeMo/Megatron formula) and the peak TFLOPS table."""

from __future__ import annotations

import logging

import pytest
import torch

from torchtitan_like.components.flops import model_flops_per_token, peak_tflops
from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS

CUDA0 = torch.device("cuda", 0)


def test_llama31_8b_flops_per_8192_token_sample() -> None:
    args = LLAMA3_FLAVORS["8B"]
    # The formula's inputs, so a change to the flavor shows up here and not as a wrong FLOPs figure.
    assert (args.n_layers, args.dim, args.kv_heads, args.n_heads) == (32, 4096, 8, 32)
    assert (args.ffn_hidden_dim, args.vocab_size) == (14336, 128256)
    per_sample = model_flops_per_token(args, 8192) * 8192
    assert f"{per_sample:.2e}" == "4.74e+14"


def test_llama31_8b_causal_halves_the_score_term() -> None:
    args = LLAMA3_FLAVORS["8B"]
    full, causal = model_flops_per_token(args, 8192), model_flops_per_token(args, 8192, causal=True)
    # The score term 12·L·h²·(s/h) = 12·L·h·s; causal keeps half of it and nothing else changes.
    assert full - causal == pytest.approx(12 * 32 * 4096 * 8192 / 2)
    # 12·32·4096²·2.25 + 18·32·14336·4096 + 6·128256·4096 = 51,470,401,536 per token.
    assert causal == 51_470_401_536
    assert f"{causal * 8192:.3e}" == "4.216e+14"


def test_debug_model_hand_computed() -> None:
    args = LLAMA3_FLAVORS["debugmodel"]
    assert (args.n_layers, args.dim, args.kv_heads, args.n_heads, args.ffn_hidden_dim, args.vocab_size) == (
        6, 256, 8, 16, 768, 2000,
    )
    # s=2048: attention 12·6·256²·(1 + 8/16 + 2048/256) = 4,718,592 · 9.5; mlp 18·6·768·256; output 6·2000·256.
    attention, mlp, output = 44_826_624, 21_233_664, 3_072_000
    assert model_flops_per_token(args, 2048) == attention + mlp + output == 69_132_288
    # Causal: s/h = 8 becomes 4, so the attention factor is 5.5.
    assert model_flops_per_token(args, 2048, causal=True) == 25_952_256 + mlp + output


def test_flops_grow_with_seq_len_only_through_attention() -> None:
    args = LLAMA3_FLAVORS["debugmodel"]
    delta = model_flops_per_token(args, 1024) - model_flops_per_token(args, 512)
    assert delta == pytest.approx(12 * 6 * 256 * 512)


def test_override_wins_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_tflops(torch.device("cpu"), override=123.0) == 123.0
    assert peak_tflops(CUDA0, "fp8", override=50.5) == 50.5


def test_cpu_has_no_peak(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert peak_tflops(torch.device("cpu")) is None
        assert peak_tflops(torch.device("cpu"), "fp8") is None
    assert caplog.records == []  # CPU MFU is n/a by design, not worth a warning


@pytest.mark.parametrize(
    ("name", "bf16", "fp8"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0, 1979.0),
        ("NVIDIA H100 PCIe", 756.0, 1513.0),
        ("NVIDIA H100 NVL", 835.0, 1670.0),
        ("NVIDIA H200", 989.0, 1979.0),
        ("NVIDIA GH200 480GB", 989.0, 1979.0),
        ("NVIDIA A100-SXM4-80GB", 312.0, None),
        ("NVIDIA A100 80GB PCIe", 312.0, None),
        ("NVIDIA B200", 2250.0, 4500.0),
    ],
)
def test_known_gpus(monkeypatch: pytest.MonkeyPatch, name: str, bf16: float, fp8: float | None) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops(CUDA0) == bf16
    assert peak_tflops(CUDA0, "fp8") == fp8


def test_unknown_gpu_warns_once_and_names_the_key(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GB200")
    with caplog.at_level(logging.WARNING, logger="torchtitan_like.components.flops"):
        assert peak_tflops(CUDA0) is None
    assert len(caplog.records) == 1
    assert "NVIDIA GB200" in caplog.text and "metrics.peak_tflops" in caplog.text


def test_a100_fp8_warns_and_names_the_key(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    with caplog.at_level(logging.WARNING, logger="torchtitan_like.components.flops"):
        assert peak_tflops(CUDA0, "fp8") is None
    assert len(caplog.records) == 1 and "metrics.peak_tflops" in caplog.text
