"""The step check end to end: `COMM_MODE=fake_backend DRY_RUN_STEP_CHECK=1 ./run_train.sh` dry-runs the job,
then trains it shrunk on CPU processes: two steps, then a resume and a third step.

The case is FSDP x TP with inductor-compiled blocks and checkpoints, in an empty compile cache: the first
launch fills the cache, and the resumed launch loads from it. torch 2.13 keys that cache without the
process group that compiled TP collectives name, so the resume once failed on the ranks of the second TP
group ("Could not resolve the process group registered under the name 3"); any second run on a node did.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_fsdp_tp_compiled_job_passes_the_step_check_with_a_resume_from_a_warm_compile_cache(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable, COMM_MODE="fake_backend", NGPU="4", DRY_RUN_STEP_CHECK="1",
               DRY_RUN_DEVICE="cpu", CONFIG_FILE="train_configs/debug_model.toml",
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    for key in ("NNODES", "DRY_RUN_RANK", "DRY_RUN_JSON", "DRY_RUN_STEP_CHECK_RANKS", "TORCH_COMPILE_CACHE_KEY_TAG"):
        env.pop(key, None)
    args = [
        "--job.dump_folder", str(tmp_path / "job"),
        "--parallelism.tensor_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "2",
        # The loss alone compiled (with inductor, whose caches are at stake): loss parallel's all-reduces are
        # the compiled collectives here, and eager blocks keep the test short.
        "--compile.enable", "--compile.components", "loss",
        "--checkpoint.enable", "--checkpoint.interval", "100",
    ]
    r = subprocess.run([str(ROOT / "run_train.sh"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "dry run OK" in out
    line = next(x for x in out.splitlines() if "step check passed" in x)
    assert "4 CPU rank(s) (dp_shard 2, tp 2)" in line and "compile loss (inductor)" in line, line
    assert "checkpoint save (sync) + resume" in line, line
    # The rehearsal wrote only into its own temporary folder, and removed it after passing.
    assert not (tmp_path / "job").exists()
    assert not list((tmp_path / "tmp").glob("torchtitan_like_step_check_*"))
    # Both launches compiled with inductor: the cache the resume read from is there.
    assert any((tmp_path / "inductor").rglob("*.py"))
