"""bench_train.py with a relative --out, started from a folder other than the repo root, keeps its result.

The orchestrator once passed the raw-result path (`<out>/<name>.ours.raw.json`, relative) to the
torchrun worker, which `_launch` starts with cwd=ROOT: the worker wrote to ROOT/<out>/... (or failed),
and the run was reported as failed after it trained. bench_checkpoint.py did the same. --out is now
resolved first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_relative_out_from_another_folder_keeps_the_result(tmp_path):
    rel = f"review_rel_out_{tmp_path.name}/bench"  # does not exist under ROOT, so nothing lands in the repo
    assert not (ROOT / rel).exists()
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--name", "debug_cpu", "--steps", "1",
         "--warmup", "0", "--out", rel],
        cwd=tmp_path, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=150,
    )
    assert not (ROOT / rel.split("/")[0]).exists()
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads((tmp_path / rel / "debug_cpu.json").read_text())
    assert "tokens_per_s_per_device" in result["ours"]
