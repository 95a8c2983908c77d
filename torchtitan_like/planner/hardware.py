"""Hardware profiles: what the planner's cost model needs to know about one GPU and its links.

A profile is a JSON object with the fields of `HardwareProfile`. Built-ins exist for H100 (SXM),
H200, B200, A100 (SXM 80GB), and H100-GT (the 96 GB, 500 W H100s of torchtitan's published
tables); `benchmarks/calibrate.py` measures the current machine and writes one. Peak TFLOPS come
from the MFU peak table (components/flops.py); the rest are datasheet values (HBM size and
bandwidth, NVLink, one 400 Gb/s NIC per GPU; 200 Gb/s for A100 clusters), and the achievable
fractions come from one calibration on published results (CALIBRATION), to be replaced by a
calibration run on the GPU itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from torchtitan_like.components.flops import peak_tflops_of
from torchtitan_like.errors import ConfigError


CALIBRATION = """The default efficiencies (GEMM 0.41, attention 0.27; fp8 tied to GEMM) are the two values that make the
planner reproduce two published rows on the hardware they ran on (the H100-GT profile): torchtitan's
Llama 3.1 8B FSDP + compile on 8 GPUs (GEMM-bound) and 8B FSDP8 at seq 32K (attention-heavy).
benchmarks/planner_published.py scores every other published row against them (docs/planner.md).
They stand for every built-in until benchmarks/calibrate.py measures a GPU of that kind."""


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    peak_bf16_tflops: float
    """Dense bf16 tensor-core peak of one GPU (the MFU denominator)."""
    peak_fp8_tflops: float | None
    """Dense fp8 peak; None when the GPU has no fp8 tensor cores."""
    hbm_gib: float
    """Memory of one GPU."""
    hbm_gbps: float
    """Memory bandwidth of one GPU, GB/s."""
    intra_node_gbps: float
    """Collective bus bandwidth between GPUs of one node, GB/s per GPU (NVLink)."""
    inter_node_gbps: float
    """Collective bus bandwidth of one GPU to other nodes, GB/s (its NIC)."""
    gpus_per_node: int = 8
    gemm_efficiency: float = 0.41
    """Fraction of the peak that the GEMMs of a training step reach, launch gaps and small shapes
    included (calibrated: see CALIBRATION)."""
    fp8_gemm_efficiency: float = 0.29
    """Fraction of the fp8 peak that float8 training linears reach, their dynamic-scaling casts
    included: 1.4x the bf16 GEMM rate (0.29 = 0.41 x 1.4 / 2, the fp8 peak being twice the bf16
    one), within torchao's published 1.2-1.5x end to end."""
    attention_efficiency: float = 0.27
    """Fraction of the bf16 peak that SDPA flash attention reaches, forward and backward, causal
    (calibrated: see CALIBRATION)."""
    link_efficiency: float = 0.8
    """Fraction of the link bandwidths above that collectives reach."""
    reserved_gib: float = 2.0
    """Memory that is not the allocator's to hand out: CUDA context, NCCL and kernel workspaces."""
    device: str = "cuda"
    """"cuda" or "cpu": what the trainer will run on. Async TP needs CUDA, and on CPU (gloo) the
    float8 TP styles gather in high precision; the planner offers and prices layouts accordingly."""

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_gib * 2**30

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def _gpu(name: str, table_name: str, **kw: float) -> HardwareProfile:
    bf16 = peak_tflops_of(table_name, "bf16")
    assert bf16 is not None, table_name
    return HardwareProfile(name=name, peak_bf16_tflops=bf16, peak_fp8_tflops=peak_tflops_of(table_name, "fp8"), **kw)


BUILTIN_PROFILES: dict[str, HardwareProfile] = {
    "H100": _gpu("H100", "NVIDIA H100 80GB HBM3", hbm_gib=79.6, hbm_gbps=3350,
                 intra_node_gbps=450, inter_node_gbps=50),
    # The H100s of torchtitan's published Llama 3.1 tables (Grand Teton hosts): 96 GB HBM2e at 2.4 TB/s,
    # a 500 W power limit, "peak TFLOPS between SXM and NVL" (their footnote): the midpoint of the two.
    "H100-GT": HardwareProfile(name="H100-GT", peak_bf16_tflops=(989.0 + 835.0) / 2, peak_fp8_tflops=(1979.0 + 1670.0) / 2,
                               hbm_gib=95.0, hbm_gbps=2400, intra_node_gbps=450, inter_node_gbps=50),
    "H200": _gpu("H200", "NVIDIA H200", hbm_gib=139.8, hbm_gbps=4800, intra_node_gbps=450, inter_node_gbps=50),
    "B200": _gpu("B200", "NVIDIA B200", hbm_gib=178.4, hbm_gbps=8000, intra_node_gbps=900, inter_node_gbps=50),
    "A100": _gpu("A100", "NVIDIA A100-SXM4-80GB", hbm_gib=79.2, hbm_gbps=2039, intra_node_gbps=300,
                 inter_node_gbps=25),
}


POSITIVE_FIELDS = frozenset({
    "peak_bf16_tflops", "peak_fp8_tflops", "hbm_gib", "hbm_gbps", "intra_node_gbps", "inter_node_gbps",
    "gemm_efficiency", "fp8_gemm_efficiency", "attention_efficiency", "link_efficiency",
})
"""Rates and sizes the cost model divides by: 0 is refused (reserved_gib may be 0)."""


def load_profile(name_or_path: str) -> HardwareProfile:
    """A built-in profile by name (case-insensitive), or a JSON profile file."""
    key = name_or_path.upper()
    if key in BUILTIN_PROFILES:
        return BUILTIN_PROFILES[key]
    path = Path(name_or_path)
    if not path.is_file():
        raise ConfigError(
            f"hardware profile {name_or_path!r} is neither a built-in ({', '.join(BUILTIN_PROFILES)}) nor a file; "
            "write one with benchmarks/calibrate.py"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"hardware profile {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"hardware profile {path}: expected a JSON object of fields, got {type(data).__name__}")
    known = {f.name: f for f in fields(HardwareProfile)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"hardware profile {path}: unknown fields {unknown}; known: {sorted(known)}")
    missing = sorted(n for n, f in known.items() if n not in data and f.default is MISSING)
    if missing:
        raise ConfigError(f"hardware profile {path}: missing fields {missing}")
    for name, value in data.items():
        if _is_number(value) and not math.isfinite(value):
            # (Python's json reads Infinity, NaN and 1e999; the cost model would print inf GiB or nan tokens/s.)
            raise ConfigError(
                f"hardware profile {path}: field {name}={value!r} must be a finite number: measure it with "
                "benchmarks/calibrate.py, or use a built-in profile's value"
            )
        if name in POSITIVE_FIELDS and _is_number(value) and value == 0:
            raise ConfigError(
                f"hardware profile {path}: field {name}={value!r} must be > 0 (the planner divides by it); "
                "measure it with benchmarks/calibrate.py, or use a built-in profile's value"
            )
        if name == "name":
            ok = isinstance(value, str)
        elif name == "peak_fp8_tflops":
            ok = value is None or _is_number(value) and value >= 0
        elif name == "device":
            if value not in ("cuda", "cpu"):
                raise ConfigError(f'hardware profile {path}: field device={value!r} must be "cuda" or "cpu"')
            ok = True
        elif name == "gpus_per_node":
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        else:
            ok = _is_number(value) and value >= 0
        if not ok:
            raise ConfigError(f"hardware profile {path}: field {name}={value!r} has the wrong type or sign")
    return HardwareProfile(**data)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
