"""Shared by every test: one CPU thread per process, the root-logger fixture, and the xdist grouping."""

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

import torch  # noqa: E402

# The env var only applies if torch was not imported yet; tiny matmuls on 2 busy cores run ~100x
# slower with two OpenMP threads than with one.
torch.set_num_threads(1)


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    """For tests that call train.main(), which reconfigures the root logger (force=True): put it back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


MULTIPROCESS = (
    "distributed",
    "integration/test_multinode.py",
    "integration/test_preemption.py",
    "integration/test_run_train_parallel.py",
    "integration/test_step_check_run.py",
)
"""Tests (folders or files under tests/) that each run a world of 2-8 ranks: on CI's 2 cores they run one
at a time. Single-process ones, and those of 2 ranks that finish in seconds, may run beside them."""


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `pytest -n 2 --dist loadgroup` (the README's command), every test in MULTIPROCESS goes to one
    xdist worker, in order, as in a serial run; the other worker runs the rest beside them, most of
    which use one core (torch.set_num_threads(1) above) and would otherwise leave the second core idle.
    Without xdist the marker does nothing."""
    tests = Path(__file__).parent
    for item in items:
        path = item.path.relative_to(tests).as_posix()
        if any(path == p or path.startswith(p + "/") for p in MULTIPROCESS):
            item.add_marker(pytest.mark.xdist_group("multiprocess"))
