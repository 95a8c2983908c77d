"""The order of the parallelism passes for Llama 3. This file is where that order lives.

1. tensor parallel (+ sequence parallel, loss parallel): it rewrites the Linear/Embedding/Norm
   parameters into DTensors on the "tp" mesh, which the later passes then wrap;
2. [later: context parallel, activation checkpointing, torch.compile per block];
3. data parallel last, because FSDP2 shards whatever parameters it finds (plain or TP DTensors):
   FSDP / HSDP (fully_shard per block, then [norm, output], then the root), or DDP (replicate)
   when the only data-parallel dim is dp_replicate.

The model arrives on the meta device and leaves on it; the trainer then calls
`model.to_empty(device=...)` and `model.init_weights(seed)` under no_grad.
"""

from __future__ import annotations

import logging

from torchtitan_like.config.schema import Parallelism, Training
from torchtitan_like.distributed.fsdp import apply_ddp, apply_fsdp
from torchtitan_like.distributed.parallel_dims import ParallelDims
from torchtitan_like.distributed.tensor_parallel import apply_tp
from torchtitan_like.distributed.utils import param_dtype, reduce_dtype
from torchtitan_like.models.llama3.model import Transformer

logger = logging.getLogger(__name__)


def parallelize_llama(
    model: Transformer,
    parallel_dims: ParallelDims,
    *,
    parallelism: Parallelism,
    training: Training,
    device_type: str,
) -> Transformer:
    """Apply TP then data parallelism to `model` in place (the mesh must be built); returns it."""
    if parallel_dims.tp_enabled:
        tp_mesh = parallel_dims.get_mesh("tp")
        assert tp_mesh is not None
        apply_tp(
            model,
            tp_mesh,
            loss_parallel=parallel_dims.loss_parallel_enabled,
            async_tp=parallelism.enable_async_tensor_parallel,
        )

    mp = {
        "param_dtype": param_dtype(training.mixed_precision_param, device_type),
        "reduce_dtype": reduce_dtype(training.mixed_precision_reduce),
    }
    if parallel_dims.fsdp_enabled:
        hsdp = parallel_dims.dp_replicate_enabled
        dp_mesh = parallel_dims.get_mesh("hsdp" if hsdp else "dp_shard_cp")
        assert dp_mesh is not None
        apply_fsdp(
            model,
            dp_mesh,
            **mp,
            reshard_after_forward=parallelism.fsdp_reshard_after_forward,
            cpu_offload=training.enable_cpu_offload,
        )
    elif parallel_dims.dp_replicate_enabled:
        dp_mesh = parallel_dims.get_mesh("dp_replicate")
        assert dp_mesh is not None
        apply_ddp(model, dp_mesh, **mp)
    return model
