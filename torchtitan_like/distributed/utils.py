"""Process-group setup, device choice, and the distributed pieces of one training step."""

from __future__ import annotations

import logging
import os
import re
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from torchtitan_like.errors import ConfigError

logger = logging.getLogger(__name__)


_WRAPPER_PARTS = re.compile(r"(_checkpoint_wrapped_module|_orig_mod)\.")


def plain_name(fqn: str) -> str:
    """A parameter's name as checkpoints spell it: without the path parts that the activation
    checkpointing and torch.compile wrappers add (`layers.0._checkpoint_wrapped_module.attention.wq.weight`)."""
    return _WRAPPER_PARTS.sub("", fqn)


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def local_device() -> torch.device:
    """This process's device: GPU LOCAL_RANK, or GPU 0 where each process sees only its own GPU (a
    launcher binding one GPU per process: one visible GPU and CUDA_VISIBLE_DEVICES set, outside torchrun,
    whose workers on a node all inherit its CUDA_VISIBLE_DEVICES). More processes on a node than visible
    GPUs is refused otherwise: two ranks on one GPU fail later inside NCCL ("Duplicate GPU detected") or
    run out of memory."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    visible, local_rank = torch.cuda.device_count(), int(os.environ.get("LOCAL_RANK", 0))
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    # One visible GPU is a per-process binding only where something set CUDA_VISIBLE_DEVICES for this
    # process alone: not torchrun (TORCHELASTIC_RUN_ID), which gives every local worker the same value
    # (its --virtual-local-rank mode does bind one GPU per worker, with LOCAL_RANK 0 for each).
    torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    bound = visible == 1 and devices is not None and not torchrun
    if local_rank >= visible and not bound:
        gpus, processes = ("GPUs", "processes") if visible > 1 else ("GPU", "process")
        shared = ", as every torchrun worker on this node does" if torchrun and devices is not None else ""
        raise ConfigError(
            f"LOCAL_RANK={local_rank}, but this process sees {visible} {gpus} (CUDA_VISIBLE_DEVICES="
            f"{'unset' if devices is None else devices}{shared}): two ranks would share a GPU; start at most {visible} {processes} "
            f"per node (NGPU={visible}), or give each process its own GPU"
        )
    return torch.device("cuda", local_rank % visible)


def init_distributed(*, timeout_s: float = 300.0, cpu_backend: bool = False) -> tuple[int, int]:
    """Join the torchrun job (NCCL on GPU, gloo on CPU); a plain `python` run is a world of one.

    cpu_backend: on GPU, also give every group gloo for CPU tensors ("cuda:nccl,cpu:gloo"), which
    training.enable_cpu_offload needs: its gradients live on the CPU, and clipping reduces their norms
    over the meshes. Returns (rank, world_size).
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ:
        _refuse_tasks_without_torchrun()
        return 0, 1
    backend = ("cuda:nccl,cpu:gloo" if cpu_backend else "nccl") if torch.cuda.is_available() else "gloo"
    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    return dist.get_rank(), dist.get_world_size()


_LAUNCHER_TASK_COUNTS = ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
"""Set by srun / mpirun / a PMI launcher for each of the processes it started."""


def _refuse_tasks_without_torchrun() -> None:
    """A process without RANK is a world of one; one of several tasks a launcher started directly (srun
    with --ntasks > 1 running train.py itself) would train alone, like its siblings, into one dump folder."""
    for var in _LAUNCHER_TASK_COUNTS:
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 1:
            raise ConfigError(
                f"RANK is unset, but this process is one of {value} tasks its launcher started ({var}={value}): "
                "without torchrun each task would train alone, into the same dump folder; start the job through "
                "run_train.sh / torchrun, one per node (tools/slurm_train.sbatch does this under Slurm)"
            )


@torch.no_grad()
def clip_grad_norm_(
    parameters: list[torch.nn.Parameter],
    max_norm: float,
    *,
    norm_type: float = 2.0,
    pp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Clip to the true global gradient norm and return that norm (a plain scalar tensor).

    DTensor grads (FSDP / TP, any mesh) reduce across their own mesh inside `get_total_norm`; the
    result is then made whole with `full_tensor()`. With pipeline parallelism each stage holds only
    its own parameters, so the squared norms are summed across `pp_group` as well.
    `max_norm <= 0` only measures.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:  # (a pipeline stage without gradients still joins the stages' reduction below)
        device = parameters[0].device if parameters else torch.device("cpu")
        total = torch.zeros((), dtype=torch.float32, device=device)
    else:
        total = _total_norm(grads, norm_type)
    if pp_group is not None:
        if norm_type == float("inf"):
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=pp_group)
        else:
            total = total**norm_type
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=pp_group)
            total = total ** (1.0 / norm_type)
    if max_norm > 0 and grads:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total


def _total_norm(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """This rank's gradients' norm, made whole across their meshes (DTensor)."""
    # On CPU, accumulate in float64: torch's CPU fp32 norm kernel (torch 2.13) is off by up to 1.4e-4
    # relative on the debug model's gradients (most of it from the 512k-element output projection),
    # while the smaller shards of a parallel layout come out nearly exact. The clip factor then differs
    # by layout and parallel runs drift away from one process (grad norms 0.2% apart after 18 steps).
    # Only on CPU: the float64 copy costs memory, and GPU norm kernels were not measured to need it.
    upcast = grads[0].device.type == "cpu" and grads[0].dtype != torch.float64
    total = torch.nn.utils.get_total_norm(
        [g.to(torch.float64) for g in grads] if upcast else grads, norm_type=norm_type
    )
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if upcast:
        total = total.to(grads[0].dtype)
    return total


_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def param_dtype(training: Any, device_type: str) -> torch.dtype:
    """The compute dtype of parameters (training.mixed_precision_param): "auto" is bfloat16 on CUDA and
    float32 on CPU, and bfloat16 wherever the parameters are stored in it (training.dtype)."""
    if training.mixed_precision_param == "auto":
        return torch.bfloat16 if device_type == "cuda" or training.dtype == "bfloat16" else torch.float32
    return _DTYPES[training.mixed_precision_param]


def reduce_dtype(mixed_precision_reduce: str) -> torch.dtype:
    return _DTYPES[mixed_precision_reduce]
