"""[profiling]: torch.profiler traces per rank and step; memory snapshots need a GPU (and say so)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from torchtitan_like.config.loader import load_config
from torchtitan_like.errors import ConfigError
from torchtitan_like.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


def argv(dump: Path, *overrides: str) -> list[str]:
    return [
        "--job.config_file", str(ROOT / "train_configs/debug_model.toml"),
        "--job.dump_folder", str(dump),
        "--training.seq_len", "32",
        "--training.local_batch_size", "2",
        "--training.steps", "4",
        "--metrics.no_enable_tensorboard",
        *overrides,
    ]


def test_traces_are_written_per_rank_under_the_captured_step(tmp_path):
    trainer = Trainer(load_config(argv(
        tmp_path, "--profiling.enable_profiling", "--profiling.profile_freq", "2",
        "--profiling.profiler_warmup", "1", "--profiling.profiler_active", "1",
    )))
    try:
        trainer.train()
    finally:
        trainer.close()
    folder = tmp_path / "profile_traces"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.json")) == [
        "iteration_2/rank0_trace.json",
        "iteration_4/rank0_trace.json",
    ]
    trace = json.loads((folder / "iteration_4" / "rank0_trace.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert "aten::mm" in names and "AddBackward0" in names  # forward and backward of the recorded step


def test_a_resumed_run_profiles_the_same_steps(tmp_path):
    from torchtitan_like.components.profiling import maybe_enable_profiling
    from torchtitan_like.config.schema import Profiling

    cfg = Profiling(enable_profiling=True, profile_freq=3, profiler_warmup=1, profiler_active=1)
    with maybe_enable_profiling(cfg, dump_folder=str(tmp_path), rank=5, device=torch.device("cpu"), global_step=4) as prof:
        for _ in range(5):  # steps 5..9 of a run resumed at step 4
            torch.ones(8) @ torch.ones(8)
            prof.step()
    assert sorted(p.parent.name for p in (tmp_path / "profile_traces").rglob("rank5_trace.json")) == [
        "iteration_6", "iteration_9",
    ]


def test_a_run_that_ends_during_a_captures_warm_up_names_the_step_it_would_have_captured(tmp_path, caplog):
    """Steps 5..8 of a run resumed at step 4, capturing every 3rd step after a warm-up step: step 6 is
    traced, step 8 is the warm-up of step 9's capture, which never runs (the message named step 8)."""
    import logging

    from torchtitan_like.components.profiling import maybe_enable_profiling
    from torchtitan_like.config.schema import Profiling

    cfg = Profiling(enable_profiling=True, profile_freq=3, profiler_warmup=1, profiler_active=1)
    with caplog.at_level(logging.INFO, logger="torchtitan_like.components.profiling"):
        with maybe_enable_profiling(cfg, dump_folder=str(tmp_path), rank=0, device=torch.device("cpu"),
                                    global_step=4) as prof:
            for _ in range(4):
                torch.ones(8) @ torch.ones(8)
                prof.step()
    assert [p.parent.name for p in (tmp_path / "profile_traces").rglob("rank0_trace.json")] == ["iteration_6"]
    assert "profiler: the run ended before the capture at step 9; no trace" in caplog.text


def test_profile_freq_must_hold_warmup_and_active(tmp_path):
    with pytest.raises(ConfigError, match=r"profiling.profile_freq=3 must be >= profiler_warmup\(3\) \+ profiler_active\(1\)"):
        load_config(argv(tmp_path, "--profiling.enable_profiling", "--profiling.profile_freq", "3"))


@pytest.mark.parametrize(
    "key, value, rule",
    [
        ("profiling.profile_freq", "0", ">= 1"),
        ("profiling.profiler_active", "0", ">= 1"),
        ("profiling.profiler_warmup", "-1", ">= 0"),
    ],
)
def test_profiling_ranges(tmp_path, key, value, rule):
    with pytest.raises(ConfigError, match=rf"{key}={value} is out of range: must be {rule}"):
        load_config(argv(tmp_path, f"--{key}", value))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal; the GPU path is the next test")
def test_memory_snapshot_on_cpu_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="profiling.enable_memory_snapshot=true records CUDA memory snapshots and needs a GPU"):
        Trainer(load_config(argv(tmp_path, "--profiling.enable_memory_snapshot")))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA memory snapshots need a GPU")
def test_memory_snapshots_every_profile_freq_steps_on_gpu(tmp_path):
    trainer = Trainer(load_config(argv(
        tmp_path, "--profiling.enable_memory_snapshot", "--profiling.profile_freq", "2",
    )))
    try:
        trainer.train()
    finally:
        trainer.close()
    folder = tmp_path / "memory_snapshot"
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.pickle"))
    assert files == ["iteration_2/rank0_memory_snapshot.pickle", "iteration_4/rank0_memory_snapshot.pickle"]
    snapshot = pickle.loads((folder / files[-1]).read_bytes())
    assert "segments" in snapshot and "device_traces" in snapshot


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA memory snapshots need a GPU")
def test_a_step_that_runs_out_of_gpu_memory_leaves_a_snapshot_and_fails(tmp_path):
    """A real CUDA out-of-memory error inside a train step: the trainer writes the exit snapshot, then re-raises."""
    trainer = Trainer(load_config(argv(
        tmp_path, "--profiling.enable_memory_snapshot", "--profiling.profile_freq", "10",
    )))
    step = trainer.train_step

    def step_then_too_much(batches):
        out = step(batches)
        if trainer.step == 3:
            _, total = torch.cuda.mem_get_info()
            torch.empty(2 * total, dtype=torch.uint8, device=trainer.device)  # twice the device: never fits
        return out

    trainer.train_step = step_then_too_much
    try:
        with pytest.raises(torch.OutOfMemoryError):
            trainer.train()
    finally:
        trainer.close()
    folder = tmp_path / "memory_snapshot"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.pickle")) == [
        "iteration_3_exit/rank0_memory_snapshot.pickle"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA memory snapshots need a GPU")
def test_memory_snapshot_on_out_of_memory(tmp_path):
    from torchtitan_like.components.profiling import MemorySnapshotter

    snap = MemorySnapshotter(str(tmp_path), rank=0, freq=10, global_step=6)
    try:
        snap.step(on_oom=True)
    finally:
        snap.close()
    assert (tmp_path / "iteration_7_exit" / "rank0_memory_snapshot.pickle").exists()
