"""Bytes of training state one rank holds: parameters, gradients and optimizer states.

Two ways to the same numbers, tested equal:
- `measured_state_bytes(model_parts)`: from the local shapes of the (D)Tensor parameters of built
  model parts (on any device, meta included: the dry run's path);
- `predicted_state_bytes(...)`: from the model's parameter shapes and the layout alone, without
  building anything (the planner's path, fast enough to score thousands of layouts).

What the trainer keeps, per parameter, in its sharded (local) shape:
- the parameter itself in fp32 (FSDP's mixed precision casts a gathered copy to the compute dtype;
  that copy is transient and counted with the activations' working set, not here);
- its gradient, in the parameter's dtype (FSDP reduces in `mixed_precision_reduce` and casts back);
- Adam(W): exp_avg and exp_avg_sq in the parameter's dtype, plus a float32 `step` scalar per tensor.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any
from dataclasses import dataclass

import torch
from torch import nn

from torchtitan_like.models.llama3.args import TransformerArgs

ADAM_STEP_BYTES = 4
"""torch.optim.Adam(W) keeps `step` as a float32 scalar tensor per parameter."""


@dataclass(frozen=True)
class StateBytes:
    params: int
    grads: int
    optimizer: int
    n_tensors: int
    """Parameter tensors this rank holds (one optimizer `step` each)."""
    n_elements: int
    """Local parameter elements (numel of the local shards)."""

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer

    def as_dict(self) -> dict[str, int]:
        return {"params": self.params, "grads": self.grads, "optimizer": self.optimizer, "total": self.total,
                "n_tensors": self.n_tensors, "n_elements": self.n_elements}


def state_from_local(shapes: Iterable[tuple[tuple[int, ...], int]]) -> StateBytes:
    """StateBytes from (local shape, element size) per parameter tensor, under Adam(W)."""
    params = n = elements = 0
    for shape, itemsize in shapes:
        numel = math.prod(shape)
        elements += numel
        params += numel * itemsize
        n += 1
    return StateBytes(params=params, grads=params, optimizer=2 * params + ADAM_STEP_BYTES * n, n_tensors=n,
                      n_elements=elements)


def local_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The shape this rank stores: a DTensor's local shard, else the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tuple((p.to_local() if isinstance(p, DTensor) else p).shape)


def measured_state_bytes(model_parts: list[nn.Module]) -> StateBytes:
    """StateBytes of the trainable parameters of built model parts (each tensor counted once)."""
    seen: set[int] = set()
    shapes = []
    for part in model_parts:
        for p in part.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                shapes.append((local_shape(p), p.element_size()))
    return state_from_local(shapes)


# ---- prediction without building ------------------------------------------------------------

# The tensor-parallel plan of distributed/tensor_parallel.py, as the dim each parameter is split on
# (None: replicated). Colwise linears split their weight's output dim (0), rowwise ones the input
# dim (1); the embedding table is split on the vocabulary (0); norms are replicated (sequence
# parallel shards their activations, not their weights). The exact-memory tests hold this table to
# the real plan: a TP plan change that it misses fails them.
_TP_SHARD_DIM = {
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0, "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "feed_forward.w2.weight": 1,
    "tok_embeddings.weight": 0, "output.weight": 0,
}


def tp_shard_dim(param_name: str) -> int | None:
    """The dim tensor parallel splits parameter `param_name` on (None: replicated), from _TP_SHARD_DIM."""
    return next((d for suffix, d in _TP_SHARD_DIM.items() if param_name.endswith(suffix)), None)


MESH_ORDER = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
"""Mesh dims outer to inner, as distributed/parallel_dims.py builds them."""


@functools.lru_cache(maxsize=16)
def param_shapes(model_args: TransformerArgs) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, full shape) of every parameter of the model, from a build on the meta device."""
    from torchtitan_like.models import MODELS

    with torch.device("meta"):
        model = MODELS["llama3"].build(model_args)
    return tuple((name, tuple(p.shape)) for name, p in model.named_parameters())


def chunk_size(n: int, parts: int, index: int) -> int:
    """Length of chunk `index` when torch.chunk splits `n` into `parts` (DTensor Shard and FSDP2 both
    split this way: ceil(n / parts) each, the last ones shorter or empty)."""
    size = -(-n // parts)
    return max(0, min(size, n - index * size))


def rank_coords(rank: int, degrees: dict[str, int]) -> dict[str, int]:
    """Coordinates of global `rank` on the mesh (MESH_ORDER, the last dim varying fastest)."""
    coords = {}
    for name in reversed(MESH_ORDER):
        d = degrees.get(name, 1)
        coords[name] = rank % d
        rank //= d
    return coords


def state_itemsize(training: Any) -> int:
    """Bytes per element of parameters, gradients and optimizer states (training.dtype)."""
    return 2 if training.dtype == "bfloat16" else 4


def predicted_state_bytes(
    model_args: TransformerArgs,
    degrees: dict[str, int],
    *,
    rank: int = 0,
    stage_fqns: list[tuple[str, ...]] | None = None,
    param_itemsize: int = 4,
) -> StateBytes:
    """StateBytes of global `rank` under the layout `degrees` ({"pp", "dp_replicate", "dp_shard",
    "cp", "tp"}), computed from the parameter shapes alone. `stage_fqns`: with pipeline parallel, the
    module names of each stage this rank runs (PipelinePlan.fqns_per_stage of its stage_ids)."""
    c = rank_coords(rank, degrees)
    tp = degrees.get("tp", 1)
    fsdp = degrees.get("dp_shard", 1) * degrees.get("cp", 1)
    fsdp_index = c["dp_shard"] * degrees.get("cp", 1) + c["cp"]  # the flattened dp_shard x cp mesh
    owned = None if stage_fqns is None else tuple(f + "." for fqns in stage_fqns for f in fqns)
    shapes = []
    for name, full in param_shapes(model_args):
        if owned is not None and not name.startswith(owned):
            continue
        shape = list(full)
        if tp > 1:
            dim = tp_shard_dim(name)
            if dim is not None:
                shape[dim] = chunk_size(shape[dim], tp, c["tp"])
        if fsdp > 1:
            shape[0] = chunk_size(shape[0], fsdp, fsdp_index)
        shapes.append((tuple(shape), param_itemsize))
    return state_from_local(shapes)
