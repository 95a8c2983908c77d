"""Tensor parallel (Megatron-style) with sequence parallel and optional loss parallel, for Llama 3.

Linear layers are split column-wise (wq/wk/wv, w1/w3, output) or row-wise (wo, w2); between blocks
the activations are sharded on the sequence dim (Shard(1)), and the norms run on those shards
(SequenceParallel). Attention heads, query and KV alike, are split across TP ranks: KV heads are
not replicated, so TP must divide n_kv_heads (ParallelDims.validate checks it).

The residual stream stays a DTensor (Shard(1)) from the embedding to the final norm: the model reads
`h.shape[1]` as the sequence length to slice its RoPE table, and a DTensor reports the global
length where a local shard would report seqlen / tp.

With float8 tensorwise (`float8=True`) on CUDA, the block linears that the float8 converter swapped
use torchao's float8-aware styles: the activations are cast to float8 before the sequence
all-gather (half the bytes), once per attention / feed-forward input. Linears the filter kept in
high precision, every linear under the rowwise recipes (torchao has no rowwise TP styles), and
every linear on CPU (gloo cannot all-gather float8) use the plain styles.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from torchtitan_like.models.llama3.model import Transformer, TransformerBlock

logger = logging.getLogger(__name__)


def _settle_embedding_output(module: nn.Module, inputs: object, output: DTensor) -> DTensor:
    """Give block 0 the same kind of input as every other block, so the compiled blocks keep one graph.

    The embedding's output comes out of the reduce-scatter's autograd function: its local tensor is an
    AsyncCollectiveTensor that requires grad, where every later block gets a compiled block's output,
    whose local tensor is plain and does not (autograd is on the DTensor). The compiled blocks' guards
    tell the two apart, so block 0 compiled a second graph: double the compile time and a recompile
    warning on every TP run. A DTensor op (clone, below autograd) waits for the collective and yields
    the second kind. Block 0 needs the result first thing anyway: no overlap is lost.
    """
    return output.clone()  # (bs, seqlen / tp, dim) per rank


def _settle_stage_input(module: nn.Module, args: tuple) -> tuple:
    """The same for a pipeline stage's first block: its input is the received activation made a DTensor
    by PrepareModuleInput (from_local, whose local tensor requires grad)."""
    h, *rest = args
    return (h.clone() if isinstance(h, DTensor) else h, *rest)


def _settle_stage_output(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
    """A pipeline stage's output leaves as a tensor of its own, not the view of the DTensor's local shard
    that `to_local()` returns: the zero-bubble schedules free a stage's output graph after the input
    backward with an in-place `detach_()`, which autograd refuses on a view ("Can't detach views
    in-place"). Nothing is saved for the copy's backward, so the shard it copies is not kept alive."""
    return output.clone() if output._is_view() else output


def apply_tp(
    model: Transformer,
    tp_mesh: DeviceMesh,
    *,
    loss_parallel: bool,
    async_tp: bool,
    float8: bool = False,
    device_type: str | None = None,
) -> None:
    """Shard `model` (on any device, meta included) over `tp_mesh`, in place.

    loss_parallel: the output projection keeps its logits sharded on vocab, as a DTensor
    (Shard(-1)); the caller computes the loss inside `torch.distributed.tensor.parallel.loss_parallel()`.
    Otherwise the logits are gathered into a plain tensor.
    float8: the model was converted with the float8 tensorwise recipe (float8-aware styles).
    device_type: the job's device type (default: the mesh's). A dry run of a CUDA job on a machine
    without GPUs builds its mesh on the CPU but must still apply the styles the job will run.
    async_tp: overlap the TP collectives with the matmuls (an inductor pass over the compiled blocks;
    config validation made sure compile is on, parallelize that the device is CUDA).
    """
    tied = model.args.tie_word_embeddings and model.tok_embeddings is not None and model.output is not None
    float8_note = ""
    device_type = device_type or tp_mesh.device_type
    if float8 and device_type != "cuda":
        # gloo has no float8 dtypes: all-gathering float8 activations fails with "Invalid scalar
        # type" (torch 2.13). The plain styles gather in high precision instead; the Float8Linear
        # layers still compute in float8, with the same tensorwise scale (amax of the whole input).
        float8 = False
        float8_note = f", float8 styles off on {device_type} (gloo cannot all-gather float8)"

    top: dict[str, ParallelStyle] = {}
    if model.tok_embeddings is not None:
        # Vocab-sharded table; the partial sums are reduce-scattered onto sequence shards.
        top["tok_embeddings"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False
        )
    if model.norm is not None:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        top["output"] = ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    parallelize_module(model, tp_mesh, top)
    if model.tok_embeddings is not None:
        model.tok_embeddings.register_forward_hook(_settle_embedding_output)
    # A pipeline stage passes plain local tensors to its neighbours (P2P sends whole tensors): the
    # hidden states arrive as this rank's sequence shard and leave the same way.
    if model.tok_embeddings is None:
        parallelize_module(
            model, tp_mesh,
            PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),), use_local_output=False),
        )
        model.register_forward_pre_hook(_settle_stage_input)  # runs after PrepareModuleInput's hook
    if model.output is None:
        parallelize_module(
            model, tp_mesh,
            PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Shard(1), use_local_output=True),
        )
        model.register_forward_hook(_settle_stage_output)  # runs after PrepareModuleOutput's hook
    if tied:
        # parallelize_module made a separate DTensor parameter for each module; both are
        # Shard(0) over the vocab (row-wise embedding, column-wise output), so they can be one again.
        assert model.output.weight.placements == model.tok_embeddings.weight.placements  # type: ignore[union-attr]
        model.output.weight = model.tok_embeddings.weight  # type: ignore[union-attr]

    f8_blocks = 0
    for block in model.layers.values():
        plan = _block_plan(block, float8=float8)
        f8_blocks += any(type(style).__name__.startswith(("Float8", "PrepareFloat8")) for style in plan.values())
        parallelize_module(block, tp_mesh, plan)

    if async_tp:
        import torch._inductor.config as inductor_config
        from torch.distributed._symmetric_memory import enable_symm_mem_for_group

        # Inductor's micro-pipeline TP pass rewrites all-gather + matmul (and matmul + reduce-scatter)
        # in the compiled blocks into overlapped symmetric-memory ops over this group.
        inductor_config._micro_pipeline_tp = True
        # torch 2.11-2.13 mark this call deprecated ("no need to call this function anymore"), yet
        # the pass still skips every group for which is_symm_mem_enabled_for_group() is false, and
        # only this call makes it true: without it async TP would silently do nothing.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*enable_symm_mem_for_group.*deprecated", category=FutureWarning)
            enable_symm_mem_for_group(tp_mesh.get_group().group_name)

    logger.info(
        "applied tensor parallel (degree %d, sequence parallel, loss parallel %s%s%s%s%s)",
        tp_mesh.size(),
        "on" if loss_parallel else "off",
        ", tied embeddings" if tied else "",
        f", float8 styles in {f8_blocks} of {len(model.layers)} blocks" if float8 else "",
        float8_note,
        ", async TP" if async_tp else "",
    )


def _block_plan(block: TransformerBlock, *, float8: bool) -> dict[str, ParallelStyle]:
    """The TP plan of one block; float8-aware styles for the linears the float8 converter swapped."""
    colwise, rowwise, prepare_input = ColwiseParallel, RowwiseParallel, PrepareModuleInput
    f8: set[str] = set()
    if float8:
        from torchao.float8.float8_linear import Float8Linear
        from torchao.float8.float8_tensor_parallel import (
            Float8ColwiseParallel,
            Float8RowwiseParallel,
            PrepareFloat8ModuleInput,
        )

        f8 = {name for name, m in block.named_modules() if isinstance(m, Float8Linear)}

    def col(name: str) -> ParallelStyle:
        return (Float8ColwiseParallel if name in f8 else colwise)()

    def row(name: str) -> ParallelStyle:
        return (Float8RowwiseParallel if name in f8 else rowwise)(output_layouts=Shard(1), use_local_output=False)

    def prepare(module: str, consumers: tuple[str, ...], **layouts: object) -> ParallelStyle:
        # Cast to float8 before the all-gather only if every consumer of the gathered input is float8.
        if all(f"{module}.{c}" in f8 for c in consumers):
            return PrepareFloat8ModuleInput(**layouts, fwd_config_submodule_fqn=consumers[0])
        return prepare_input(**layouts)

    return {
        "attention_norm": SequenceParallel(),
        # x: sequence shards -> whole sequence; freqs_cis (whole, replicated) passes through as is.
        "attention": prepare(
            "attention", ("wq", "wk", "wv"), input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)
        ),
        "attention.wq": col("attention.wq"),
        "attention.wk": col("attention.wk"),
        "attention.wv": col("attention.wv"),
        "attention.wo": row("attention.wo"),
        "ffn_norm": SequenceParallel(),
        "feed_forward": prepare(
            "feed_forward", ("w1", "w3"), input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
        ),
        "feed_forward.w1": col("feed_forward.w1"),
        "feed_forward.w2": row("feed_forward.w2"),
        "feed_forward.w3": col("feed_forward.w3"),
    }


def match_grad_placements(model: nn.Module) -> int:
    """Keep every TP parameter's gradient in its parameter's layout; returns how many parameters got
    the hook. For TP without data parallelism only: FSDP and replicate (DDP) manage the gradients of
    the parameters they wrap themselves. Call after the model is materialized (`to_empty` swaps the
    parameter tensors and drops their hooks).

    Two gradients come back from backward in another layout than their parameter's:
    - the vocab-sharded embedding's is a Replicate DTensor (torch 2.13): the whole vocab x dim table on
      every TP rank until the optimizer step (2 GiB in fp32 for Llama 3 8B). Slicing it to the Shard
      placement is local, no communication.
    - the replicated norm weights' (sequence parallel) are Partial(sum): each TP rank holds its share
      of the sum. The optimizer and the clip then work on an unreduced gradient. torch 2.13 reduces
      it inside each op; torch 2.11's `clip_grads_with_norm_` leaves a Partial gradient unscaled
      (checked: a Partial gradient of norm 6 still has norm 6 after clipping to 1), so the debug
      model's tp2 norm weights trained with 11% too large gradients from the first clipped step.
      One all-reduce per norm weight here gives every later op a plain Replicate gradient.
    The hook runs after each accumulation, so with gradient accumulation a later microbatch's Partial
    gradient is summed into an already Replicate one (DTensor reduces it) and stays Replicate.
    """
    count = 0
    for p in model.parameters():
        if isinstance(p, DTensor):
            p.register_post_accumulate_grad_hook(_match_grad_placements)
            count += 1
    return count


def settle_grad_placements(parts: list[nn.Module]) -> None:
    """What match_grad_placements' hook does, for gradients written without autograd's accumulation: a
    zero-bubble pipeline schedule's weight backward computes the weights' gradients itself and assigns
    or adds them to `.grad` (torch.distributed.pipelining), so no post-accumulate hook runs and the
    norm weights' gradients stayed Partial. Call after the backward, before the clip."""
    for part in parts:
        for p in part.parameters():
            _match_grad_placements(p)


def _match_grad_placements(p: torch.Tensor) -> None:
    g = p.grad
    if isinstance(g, DTensor) and g.placements != p.placements:
        p.grad = g.redistribute(p.device_mesh, p.placements)
