"""A resumed run profiles the same steps as a fresh one, also when it resumes just before a capture.

maybe_enable_profiling once set `prof.step_num = global_step` *after* torch.profiler.profile had
entered, but the profiler computed the action of the first step (schedule(0)) on entry, so the first
step of a resumed run ran under the action of step 1 of a fresh run: a run resumed from a pre-emption
checkpoint at step 5 (profile_freq 3, warm-up 1, active 1) lost the step-6 trace. The schedule is now
shifted by the resumed step. README / module docstring: "Step numbers are absolute, so a resumed run
profiles the same steps".
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from torchtitan_like.components.profiling import maybe_enable_profiling
from torchtitan_like.config.schema import Profiling

CFG = Profiling(enable_profiling=True, profile_freq=3, profiler_warmup=1, profiler_active=1)


def _captured(folder: Path, *, resumed_at: int, last_step: int) -> list[str]:
    with maybe_enable_profiling(CFG, dump_folder=str(folder), rank=0, device=torch.device("cpu"), global_step=resumed_at) as prof:
        for _ in range(last_step - resumed_at):  # steps resumed_at+1 .. last_step
            torch.ones(8) @ torch.ones(8)
            prof.step()
    return sorted(p.parent.name for p in (folder / "profile_traces").rglob("rank0_trace.json"))


def test_a_fresh_run_captures_every_third_step(tmp_path):
    assert _captured(tmp_path, resumed_at=0, last_step=9) == ["iteration_3", "iteration_6", "iteration_9"]


def test_resumed_right_before_a_capture_still_captures_it(tmp_path):
    # Resumed after step 5 (e.g. a pre-emption save): step 6 is a capture step of the fresh run.
    assert _captured(tmp_path, resumed_at=5, last_step=9) == ["iteration_6", "iteration_9"]  # observed: ["iteration_9"]
