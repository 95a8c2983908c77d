"""The order of the parallelism passes for Llama 3. This file is where that order lives.

0. (before this file) model converters such as float8 have swapped nn.Linear on the meta model;
1. tensor parallel (+ sequence parallel, loss parallel): it rewrites the Linear/Embedding/Norm
   parameters into DTensors on the "tp" mesh, which the later passes then wrap; float8 tensorwise
   linears get torchao's float8-aware styles;
2. context parallel changes no module: the trainer runs forward and backward inside
   `distributed/context_parallel.py`'s context, which shards the batch and the RoPE table along the
   sequence and turns SDPA into ring attention over the "cp" mesh; FSDP below shards over
   dp_shard x cp, so the cp ranks' partial gradients are summed by its reduce-scatter;
   (the pipeline split happens before this file: with PP it is called once per model part);
3. activation checkpointing: wraps each block, so compile traces the recomputation too;
4. torch.compile per block (fullgraph), on the (checkpoint-wrapped) TP block. Except where a TP
   block is checkpointed whole (full AC, or selective every N blocks): there the block is compiled
   inside its checkpoint wrapper (in place, so its names do not change), because torch 2.13 cannot
   compile a checkpointed DTensor block (its partitioner saves the DeviceMesh for backward among
   the tensors: "expected all tensors_saved_with_vc_check to be Tensors"). The recomputation then
   runs the compiled forward again;
5. data parallel last, because FSDP2 shards whatever parameters it finds (plain or TP DTensors):
   FSDP / HSDP (fully_shard per block, then [norm, output], then the root), or DDP (replicate)
   when the only data-parallel dim is dp_replicate. Its hooks wrap the compiled blocks from outside.

The model arrives on the meta device and leaves on it; the trainer then calls
`model.to_empty(device=...)` and `model.init_weights(seed)` under no_grad.
"""

from __future__ import annotations

import logging

import torch

from torchtitan_like.config.schema import ActivationCheckpoint, Compile, Model as ModelConfig, Parallelism, Training
from torchtitan_like.distributed.activation_checkpoint import apply_ac, parse_selective_option
from torchtitan_like.distributed.compile import apply_compile
from torchtitan_like.distributed.fsdp import apply_ddp, apply_fsdp
from torchtitan_like.distributed.parallel_dims import ParallelDims
from torchtitan_like.distributed.tensor_parallel import apply_tp
from torchtitan_like.distributed.utils import param_dtype, reduce_dtype
from torchtitan_like.errors import ConfigError
from torchtitan_like.models.llama3.model import Transformer

logger = logging.getLogger(__name__)


def check_async_tp_device(parallelism: Parallelism, device_type: str) -> None:
    """Async TP runs on CUDA symmetric memory (the Trainer checks this before building anything)."""
    if parallelism.enable_async_tensor_parallel and device_type != "cuda":
        raise ConfigError(
            f"parallelism.enable_async_tensor_parallel=true needs CUDA (symmetric memory), not {device_type}: "
            "set it to false"
        )


def check_attention_device(model: ModelConfig, device_type: str) -> None:
    """FlexAttention trains on CUDA only: its backward is not implemented on CPU (the Trainer checks this
    before building anything)."""
    if model.attn_type == "flex" and device_type != "cuda":
        raise ConfigError(
            f'model.attn_type="flex" needs CUDA to train (FlexAttention has no backward on {device_type} in torch '
            f'{torch.__version__}): use model.attn_type="sdpa" (block_causal then uses a dense mask)'
        )


def parallelize_llama(
    model: Transformer,
    parallel_dims: ParallelDims,
    *,
    parallelism: Parallelism,
    training: Training,
    device_type: str,
    activation_checkpoint: ActivationCheckpoint | None = None,
    compile_config: Compile | None = None,
    float8_tensorwise: bool = False,
) -> Transformer:
    """Apply TP, AC, compile, then data parallelism to `model` in place (the mesh must be built); returns it.

    float8_tensorwise: the float8 converter swapped the linears with the tensorwise recipe, so TP
    uses torchao's float8-aware styles for them.
    """
    check_async_tp_device(parallelism, device_type)
    if parallel_dims.tp_enabled:
        tp_mesh = parallel_dims.get_mesh("tp")
        assert tp_mesh is not None
        apply_tp(
            model,
            tp_mesh,
            loss_parallel=parallel_dims.loss_parallel_enabled,
            async_tp=parallelism.enable_async_tensor_parallel,
            float8=float8_tensorwise,
            device_type=device_type,
        )

    compile_model = compile_config is not None and compile_config.enable and "model" in compile_config.components
    whole_blocks = activation_checkpoint is not None and (
        activation_checkpoint.mode == "full"
        or (activation_checkpoint.mode == "selective" and parse_selective_option(activation_checkpoint.selective_ac_option))
    )
    if activation_checkpoint is not None:
        apply_ac(model, activation_checkpoint)
    if compile_model:
        assert compile_config is not None
        under_checkpoints = whole_blocks and parallel_dims.tp_enabled
        apply_compile(model, backend=compile_config.backend, under_checkpoints=under_checkpoints)
        if under_checkpoints:
            logger.info("the activation checkpoints wrap the compiled TP blocks (torch cannot compile a checkpointed "
                        "DTensor block: parallelize.py)")

    mp = {
        "param_dtype": param_dtype(training, device_type),
        "reduce_dtype": reduce_dtype(training.mixed_precision_reduce),
    }
    reshard = parallelism.fsdp_reshard_after_forward
    if reshard == "default" and parallel_dims.pp_enabled:
        # Each pipeline microbatch runs the block's forward again: resharding after every one would
        # all-gather the parameters once per microbatch instead of once per step.
        reshard = "never"
    if parallel_dims.fsdp_enabled:
        hsdp = parallel_dims.dp_replicate_enabled
        dp_mesh = parallel_dims.get_mesh("hsdp" if hsdp else "dp_shard_cp")
        assert dp_mesh is not None
        apply_fsdp(
            model,
            dp_mesh,
            **mp,
            reshard_after_forward=reshard,
            cpu_offload=training.enable_cpu_offload,
        )
    elif parallel_dims.dp_replicate_enabled:
        dp_mesh = parallel_dims.get_mesh("dp_replicate")
        assert dp_mesh is not None
        apply_ddp(model, dp_mesh, **mp)
    return model
