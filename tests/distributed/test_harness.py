"""The multi-rank harness: results come back per rank, and a failing or hung rank fails the test."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from harness import run_on_ranks


def _describe(tag: str) -> dict:
    t = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(t)
    return {
        "tag": tag,
        "rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "env": (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]),
        "extra": os.environ.get("HARNESS_TEST_VAR"),
        "threads": torch.get_num_threads(),
        "sum": t.item(),
    }


def _fail_on_rank_1() -> None:
    if dist.get_rank() == 1:
        raise ValueError("boom from rank 1")
    dist.barrier()  # rank 0 waits here until the harness ends it


def _hang() -> None:
    time.sleep(60)


def _segfault_on_rank_1() -> None:
    if dist.get_rank() == 1:
        import ctypes

        ctypes.string_at(0)  # reads address 0: SIGSEGV
    dist.barrier()


def test_results_per_rank(tmp_path) -> None:
    out = run_on_ranks(
        _describe, world_size=3, tmp_path=tmp_path, args=("x",), env={"HARNESS_TEST_VAR": "on"}
    )
    assert [o["rank"] for o in out] == [0, 1, 2]
    for r, o in enumerate(out):
        assert o == {
            "tag": "x", "rank": r, "world": 3, "env": (str(r), str(r), "3"), "extra": "on", "threads": 1, "sum": 6.0,
        }


def test_a_failing_rank_fails_the_test_with_its_traceback(tmp_path) -> None:
    with pytest.raises(pytest.fail.Exception) as e:
        run_on_ranks(_fail_on_rank_1, world_size=2, tmp_path=tmp_path, timeout_s=60)
    assert "--- rank 1 ---" in str(e.value)
    assert "ValueError: boom from rank 1" in str(e.value)


def test_a_hung_rank_fails_the_test_after_the_timeout(tmp_path) -> None:
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="timed out after 3 s"):
        run_on_ranks(_hang, world_size=2, tmp_path=tmp_path, timeout_s=3)
    assert time.monotonic() - start < 30


def test_a_native_crash_reports_the_python_stack(tmp_path) -> None:
    with pytest.raises(pytest.fail.Exception) as e:
        run_on_ranks(_segfault_on_rank_1, world_size=2, tmp_path=tmp_path, timeout_s=60)
    report = str(e.value)
    assert "signal SIGSEGV" in report and "--- rank 1: native crash ---" in report
    assert "Fatal Python error: Segmentation fault" in report and "in _segfault_on_rank_1" in report
