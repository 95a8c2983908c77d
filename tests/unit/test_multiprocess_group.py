"""tests/multiprocess_group.py: conftest.py tells the launch helpers whether the running test is in the
group of multi-rank tests, and a test outside it that starts more than 2 ranks fails, naming the fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from multiprocess_group import ENV, MAX_BESIDE, MULTIPROCESS, in_group, require_group

TESTS = Path(__file__).resolve().parents[1]


def test_a_unit_test_is_outside_the_group_and_may_not_start_more_than_two_ranks(monkeypatch):
    assert os.environ[ENV] == "0"
    require_group(MAX_BESIDE, "run_on_ranks")  # 2 ranks may run beside the group
    with pytest.raises(AssertionError) as e:
        require_group(4, "run_on_ranks")
    assert str(e.value) == (
        "tests/unit/test_multiprocess_group.py::test_a_unit_test_is_outside_the_group_and_may_not_start_more_"
        "than_two_ranks starts 4 ranks through run_on_ranks, but it is not in the multiprocess group, so under "
        "xdist it could run beside another world of ranks; add its file to MULTIPROCESS in "
        "tests/multiprocess_group.py or mark the test @pytest.mark.multiprocess"
    )
    monkeypatch.delenv(ENV)  # outside pytest (a helper run by hand): no check
    require_group(8, "run_on_ranks")


@pytest.mark.multiprocess
def test_a_marked_test_is_in_the_group_and_may_start_more():
    assert os.environ[ENV] == "1"
    require_group(8, "run_on_ranks")


def test_the_groups_paths_exist_and_match_whole_path_parts():
    for p in MULTIPROCESS:
        assert (TESTS / p).exists(), p
    assert in_group("distributed/test_parity.py", marked=False)
    assert in_group("integration/test_preemption.py", marked=False)
    assert not in_group("distributed_extra/test_x.py", marked=False)
    assert not in_group("integration/test_run_train.py", marked=False)
    assert in_group("unit/test_x.py", marked=True)


def test_the_launch_helpers_refuse_four_ranks_outside_the_group(tmp_path):
    from tests.integration.jobs import RunningJob
    from tests.distributed.harness import run_on_ranks

    with pytest.raises(AssertionError, match="starts 4 ranks through run_on_ranks, but it is not in the"):
        run_on_ranks(print, world_size=4, tmp_path=tmp_path)
    with pytest.raises(AssertionError, match=r"starts 4 ranks through run_train.sh \(NGPU x NNODES\), but"):
        RunningJob(tmp_path / "job.log", [], env={"NNODES": "1:2", "NGPU": "2"})
    assert not (tmp_path / "job.log").exists()  # refused before anything started
