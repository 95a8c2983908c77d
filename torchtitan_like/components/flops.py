"""Training FLOPs per token (the NeMo/Megatron formula) and the per-device peak TFLOPS table for MFU."""

from __future__ import annotations

import logging
import re
from typing import Literal

import torch

from torchtitan_like.models.llama3.args import TransformerArgs

logger = logging.getLogger(__name__)

# Dense (no sparsity) tensor-core TFLOPS per GPU from the NVIDIA datasheets: (name pattern, bf16, fp8).
# fp8 None = the GPU has no fp8 tensor cores. Order matters: the first match wins, so the PCIe/NVL
# variants come before the bare "H100", and word boundaries keep "GB200" from matching "B200".
_PEAK_TFLOPS: tuple[tuple[str, float, float | None], ...] = (
    (r"\bH100\b.*\bPCIe\b", 756.0, 1513.0),
    (r"\bH100\b.*\bNVL\b", 835.0, 1670.0),
    (r"\bGH200\b", 989.0, 1979.0),
    (r"\bH100\b", 989.0, 1979.0),  # SXM (reported as e.g. "NVIDIA H100 80GB HBM3")
    (r"\bH200\b.*\bNVL\b", 835.0, 1670.0),  # the 600 W PCIe card (datasheet: 1,671 / 3,341 with sparsity)
    (r"\bH200\b", 989.0, 1979.0),
    (r"\bA100\b", 312.0, None),
    (r"\bB200\b", 2250.0, 4500.0),
)


def model_flops_per_token(args: TransformerArgs, seq_len: int, *, causal: bool = False) -> float:
    """Training (forward + backward) FLOPs per token: 12·L·h²·(1 + G/H + s/h) + 18·L·ffn·h + 6·V·h."""
    L, h, s = args.n_layers, args.dim, seq_len
    G, H, ffn, V = args.kv_heads, args.n_heads, args.ffn_hidden_dim, args.vocab_size
    # s/h is the QK^T and AV score work; under a causal mask kernels skip the upper triangle, so half of it.
    score = (s / h) / 2 if causal else s / h
    attention = 12 * L * h * h * (1 + G / H + score)
    mlp = 18 * L * ffn * h  # SwiGLU: three h x ffn matmuls, 6 FLOPs per weight per token
    output = 6 * V * h  # the output projection; the embedding lookup costs no FLOPs
    return float(attention + mlp + output)


def peak_tflops_of(name: str, dtype: Literal["bf16", "fp8"] = "bf16") -> float | None:
    """Peak dense TFLOPS of the GPU named `name` (e.g. "NVIDIA H100 80GB HBM3") from the table; None when
    the table does not know it or it has no such tensor cores."""
    for pattern, bf16, fp8 in _PEAK_TFLOPS:
        if re.search(pattern, name):
            return bf16 if dtype == "bf16" else fp8
    return None


def peak_tflops(
    device: torch.device, dtype: Literal["bf16", "fp8"] = "bf16", override: float | None = None
) -> float | None:
    """Peak dense TFLOPS of one device for MFU: override, else the built-in table, else None (MFU n/a)."""
    if override is not None:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for pattern, bf16, fp8 in _PEAK_TFLOPS:
        if re.search(pattern, name):
            peak = bf16 if dtype == "bf16" else fp8
            if peak is None:
                logger.warning(
                    "%s has no %s tensor cores in the peak table: MFU will show n/a "
                    "(set metrics.peak_tflops to report it)", name, dtype,
                )
            return peak
    logger.warning(
        "Unknown GPU %r: no peak %s TFLOPS in the built-in table, MFU will show n/a; "
        "set metrics.peak_tflops to this device's dense peak to report it", name, dtype,
    )
    return None
