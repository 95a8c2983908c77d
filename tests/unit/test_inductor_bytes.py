"""benchmarks/inductor_bytes.py: the bytes inductor's kernels move for one compiled block, from Triton code
generated without a GPU.

The count is read from the generated module. Each kernel's source string there carries a benchmark harness
with a `def call(args)` of its own that launches the kernel once; only the module's own `call` (the last one)
says how often the block launches each kernel. (A first count of RESULTS.md's table took every launch in the
file, harnesses included.) Where triton is installed, a real block is compiled too; where it is not (CI), the
tool says what it needs.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import inductor_bytes  # noqa: E402


def _kernel_source(name: str, gb: float) -> str:
    """One kernel as inductor writes it with benchmark_kernel = True: its source string, harness included."""
    return f"""
{name} = async_compile.triton('{name}', '''
@triton_heuristics.pointwise(size_hints={{'x': 1024}}, inductor_meta={{'kernel_name': '{name}', 'kernel_num_gb': {gb}}})
@triton.jit
def {name}(in_ptr0, out_ptr0, xnumel, XBLOCK : tl.constexpr):
    pass

def get_args():
    return (None,)

def call(args):
    with torch.cuda._DeviceGuard(0):
        {name}.run(*args, stream=None)
''', device_str='cpu')
"""


def _module(tmp_path: Path, kernels: dict[str, float], launches: list[str]) -> str:
    body = "".join(_kernel_source(k, gb) for k, gb in kernels.items())
    main = "\n".join(f"    {k}.run(buf0, buf1, 1024, stream=None)" for k in launches)
    path = tmp_path / "module.py"
    path.write_text(f"{body}\n\ndef call(args):\n{main}\n    return (buf1,)\n")
    return str(path)


def test_counts_the_blocks_launches_only(tmp_path):
    path = _module(tmp_path, {"triton_poi_fused_cast_0": 0.25, "triton_red_fused_amax_1": 0.75},
                   ["triton_poi_fused_cast_0", "triton_red_fused_amax_1", "triton_poi_fused_cast_0"])
    got = inductor_bytes.module_bytes(path)
    # Two launches of the cast and one of the amax: not one more of each for the harnesses.
    assert got["kernels"] == 3
    assert got["gb"] == pytest.approx(2 * 0.25 + 0.75)
    assert got["top"] == [{"gb": 0.75, "calls": 1, "kernel": "triton_red_fused_amax_1"},
                          {"gb": 0.5, "calls": 2, "kernel": "triton_poi_fused_cast_0"}]


def test_a_launch_without_its_bytes_is_refused(tmp_path):
    path = _module(tmp_path, {"triton_poi_fused_cast_0": 0.25}, ["triton_poi_fused_cast_0", "triton_poi_fused_other_1"])
    with pytest.raises(SystemExit, match="no kernel_num_gb for \\['triton_poi_fused_other_1'\\].*not laid out"):
        inductor_bytes.module_bytes(path)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "inductor_bytes.py"), *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_bad_arguments_are_one_line_errors(tmp_path):
    r = _run("--inductor", "realize_opcount_threshold")
    assert r.returncode == 2 and "give KEY=VALUE, e.g. realize_opcount_threshold=50" in r.stderr
    r = _run("--impl", "torchtitan", "--site", str(tmp_path))
    assert r.returncode == 2 and f"no torchtitan in --site {tmp_path}" in r.stderr


def test_a_real_block(tmp_path):
    """Compiled for real where triton is installed (a small block: bf16 moves less than rowwise float8);
    elsewhere the tool stops and says it needs triton."""
    small = ("--dim", "256", "--n-heads", "4", "--n-kv-heads", "2", "--seq-len", "64")
    if importlib.util.find_spec("triton") is None:
        r = _run(*small)
        assert r.returncode == 1 and "needs triton importable" in r.stderr
        return
    out = {}
    for recipe in ("none", "rowwise"):
        r = _run(*small, "--recipe", recipe, "--json", str(tmp_path / f"{recipe}.json"))
        assert r.returncode == 0, r.stderr[-2000:]
        out[recipe] = json.loads((tmp_path / f"{recipe}.json").read_text())
    for result in out.values():
        assert result["forward"]["kernels"] > 0 and result["backward"]["kernels"] > 0
        assert result["gb"] == pytest.approx(result["forward"]["gb"] + result["backward"]["gb"])
    assert out["rowwise"]["gb"] > out["none"]["gb"]
