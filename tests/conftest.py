"""Shared by every test: one CPU thread per process, and the root-logger fixture."""

import logging
from collections.abc import Iterator

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
