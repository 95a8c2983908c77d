"""CPU offload on a GPU job (parameters materialized on the CPU, a gloo backend beside NCCL for their
gradients), checked without a GPU; and tensor_parallel_degree suggestions that the next checks accept
whatever the other degrees are."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_on_ranks
from torchtitan_like.config.schema import Parallelism, Training
from torchtitan_like.distributed.parallel_dims import ParallelDims
from torchtitan_like.errors import ConfigError
from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS

ROOT = Path(__file__).resolve().parents[2]
DEBUG = LLAMA3_FLAVORS["debugmodel"].with_seq_len(64)  # n_heads 16, n_kv_heads 8


def _debug_argv(dump: Path, *overrides: str) -> list[str]:
    return [
        "--job.config_file", str(ROOT / "train_configs" / "debug_model.toml"),
        "--job.dump_folder", str(dump),
        "--training.seq_len", "64",
        "--training.steps", "2",
        "--metrics.no_enable_tensorboard",
        *overrides,
    ]


# ---- CPU offload: parameters must be materialized on the CPU -------------------------------------


class _StopAtMaterialize(Exception):
    pass


def _materialize_device_with_offload(argv: list[str], world_size: int, compute_device: str) -> list[str]:
    """Rank function (one process on a fake process group of `world_size` ranks): run the trainer's
    model build (_build_model_parts) as a job whose compute device is `compute_device`, and return the
    device(s) the model parts are materialized on (`to_empty`); the build stops there, so nothing
    touches the compute device."""
    import torch.distributed as dist
    from torch import nn
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from torchtitan_like.config.loader import load_config
    from torchtitan_like.trainer import Trainer, check_job

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    cfg = load_config(argv)
    checked = check_job(cfg, world_size)
    trainer = Trainer.__new__(Trainer)  # only the model-building part of __init__
    trainer.cfg, trainer.dry_run = cfg, False
    trainer.device = torch.device(compute_device)
    trainer.model_args, trainer.parallel_dims, trainer.pp_plan = checked.model_args, checked.parallel_dims, None
    trainer.parallel_dims.build_mesh("cpu")
    seen: list[str] = []
    original = nn.Module.to_empty

    def spy(self, *, device, recurse=True):
        seen.append(torch.device(device).type)
        raise _StopAtMaterialize

    nn.Module.to_empty = spy
    try:
        trainer._build_model_parts()
    except _StopAtMaterialize:
        pass
    finally:
        nn.Module.to_empty = original
    return seen


def test_cpu_offload_materializes_parameters_on_cpu(tmp_path) -> None:
    """On a GPU job with training.enable_cpu_offload=true, FSDP2 requires the sharded parameters to be
    on the CPU before the first forward (torch 2.13 _fsdp_param_group._validate_cpu_offload_params:
    "FSDP parameters should be materialized on CPU when enabling CPU offloading ... call
    module.to_empty(device="cpu")"). The trainer called `part.to_empty(device=self.device)`, i.e. cuda,
    so every offload run on a GPU failed at its first step; a CPU-only run never sees it because
    there the compute device is the CPU. Here the compute device is "cuda" (never touched: the build
    stops at to_empty) and the test checks where the trainer materializes the parameters."""
    argv = _debug_argv(tmp_path / "run", "--training.enable_cpu_offload", "--training.local_batch_size", "4")
    (seen,) = run_on_ranks(
        _materialize_device_with_offload, world_size=1, tmp_path=tmp_path, args=(argv, 2, "cuda"),
        init_process_group=False,
    )
    assert seen == ["cpu"], f"parameters materialized on {seen} with enable_cpu_offload=true"


def test_without_offload_parameters_go_to_the_compute_device(tmp_path) -> None:
    """Control for the test above: the spy sees the compute device when offload is off."""
    argv = _debug_argv(tmp_path / "run", "--training.local_batch_size", "4")
    (seen,) = run_on_ranks(
        _materialize_device_with_offload, world_size=1, tmp_path=tmp_path, args=(argv, 2, "cuda"),
        init_process_group=False,
    )
    assert seen == ["cuda"]


# ---- suggested TP degrees must be accepted by the next checks -----------------------------------


def _suggested(msg: str) -> list[int]:
    return [int(v) for v in re.findall(r"\d+", msg.split("try ", 1)[1])]


@pytest.mark.parametrize("others", [{"pipeline_parallel_degree": 2}, {"context_parallel_degree": 2},
                                    {"data_parallel_replicate_degree": 2}])
def test_suggested_tp_degrees_fit_the_other_degrees(others: dict) -> None:
    """World 12 with pp (or cp, or dp_replicate) = 2 and tp = 3 (3 does not divide the debug model's 16
    heads): the error says "try 1, 2 or 4", but tp = 4 leaves 12 / (2 x 4) ranks, which from_config
    refuses ("... = 8 does not divide world size 12"). Only degrees dividing 12 / 2 = 6 fit."""
    world = 12
    training = Training(seq_len=64, local_batch_size=1)
    pd = ParallelDims.from_config(Parallelism(tensor_parallel_degree=3, **others), world)
    with pytest.raises(ConfigError) as e:
        pd.validate(model_args=DEBUG, training=training)
    suggested = _suggested(str(e.value))
    assert suggested, str(e.value)
    refused = []
    for tp in suggested:
        try:
            ParallelDims.from_config(Parallelism(tensor_parallel_degree=tp, **others), world).validate(
                model_args=DEBUG, training=training
            )
        except ConfigError as err:
            refused.append((tp, str(err)))
    assert refused == [], f"{e.value}\nrefused: {refused}"


def test_suggested_tp_degrees_name_the_shard_degree_when_it_was_fixed() -> None:
    """With data_parallel_shard_degree given (not -1), no other TP degree fits the world unless the shard
    degree follows: the message says so before its list."""
    p = Parallelism(tensor_parallel_degree=3, data_parallel_shard_degree=2, pipeline_parallel_degree=2)
    pd = ParallelDims.from_config(p, 12)
    with pytest.raises(ConfigError) as e:
        pd.validate(model_args=DEBUG, training=Training(seq_len=64, local_batch_size=1))
    assert "with data_parallel_shard_degree=-1 (it takes what the other degrees leave), try 1 or 2" in str(e.value)
    for tp in _suggested(str(e.value)):
        ParallelDims.from_config(
            Parallelism(tensor_parallel_degree=tp, data_parallel_shard_degree=-1, pipeline_parallel_degree=2), 12
        ).validate(model_args=DEBUG, training=Training(seq_len=64, local_batch_size=1))


@pytest.mark.parametrize("offload, backend", [(False, "nccl"), (True, "cuda:nccl,cpu:gloo")])
def test_cpu_offload_on_gpu_adds_gloo_for_cpu_tensors(monkeypatch, offload: bool, backend: str) -> None:
    """Offloaded gradients are CPU tensors, and clipping reduces their norms over the meshes: the
    process group needs a CPU backend beside NCCL. (init_process_group is recorded, not run.)"""
    import torch.distributed as dist

    from torchtitan_like.distributed import utils

    calls: list[dict] = []
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    assert utils.init_distributed(cpu_backend=offload) == (0, 2)
    assert [c["backend"] for c in calls] == [backend]
