"""Which tests run a world of more than 2 ranks, and the check that keeps that list true.

Under `pytest -n 2 --dist loadgroup` (the README's command) conftest.py sends every such test to one
xdist worker, in order, as in a serial run; the other worker runs the rest beside them. Two worlds of
4 ranks at once on CI's 2 cores would risk timeouts. The launch helpers (harness.run_on_ranks and
jobs.RunningJob) call `require_group` before they start more than MAX_BESIDE ranks, so a new test that
forgets the group fails at once, naming the fix, instead of running beside another world.
"""

from __future__ import annotations

import os

MULTIPROCESS = (
    "distributed",
    "integration/test_multinode.py",
    "integration/test_preemption.py",
    "integration/test_run_train_parallel.py",
    "integration/test_step_check_run.py",
)
"""Folders or files under tests/ whose tests each run a world of 2-8 ranks. A single test elsewhere joins
the group with @pytest.mark.multiprocess."""

MAX_BESIDE = 2
"""The most ranks a test outside the group may start (short 2-rank tests may run beside the group)."""

ENV = "TESTS_IN_MULTIPROCESS_GROUP"
"""Set by conftest.py for the test being run: "1" inside the group, "0" outside, unset outside pytest."""


def in_group(path_under_tests: str, marked: bool) -> bool:
    return marked or any(path_under_tests == p or path_under_tests.startswith(p + "/") for p in MULTIPROCESS)


def require_group(ranks: int, launcher: str) -> None:
    """Raise unless the running test may start `ranks` processes (outside pytest: no check)."""
    if ranks > MAX_BESIDE and os.environ.get(ENV) == "0":
        test = os.environ.get("PYTEST_CURRENT_TEST", "this test").rsplit(" ", 1)[0]
        raise AssertionError(
            f"{test} starts {ranks} ranks through {launcher}, but it is not in the multiprocess group, so "
            f"under xdist it could run beside another world of ranks; add its file to MULTIPROCESS in "
            f"tests/multiprocess_group.py or mark the test @pytest.mark.multiprocess"
        )
