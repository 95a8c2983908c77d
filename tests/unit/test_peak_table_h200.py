"""The peak table gives the H200 NVL its own peak, not the H200 SXM's.

The table separates the H100 PCIe / NVL variants from the SXM; its bare `\\bH200\\b` row once also
matched "NVIDIA H200 NVL", whose dense bf16 peak is ~835 TFLOPS (NVIDIA: 1,671 with sparsity; fp8
3,341), not the SXM's 989: MFU on an H200 NVL was understated by ~16%.
"""

from __future__ import annotations

import pytest

from torchtitan_like.components.flops import peak_tflops_of


def test_h200_sxm_is_989():
    assert peak_tflops_of("NVIDIA H200") == 989.0


def test_h200_nvl_is_not_the_sxm_peak():
    assert peak_tflops_of("NVIDIA H200 NVL") == pytest.approx(835.0, abs=1.0)
    assert peak_tflops_of("NVIDIA H200 NVL", "fp8") == pytest.approx(1670.0, abs=2.0)
