"""The CUDA RNG state in checkpoints: this process's device only, so a job resumes where a process sees
fewer GPUs (older checkpoints hold one state per visible GPU: this device's is taken). torch.cuda is faked
(one initialised GPU); torch's own RNG functions run unchanged."""

from __future__ import annotations

import random

import pytest
import torch


class _FakeCudaGenerator:
    def __init__(self) -> None:
        self.state: torch.Tensor | None = None

    def set_state(self, state: torch.Tensor) -> None:
        self.state = state


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, n_devices: int) -> list[_FakeCudaGenerator]:
    """A CUDA build with `n_devices` visible GPUs, already initialised, as far as torch.cuda's RNG
    functions can tell (torch's own set_rng_state / set_rng_state_all code runs unchanged)."""
    import torch.cuda.random as cuda_random

    gens = [_FakeCudaGenerator() for _ in range(n_devices)]
    for module in (torch.cuda, cuda_random):
        monkeypatch.setattr(module, "is_initialized", lambda: True)
        monkeypatch.setattr(module, "device_count", lambda: n_devices)
        monkeypatch.setattr(module, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "default_generators", tuple(gens))
    return gens


def test_resume_rng_state_saved_with_more_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchtitan_like.components.checkpoint import set_rng_state

    gens = _fake_cuda(monkeypatch, n_devices=1)
    # What rng_state() (torch.cuda.get_rng_state_all()) recorded on a rank of an 8-GPU node: one state
    # per visible GPU. The job now resumes on a node (or CUDA_VISIBLE_DEVICES) with one GPU, e.g. a
    # different layout, which the checkpoint docs promise to resume under.
    saved = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": saved}
    set_rng_state(state)  # today: IndexError (tuple index out of range) from torch.cuda.default_generators[1]
    assert gens[0].state is not None


def test_the_cuda_rng_state_saved_is_this_process_devices_and_comes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchtitan_like.components.checkpoint import rng_state, set_rng_state

    gens = _fake_cuda(monkeypatch, n_devices=1)
    mine = torch.full((16,), 7, dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": mine)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saved every visible GPU's state"))
    state = rng_state()
    assert state["cuda"] is mine
    set_rng_state(state)
    assert torch.equal(gens[0].state, mine)
