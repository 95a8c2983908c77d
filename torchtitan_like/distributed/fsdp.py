"""Data parallelism with FSDP2: fully_shard (FSDP / HSDP) and its replicate-only sibling (DDP).

Gradients are SUMMED over the data-parallel ranks, never averaged: the trainer divides each rank's
token-loss sum by the token count of the whole global batch, so the sum over ranks of the local
gradients is already the gradient of the global mean loss. Each FSDP/replicate module gets
`set_gradient_divide_factor(1.0)` (no division) and `set_force_sum_reduction_for_comms(True)`
(plain ReduceOp.SUM: with factor 1, FSDP would otherwise ask for PREMUL_SUM(1.0), which gloo lacks).

Grouping: one group per transformer block, then [norm, output] together, then the root (which
takes whatever is left: tok_embeddings, and with tied embeddings the output projection too).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from torchtitan_like.models.llama3.model import Transformer

logger = logging.getLogger(__name__)

ReshardPolicy = Literal["default", "always", "never"]


def apply_fsdp(
    model: Transformer,
    dp_mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    reshard_after_forward: ReshardPolicy,
    cpu_offload: bool,
) -> None:
    """fully_shard `model` in place over `dp_mesh`: 1D ("dp_shard_cp") = FSDP, 2D ("dp_replicate",
    "dp_shard_cp") = HSDP (shard inside a replica, all-reduce across replicas).

    reshard_after_forward: "default" frees each block's gathered parameters after its forward but
    keeps [norm, output] and the root gathered (backward needs them first, so freeing them would
    only mean gathering them again at once); "always" / "never" apply to every group.
    """
    mp, mp_inner = _mixed_precision(param_dtype, reduce_dtype)
    offload: OffloadPolicy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    blocks_reshard = reshard_after_forward != "never"
    last_reshard = reshard_after_forward == "always"
    # None lets FSDP decide for the root: it never reshards the root after forward.
    root_reshard = {"default": None, "always": True, "never": False}[reshard_after_forward]

    def shard(module: nn.Module | list[nn.Module], reshard: bool | None, policy: MixedPrecisionPolicy) -> None:
        fully_shard(module, mesh=dp_mesh, mp_policy=policy, offload_policy=offload, reshard_after_forward=reshard)

    for block in model.layers.values():
        shard(block, blocks_reshard, mp_inner)
    last = [m for m in _last_group(model) if m is not None]
    if last:
        shard(last, last_reshard, mp_inner)
    shard(model, root_reshard, mp)
    _sum_gradients(model)
    logger.info(
        "applied %s over %s (param %s, reduce %s, reshard_after_forward=%s%s)",
        "HSDP" if dp_mesh.ndim == 2 else "FSDP",
        dict(zip(dp_mesh.mesh_dim_names or (), dp_mesh.shape)),
        str(param_dtype).removeprefix("torch."),
        str(reduce_dtype).removeprefix("torch."),
        reshard_after_forward,
        ", CPU offload" if cpu_offload else "",
    )


def apply_ddp(model: Transformer, dp_mesh: DeviceMesh, *, param_dtype: torch.dtype, reduce_dtype: torch.dtype) -> None:
    """Replicate `model` in place over the 1D `dp_mesh` (DDP: full parameters on every rank, the
    gradients all-reduced), with the same grouping and mixed precision as FSDP.

    Uses torch's FSDP2-based `replicate` (torch.distributed._composable.replicate_with_fsdp, torch >=
    2.9): it composes with tensor parallel and mixed precision like fully_shard does, unlike
    DistributedDataParallel.
    """
    from torch.distributed._composable.replicate_with_fsdp import replicate

    mp, mp_inner = _mixed_precision(param_dtype, reduce_dtype)
    for block in model.layers.values():
        replicate(block, mesh=dp_mesh, mp_policy=mp_inner)
    last = [m for m in _last_group(model) if m is not None]
    if last:
        replicate(last, mesh=dp_mesh, mp_policy=mp_inner)
    replicate(model, mesh=dp_mesh, mp_policy=mp)
    _sum_gradients(model)
    logger.info(
        "applied DDP (replicate) over %s (param %s, reduce %s)",
        dict(zip(dp_mesh.mesh_dim_names or (), dp_mesh.shape)),
        str(param_dtype).removeprefix("torch."),
        str(reduce_dtype).removeprefix("torch."),
    )


def _mixed_precision(
    param_dtype: torch.dtype, reduce_dtype: torch.dtype
) -> tuple[MixedPrecisionPolicy, MixedPrecisionPolicy]:
    """(root policy, blocks and [norm, output] policy). Only the root casts its floating-point forward
    inputs: a block's inputs are the hidden states, already in `param_dtype` (they come from the
    gathered parameters), and the float32 RoPE table, which casting would round to bf16."""
    root = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    inner = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    return root, inner


def _last_group(model: Transformer) -> list[nn.Module | None]:
    # With tied embeddings the output weight is tok_embeddings' weight, which the root uses first:
    # it must stay in the root's group, so the output projection does too.
    if model.args.tie_word_embeddings:
        return [model.norm]
    return [model.norm, model.output]


def _sum_gradients(model: nn.Module) -> None:
    """Reduce gradients with a plain SUM over the data-parallel ranks (see the module docstring)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
