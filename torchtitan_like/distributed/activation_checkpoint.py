"""Activation checkpointing (AC) of the transformer blocks: none, full, selective (per layer or per op), or
a memory budget for the compiler.

Applied after tensor parallel and before torch.compile and FSDP (see parallelize.py): compile then
traces the checkpointed block as one graph, and FSDP wraps the checkpoint wrapper, so a recomputed
forward gathers its parameters through the same FSDP hooks as the first one.

- full: every block keeps only its input; backward recomputes the whole block.
- selective, option N (an integer): every N-th block is fully checkpointed, the others keep
  everything (N = 1 is the same as full).
- selective, option "op": every block runs under an op-level policy
  (`torch.utils.checkpoint.create_selective_checkpoint_contexts`): the outputs of the expensive ops
  (matmuls, attention, the float8 amax reductions, TP's reduce-scatter) are saved, the cheap
  element-wise ops (norms, RoPE, SiLU, casts) are recomputed. Unlike torchtitan, which saves only
  every other matmul, this policy saves every matmul output: less recompute, a little more memory.
- memory_budget: no wrappers; torch.compile's min-cut partitioner saves, in each compiled block,
  activations of a size activation_checkpoint.memory_budget of the way from what recomputing the whole
  block needs (0.0) to what its speed-first default saves (1.0), and recomputes the rest (torchtitan's
  mode of that name; the blocks must be compiled).

Memory saved for backward falls in the order none > selective (layer or op) > full, and with the
budget; the unit test tests/unit/test_activation_checkpoint.py measures both.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from torchtitan_like.config.schema import ActivationCheckpoint
from torchtitan_like.errors import ConfigError
from torchtitan_like.models.llama3.model import Transformer

logger = logging.getLogger(__name__)

_aten = torch.ops.aten

# Ops whose outputs the "op" policy saves. The attention list must name the CPU kernel too: SDPA on
# CPU lowers to _scaled_dot_product_flash_attention_for_cpu, and a list copied from GPU code would
# silently recompute attention there.
OP_SAC_SAVE_LIST: frozenset[Any] = frozenset(
    {
        _aten.mm.default,
        _aten._scaled_mm.default,  # float8 matmul (torchao dispatches to it)
        _aten._scaled_dot_product_flash_attention_for_cpu.default,
        _aten._scaled_dot_product_flash_attention.default,
        _aten._scaled_dot_product_efficient_attention.default,
        _aten._scaled_dot_product_cudnn_attention.default,
        _aten._scaled_dot_product_fused_attention_overrideable.default,
        torch.ops.higher_order.flex_attention,  # model.attn_type = "flex"
        # float8: the amax of max(abs(x)) (tensorwise) or amax(abs(x), dim) (rowwise) gives the dynamic
        # scale; these small reductions are saved, the full-size abs(x) feeding them is not (saving it
        # kept a copy of every float8 linear's input: more memory than no checkpointing at all).
        _aten.max.default,
        _aten.amax.default,
        # Tensor parallel: recomputing a collective costs communication, not just FLOPs.
        torch.ops._c10d_functional.reduce_scatter_tensor.default,
    }
)


def check_memory_budget(ac: ActivationCheckpoint, compile_config: Any) -> None:
    """mode = "memory_budget" is a setting of torch.compile's partitioner: it needs the blocks compiled by a
    backend that partitions with it (inductor, aot_eager), and a budget in [0, 1]."""
    if not 0.0 <= ac.memory_budget <= 1.0:
        raise ConfigError(
            f"activation_checkpoint.memory_budget={ac.memory_budget} must be between 0.0 (recompute the most) and "
            "1.0 (keep what the compiler keeps by default)"
        )
    if ac.mode != "memory_budget":
        return
    c = compile_config
    if not (c.enable and "model" in c.components and c.backend in ("inductor", "aot_eager")):
        why = ("compile.enable=false" if not c.enable else f"compile.components={c.components!r} has no \"model\""
               if "model" not in c.components else f"compile.backend={c.backend!r} does not partition the graph")
        raise ConfigError(
            f"activation_checkpoint.mode=\"memory_budget\" is carried out by torch.compile's partitioner in each "
            f"compiled block, but {why}: set compile.enable=true with \"model\" in compile.components and the "
            "inductor (or aot_eager) backend, or use mode = \"selective\" or \"full\""
        )


@contextlib.contextmanager
def memory_budget_context(ac: ActivationCheckpoint) -> Iterator[None]:
    """While open: torch.compile's partitioner keeps activations within ac.memory_budget (mode
    "memory_budget"), in every graph it compiles then. A process-wide torch setting, hence a context,
    which Trainer.train() holds (every compile happens there) and which restores the previous value."""
    if ac.mode != "memory_budget":
        yield
        return
    import torch._functorch.config as functorch_config

    with functorch_config.patch(activation_memory_budget=ac.memory_budget):
        yield


def parse_selective_option(option: str) -> int | None:
    """activation_checkpoint.selective_ac_option as N (every N-th block) or None for "op"."""
    if option.strip() == "op":
        return None
    try:
        n = int(option)
    except ValueError:
        n = 0
    if n < 1 or str(n) != option.strip():
        raise ConfigError(
            f"activation_checkpoint.selective_ac_option={option!r} must be a positive integer N (checkpoint every "
            f'N-th block) or "op" (op-level policy)'
        )
    return n


def _op_policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if func in OP_SAC_SAVE_LIST else CheckpointPolicy.PREFER_RECOMPUTE


def _op_context_fn() -> Any:
    return create_selective_checkpoint_contexts(_op_policy)


def _wrap(block: nn.Module, context_fn: Callable[[], Any] | None = None) -> nn.Module:
    # preserve_rng_state=False: the blocks use no randomness (no dropout), and saving/restoring the
    # RNG state costs a device sync per block.
    kwargs: dict[str, Any] = {"preserve_rng_state": False}
    if context_fn is not None:
        kwargs["context_fn"] = context_fn
    return checkpoint_wrapper(block, **kwargs)


def apply_ac(model: Transformer, ac: ActivationCheckpoint) -> None:
    """Wrap the transformer blocks of `model` in place according to `ac` (mode none does nothing).

    The wrapper adds `_checkpoint_wrapped_module` to parameter names; state dicts (and DCP through
    get_model_state_dict) strip it again, and init_weights seeds by the stripped name.
    """
    if ac.mode == "none":
        return
    if ac.mode == "memory_budget":
        logger.info(
            "activation memory budget %.2f: torch.compile's partitioner chooses what each compiled block saves and "
            "what it recomputes (no checkpoint wrappers)", ac.memory_budget,
        )
        return
    every: int | None = 1
    if ac.mode == "selective":
        every = parse_selective_option(ac.selective_ac_option)
    wrapped = 0
    for layer_id, block in list(model.layers.items()):
        if every is None:
            new = _wrap(block, _op_context_fn)
        elif (int(layer_id) + 1) % every == 0:  # with N = 2: blocks 1, 3, 5, ... (torchtitan's choice)
            new = _wrap(block)
        else:
            continue
        model.layers.register_module(layer_id, new)
        wrapped += 1
    what = "full" if ac.mode == "full" else f"selective ({'op policy' if every is None else f'every {every} blocks'})"
    logger.info("applied %s activation checkpointing to %d of %d blocks", what, wrapped, len(model.layers))
