"""Bytes that inductor's kernels move for one compiled transformer block, forward and backward, found without a GPU.

    python benchmarks/inductor_bytes.py --recipe rowwise                      # our 1B block at seq 8192
    python benchmarks/inductor_bytes.py --recipe rowwise --inductor realize_opcount_threshold=50
    python benchmarks/inductor_bytes.py --impl torchtitan --site /tmp/site --recipe tensorwise --top 15
    python benchmarks/inductor_bytes.py --dim 4096 --ffn-multiplier 1.3 --seq-len 2048 --json out.json

Which fusions inductor makes decides how often a step reads and writes its activations, and float8
casts add many (an amax reduction and a cast per operand, per matmul). A GPU trace gives the time;
this gives the traffic, on any machine: inductor generates the Triton code it would run on a GPU
(`cpu_backend = "triton"`), with `benchmark_kernel = True`, which records in the generated module the
bytes each kernel reads and writes (`kernel_num_gb`). Nothing is compiled for or run on a GPU: Triton's
compile step gets a stand-in whose launch does nothing, and the float8 matmuls return their output
buffer unwritten; attention (an extern op) runs on the CPU. Per generated module (forward, backward):
the kernels the block calls and the sum over those calls of `kernel_num_gb`.

What it is not: a GPU's numbers. CPU autocast leaves the float8 linears' inputs in fp32 (torchao casts
them to the autocast dtype under CUDA's autocast only), so the casts read 4 bytes per element where a
GPU reads 2; the fusion decisions are a GPU's (the realize threshold is set to the GPU's where torch
2.13 keeps a larger one for CPU), but the tiling and split-reduction choices that depend on the device
are the CPU's. It patches private inductor internals (checked on torch 2.11 and 2.13) and needs `triton`
importable (the version the torch wheel names). A developer tool: not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_KERNEL_GB = re.compile(r"'kernel_name': '(triton_\w+)'.*?'kernel_num_gb': ([0-9.e+-]+)", re.S)
_CALL = re.compile(r"\b(triton_\w+)\.run\(")


def module_bytes(path: str) -> dict[str, Any]:
    """One generated module's kernel calls and bytes. Each kernel's source string carries a benchmark
    harness with its own `def call(args)` that launches it once; the module's own `call` comes last."""
    src = Path(path).read_text()
    gb = {name: float(v) for name, v in _KERNEL_GB.findall(src)}
    body = src[src.rindex("def call(args)"):] if "def call(args)" in src else ""
    calls = Counter(_CALL.findall(body))
    missing = sorted(set(calls) - set(gb))
    if missing:
        raise SystemExit(f"inductor_bytes: no kernel_num_gb for {missing[:3]} in {path}: this torch's generated code "
                         f"is not laid out as this tool expects")
    kernels = sorted(((gb[k] * n, k, n) for k, n in calls.items()), reverse=True)
    return {"path": path, "kernels": sum(calls.values()), "gb": sum(g for g, _, _ in kernels),
            "top": [{"gb": round(g, 4), "calls": n, "kernel": k} for g, k, n in kernels]}


def _patch_inductor_for_codegen_only() -> None:
    """Generate Triton code on a machine without a GPU: no Triton compile, no kernel launch."""
    import torch._inductor.async_compile as async_compile
    import torch.utils._triton as triton_utils

    triton_utils.triton_hash_with_backend = lambda: "codegen-only"  # (asks the GPU driver otherwise)
    triton_utils.triton_backend = lambda: None

    class _Kernel:
        def __init__(self, name: str) -> None:
            self.name = name

        def run(self, *args: Any, **kwargs: Any) -> None:
            return None

    async_compile.AsyncCompile.triton = lambda self, name, source, *a, **k: _Kernel(name)
    from torch._inductor import select_algorithm

    select_algorithm.extern_kernels._scaled_mm = lambda *a, out=None, **k: out  # CPU fp8 matmuls are slow


def build_block(impl: str, a: argparse.Namespace) -> tuple[Any, Any]:
    """One transformer block and a function calling it on x."""
    if impl == "ours":
        from torchtitan_like.models.llama3.args import TransformerArgs
        from torchtitan_like.models.llama3.model import TransformerBlock, precompute_freqs_cis

        args = TransformerArgs(dim=a.dim, n_layers=1, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, vocab_size=256,
                               multiple_of=a.multiple_of, ffn_dim_multiplier=a.ffn_multiplier, max_seq_len=a.seq_len)
        block = TransformerBlock(0, args)
        freqs = precompute_freqs_cis(args.head_dim, a.seq_len, args.rope_theta, None)
        return block, lambda b, x: b(x, freqs)
    sys.path.append(a.site)  # after site-packages: torch, torchao and triton stay the environment's
    from torchtitan.models.llama3.model.args import TransformerModelArgs
    from torchtitan.models.llama3.model.model import TransformerBlock as TTBlock
    from torchtitan.models.llama3.model.model import precompute_freqs_cis as tt_freqs

    args = TransformerModelArgs(dim=a.dim, n_layers=1, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, vocab_size=256,
                                multiple_of=a.multiple_of, ffn_dim_multiplier=a.ffn_multiplier, max_seq_len=a.seq_len)
    block = TTBlock(0, args)
    freqs = tt_freqs(a.dim // a.n_heads, a.seq_len, args.rope_theta, args.rope_scaling_args)
    return block, lambda b, x: b(x, freqs, None)


def _inductor_setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--inductor {text!r}: give KEY=VALUE, e.g. realize_opcount_threshold=50")
    return key, json.loads(value) if value not in ("True", "False") else value == "True"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--impl", choices=("ours", "torchtitan"), default="ours")
    p.add_argument("--site", default="/tmp/site", help="where torchtitan (0.2.2) is installed, for --impl torchtitan")
    # (Not rowwise_with_gw_hp: under CPU autocast its backward meets an fp32 input it cannot take.)
    p.add_argument("--recipe", choices=("none", "tensorwise", "rowwise"), default="rowwise",
                   help="torchao float8 recipe of the block's linears; none: bf16 autocast")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--n-heads", type=int, default=32)
    p.add_argument("--n-kv-heads", type=int, default=8)
    p.add_argument("--ffn-multiplier", type=float, default=1.5, help="1.5: the 1B's ffn 8192; 1.3 at dim 4096: 14336")
    p.add_argument("--multiple-of", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--inductor", type=_inductor_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="a torch._inductor.config setting (repeatable; VALUE as JSON)")
    p.add_argument("--top", type=int, default=0, help="also list the N kernels that move the most bytes")
    p.add_argument("--json", type=Path, help="write the result here")
    a = p.parse_args(argv)
    if a.impl == "torchtitan" and not Path(a.site, "torchtitan").is_dir():
        p.error(f"--impl torchtitan: no torchtitan in --site {a.site} (tools/fetch_gpu_wheels.sh --peer, then pip install "
                f"--no-deps --target {a.site} .whl/torchtitan-*.whl)")

    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # its CUDA extensions cannot load here
    import torch

    try:
        import triton  # noqa: F401
    except ImportError:
        raise SystemExit(f"inductor_bytes: needs triton importable (pip install the triton that torch "
                         f"{torch.__version__} names)") from None
    import torch._inductor.config as inductor_config

    paths: list[str] = []

    class _Paths(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if "Output code written to:" in message:
                path = message.split("Output code written to:", 1)[1].strip()
                if path not in paths:
                    paths.append(path)

    torch._logging.set_logs(output_code=True)
    import torch._inductor.codecache  # noqa: F401  (defines the artifact logger that names each module)

    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch._inductor") and "output_code" in n]:
        artifact = logging.getLogger(name)
        artifact.addHandler(_Paths())
        artifact.propagate = False  # torch's handler would print every module's code
    _patch_inductor_for_codegen_only()
    inductor_config.cpu_backend = "triton"
    inductor_config.benchmark_kernel = True
    if hasattr(inductor_config, "realize_cpu_opcount_threshold"):  # torch 2.13: a larger one for CPU than GPU's
        inductor_config.realize_cpu_opcount_threshold = inductor_config._realize_opcount_threshold_default
    for key, value in a.inductor:
        if not hasattr(inductor_config, key):
            p.error(f"--inductor {key}: torch {torch.__version__}'s inductor has no such setting")
        setattr(inductor_config, key, value)

    block, call = build_block(a.impl, a)
    if a.recipe != "none":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(block, config=Float8LinearConfig.from_recipe_name(a.recipe))
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(1, a.seq_len, a.dim, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = call(compiled, x)
    y.float().sum().backward()
    if len(paths) != 2:
        raise SystemExit(f"inductor_bytes: expected 2 generated modules (forward, backward), got {len(paths)}")
    fw, bw = (module_bytes(path) for path in paths)
    result = {"torch": torch.__version__, "impl": a.impl, "recipe": a.recipe,
              "shape": {"dim": a.dim, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads, "seq_len": a.seq_len,
                        "ffn_hidden": block.feed_forward.w1.weight.shape[0]},
              "inductor": dict(a.inductor), "forward": fw, "backward": bw, "gb": fw["gb"] + bw["gb"]}
    print(f"{a.impl} {a.recipe} on torch {torch.__version__}, {result['shape']}"
          + (f", inductor {dict(a.inductor)}" if a.inductor else "")
          + f": {result['gb']:.2f} GB (forward {fw['gb']:.2f} in {fw['kernels']} kernel calls, backward {bw['gb']:.2f} "
          f"in {bw['kernels']})")
    for name, part in (("fw", fw), ("bw", bw)):
        for k in part["top"][:a.top]:
            print(f"  {name} {k['gb'] * 1000:8.1f} MB x{k['calls']} {k['kernel']}")
    if a.json:
        partial = a.json.with_name(a.json.name + ".partial")
        partial.write_text(json.dumps(result, indent=1) + "\n")
        partial.replace(a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
