"""Shared by every test: one CPU thread per process, the root-logger fixture, and the xdist grouping."""

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import torch  # noqa: E402
from multiprocess_group import ENV, in_group  # noqa: E402

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


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `pytest -n 2 --dist loadgroup` (the README's command), every test of more than 2 ranks (see
    multiprocess_group.py) goes to one xdist worker, in order, as in a serial run; the other worker runs
    the rest beside them, most of which use one core (torch.set_num_threads(1) above) and would otherwise
    leave the second core idle. Without xdist the marker does nothing."""
    for item in items:
        if _grouped(item):
            item.add_marker(pytest.mark.xdist_group("multiprocess"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tell the launch helpers whether this test is in the group (multiprocess_group.require_group)."""
    os.environ[ENV] = "1" if _grouped(item) else "0"


def _grouped(item: pytest.Item) -> bool:
    path = item.path.relative_to(Path(__file__).parent).as_posix()
    return in_group(path, marked=item.get_closest_marker("multiprocess") is not None)
