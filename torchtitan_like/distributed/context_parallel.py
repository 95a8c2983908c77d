"""Context parallel (CP): shard the sequence across ranks; attention runs as torch's ring attention.

The mechanism is PyTorch's own `torch.distributed.tensor.experimental.context_parallel`:

- on entry it shards the given buffers (inputs, labels, the RoPE table `model.freqs_cis`) along
  their sequence dims, in place, after the causal load balancer reorders them head-tail: with
  cp ranks the sequence is cut into 2*cp chunks and rank r keeps chunks r and 2*cp-1-r, so every
  rank does the same share of the causal work;
- while inside it, `F.scaled_dot_product_attention` is patched to wrap q/k/v as DTensors sharded on
  the sequence (dim 2 of (bs, heads, seq, head_dim)); DTensor then hands the SDPA kernel op to CP's
  ring attention, which rotates K/V around the cp group ("allgather": one all-gather of K/V;
  "alltoall": a ring of point-to-point permutes), runs the local kernel per block and merges the
  partial outputs by their logsumexp. Backward runs the mirrored ring.

Route chosen for CPU: a shim that registers the CPU kernel with torch's own ring machinery.
torch only maps the CUDA kernels (flash, efficient, cuDNN) to its ring. On CPU, SDPA lowers to
`aten._scaled_dot_product_flash_attention_for_cpu`, which fails under CP with "does not have a
sharding strategy registered" (and forcing the MATH backend fails with "got mixed torch.Tensor and
DTensor"). `enable_cpu_ring_attention` adds that op and its backward to CP's handler table, with a
handler that calls the very same `_templated_ring_attention` / `_templated_ring_attention_backward`
that the CUDA kernels go through, so the load balancer, K/V rotation, block skipping and logsumexp
merge that the CPU tests check are the code that runs on GPU; only the per-block kernel differs.
A hand-written ring attention (the fallback route) would have tested our copy instead of torch's,
so it was not needed. The CPU op differs from the CUDA flash op in its signature
`(q, k, v, dropout_p, is_causal, *, attn_mask, scale) -> (out, logsumexp)` (no cum_seq / philox /
debug-mask outputs) and its backward `(grad_out, q, k, v, out, logsumexp, dropout_p, is_causal, *,
attn_mask, scale) -> (dq, dk, dv)`; logsumexp is (bs, heads, seq) as on CUDA, so the merge is the same.
The handler does not go through DTensor sharding propagation (whose CP rules are version-specific:
fixed Shard(2) rules, then rules installed per context, then single-dim strategies in 2.14): it
unwraps the seq-sharded DTensors itself and wraps the local results as DTensors with the same
placement. The shim is only installed for a CPU mesh; a CUDA mesh uses torch's handlers untouched.
On CPU the handler also makes every K/V exchange complete before the next is issued (torch's backward
keeps two in flight, and two functional collectives in flight on one gloo group corrupt the heap now
and then: `_WaitedRotater`).

Private torch pieces used (all in `torch.distributed.tensor.experimental._context_parallel._attention`;
in older layouts `torch.distributed.tensor.experimental._attention` itself), looked up once and
reported by name with the torch version if missing (`_torch_cp_internals`):
`custom_ops` (the CP op-handler table merged into DTensor's dispatcher while CP is on),
`_templated_ring_attention`, `_templated_ring_attention_backward`, `_cp_options` (the rotate method
and load-balance flag the ring reads, forward and backward), `_RotateMethod`, `set_rotate_method`,
`_create_rotater` (looked up by the ring at call time; the CPU handler swaps it for the span of a call);
plus `DTensor._local_tensor` and `OpOverload._schema` in the handler (stable for years).
Seen with the same names and signatures in torch 2.13.0 (installed; what CI runs), 2.11.0 (the CP
tests pass on it, CPU, both rotate methods) and 2.14.1 (wheel source read). Rotate methods:
"allgather" (torch's default) and "alltoall", in every one of these; `supported_rotate_methods()`
reads them from the installed torch.

Rules the caller must follow:
- the forward AND the backward must run inside the context: the ring backward is dispatched through
  the handlers and reads the rotate method / load-balance flag that the context sets;
- every buffer has the same sequence length, which must be divisible by 2*cp (load balancing) or
  cp (without): the RoPE table is sharded, so `model.max_seq_len` must equal `training.seq_len`;
- attention must be causal SDPA called as `F.scaled_dot_product_attention` (looked up at call time,
  so the patch is seen) with no attn_mask; GQA must be expanded (repeat_kv) before SDPA.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.nn.attention import SDPBackend, sdpa_kernel

from torchtitan_like.errors import ConfigError

logger = logging.getLogger(__name__)

_aten = torch.ops.aten

# The sequence dim of SDPA's (bs, heads, seq, head_dim) inputs: the dim CP's ring attention shards.
_SDPA_SEQ_DIM = 2

# Our config names -> torch's _RotateMethod members; filtered by what the installed torch has.
_ROTATE_METHOD_MEMBERS = {"allgather": "ALL_GATHER", "alltoall": "ALL_TO_ALL"}

_REQUIRED_INTERNALS = (
    "custom_ops",
    "_templated_ring_attention",
    "_templated_ring_attention_backward",
    "_cp_options",
    "_RotateMethod",
    "set_rotate_method",
    "_create_rotater",
)


@functools.cache
def _torch_cp_internals() -> ModuleType:
    """torch's CP attention module, checked for every private name this file uses."""
    module: ModuleType | None = None
    # Newer torch (2.13, 2.14) keeps CP in the _context_parallel package; older releases in _attention.py.
    for name in (
        "torch.distributed.tensor.experimental._context_parallel._attention",
        "torch.distributed.tensor.experimental._attention",
    ):
        try:
            module = __import__(name, fromlist=["_"])
        except ImportError:
            continue
        if hasattr(module, "custom_ops"):
            break
    missing = [n for n in _REQUIRED_INTERNALS if module is None or not hasattr(module, n)]
    if missing:
        raise RuntimeError(
            f"context parallel: torch {torch.__version__} lacks the private CP pieces this trainer "
            f"relies on ({', '.join(missing)} in torch.distributed.tensor.experimental._context_parallel"
            "._attention); supported torch versions are 2.11 to 2.13"
        )
    return module


def supported_rotate_methods() -> tuple[str, ...]:
    """The `parallelism.context_parallel_rotate_method` values the installed torch offers."""
    members = _torch_cp_internals()._RotateMethod.__members__
    return tuple(name for name, member in _ROTATE_METHOD_MEMBERS.items() if member in members)


def set_rotate_method(name: str) -> None:
    """Select how the ring exchanges K/V (process-wide in torch); unknown names raise ConfigError.

    `context_parallel_ctx` sets the method itself for the span of the context; this is for callers
    of torch's `context_parallel` directly.
    """
    _rotate_method_member(name)
    _torch_cp_internals().set_rotate_method(name)


def _rotate_method_member(name: str) -> Any:
    """torch's `_RotateMethod` member for one of our names, or the ConfigError listing the valid ones."""
    valid = supported_rotate_methods()
    if name not in valid:
        raise ConfigError(
            f"parallelism.context_parallel_rotate_method={name!r} is not supported by torch "
            f"{torch.__version__}: use one of {', '.join(repr(v) for v in valid)}"
        )
    return _torch_cp_internals()._RotateMethod[_ROTATE_METHOD_MEMBERS[name]]


def check_cp_supported(*, cp_degree: int, seq_len: int, rope_len: int | None = None, load_balance: bool = True) -> None:
    """Raise ConfigError unless a sequence of `seq_len` tokens can be context-parallel over `cp_degree` ranks.

    Without this check torch silently turns the load balancer off when seq_len % (2 * cp) != 0
    (and shards unevenly without it, which the ring cannot handle).
    """
    if cp_degree < 1:
        raise ConfigError(f"parallelism.context_parallel_degree={cp_degree} must be >= 1")
    unit = 2 * cp_degree if load_balance else cp_degree
    if seq_len % unit:
        rule = (
            f"2 x context_parallel_degree({cp_degree}) = {unit} (the causal load balancer cuts each "
            "sequence into 2 x cp chunks)"
            if load_balance
            else f"context_parallel_degree({cp_degree})"
        )
        raise ConfigError(f"training.seq_len={seq_len} must be divisible by {rule}; try {-(-seq_len // unit) * unit}")
    if rope_len is not None and rope_len != seq_len:
        raise ConfigError(
            f"model.max_seq_len={rope_len} must equal training.seq_len={seq_len} with "
            f"context_parallel_degree={cp_degree}: CP shards the RoPE table along the sequence, so "
            f"it must cover exactly one sequence; set model.max_seq_len = {seq_len}"
        )


def enable_cpu_ring_attention(cp_mesh: DeviceMesh) -> None:
    """Let CP's ring attention drive the CPU SDPA kernel; a no-op unless `cp_mesh` is on CPU. Idempotent.

    Adds `_scaled_dot_product_flash_attention_for_cpu` and its backward to torch's CP handler table,
    which torch merges into DTensor's dispatcher only while a `context_parallel` context is open.
    """
    if cp_mesh.device_type != "cpu":
        return
    cp = _torch_cp_internals()
    handlers = {
        _aten._scaled_dot_product_flash_attention_for_cpu.default: _cpu_flash_ring_handler,
        _aten._scaled_dot_product_flash_attention_for_cpu_backward.default: _cpu_flash_ring_handler,
    }
    if all(cp.custom_ops.get(op) is fn for op, fn in handlers.items()):
        return
    cp.custom_ops.update(handlers)
    logger.info("context parallel: CPU flash-attention kernel registered with torch's ring attention")


def context_parallel_ctx(
    cp_mesh: DeviceMesh,
    *,
    buffers: list[torch.Tensor],
    seq_dims: list[int],
    no_restore_buffers: set[torch.Tensor],
    rotate_method: str,
    load_balance: bool = True,
) -> contextlib.AbstractContextManager[None]:
    """A context that shards `buffers` in place along `seq_dims` and runs SDPA as ring attention.

    Wrap forward and backward in it. Buffers in `no_restore_buffers` (inputs, labels) stay sharded
    on exit; the others (the RoPE table) are restored. Raises ConfigError for an unknown rotate
    method or a sequence length CP cannot split.
    """
    if len(buffers) != len(seq_dims) or not buffers:
        raise ValueError(f"context_parallel_ctx: {len(buffers)} buffers for {len(seq_dims)} seq_dims (need >= 1 each)")
    # Each buffer is sharded in place (resize_ + copy_): two sharing one storage (views of one batch)
    # would overwrite each other's shard.
    storages = [b.untyped_storage().data_ptr() for b in buffers]
    if len(set(storages)) != len(storages):
        raise ValueError("context_parallel_ctx: buffers share storage (views of one tensor); pass copies")
    lengths = [b.shape[d] for b, d in zip(buffers, seq_dims)]
    if len(set(lengths)) != 1:
        shapes = ", ".join(f"{tuple(b.shape)} dim {d}" for b, d in zip(buffers, seq_dims))
        raise ConfigError(
            f"context parallel buffers disagree on the sequence length ({shapes}): model.max_seq_len "
            "must equal training.seq_len, since CP shards the RoPE table too"
        )
    check_cp_supported(cp_degree=cp_mesh.size(), seq_len=lengths[0], load_balance=load_balance)
    return _context_parallel(
        cp_mesh,
        buffers=buffers,
        seq_dims=seq_dims,
        no_restore_buffers=no_restore_buffers,
        rotate_method=_rotate_method_member(rotate_method),
        load_balance=load_balance,
    )


@contextlib.contextmanager
def _context_parallel(
    cp_mesh: DeviceMesh,
    *,
    buffers: list[torch.Tensor],
    seq_dims: list[int],
    no_restore_buffers: set[torch.Tensor],
    rotate_method: Any,
    load_balance: bool,
) -> Iterator[None]:
    from torch.distributed.tensor.experimental import context_parallel

    cp = _torch_cp_internals()
    if cp_mesh.device_type == "cpu":
        enable_cpu_ring_attention(cp_mesh)
        # Pin the CPU flash kernel: the only CPU kernel the ring drives (MATH cannot take DTensors).
        backends = [SDPBackend.FLASH_ATTENTION]
    else:
        # The kernels torch's ring maps on CUDA (torchtitan's choice too).
        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    # torch keeps both settings process-wide in _cp_options and reads them when the context opens
    # (load balancer) and again in every ring forward and backward: set them for this context only.
    # (Assigned directly rather than through torch's set_rotate_method, which logs on every call.)
    saved = (cp._cp_options.rotate_method, cp._cp_options.enable_load_balance)
    try:
        cp._cp_options.rotate_method = rotate_method
        cp._cp_options.enable_load_balance = load_balance
        logger.debug(
            "context parallel: cp=%d, %s, load_balance=%s, %d buffers", cp_mesh.size(), rotate_method.name,
            load_balance, len(buffers),
        )
        with sdpa_kernel(backends), context_parallel(
            cp_mesh, buffers=buffers, buffer_seq_dims=seq_dims, no_restore_buffers=no_restore_buffers
        ):
            yield
    finally:
        cp._cp_options.rotate_method, cp._cp_options.enable_load_balance = saved


# ---- the CPU shim: handler for the CPU flash-attention op under CP -----------------------------


def _cpu_flash_ring_handler(op_call: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """DTensor custom-op handler: the CPU flash kernel (forward or backward) as CP ring attention.

    The mirror of torch's `_sdpa_handler` for the CUDA kernels, minus sharding propagation: every
    tensor argument is a DTensor sharded on the sequence over the 1-D cp mesh, and so is every output.
    """
    bound = _bind(op_call, args, kwargs)
    mesh: DeviceMesh | None = None
    for name, a in bound.items():
        if not isinstance(a, DTensor):
            continue
        if a.device_mesh.ndim != 1 or tuple(a.placements) != (Shard(_SDPA_SEQ_DIM),):
            raise NotImplementedError(
                f"context parallel ring attention on CPU needs {name} sharded as Shard({_SDPA_SEQ_DIM}) on a "
                f"1-D cp mesh, got {a.placements} on a {a.device_mesh.ndim}-D mesh"
            )
        if mesh is not None and a.device_mesh != mesh:
            raise NotImplementedError("context parallel ring attention: arguments on different meshes")
        mesh = a.device_mesh
        bound[name] = a._local_tensor  # inside DTensor dispatch: the plain local shard
    if mesh is None:
        raise AssertionError(f"{op_call} reached the CP handler without DTensor arguments")
    if bound.get("attn_mask") is not None:
        raise NotImplementedError("context parallel ring attention does not support attn_mask (use is_causal=True)")
    cp = _torch_cp_internals()
    common = {"is_causal": bound["is_causal"], "dropout_p": bound["dropout_p"], "scale": bound["scale"]}
    with _one_exchange_in_flight(cp):
        return _cpu_ring(cp, op_call, bound, common, mesh)


def _cpu_ring(
    cp: ModuleType, op_call: torch._ops.OpOverload, bound: dict[str, Any], common: dict[str, Any], mesh: DeviceMesh
) -> tuple[DTensor, ...]:
    if op_call == _aten._scaled_dot_product_flash_attention_for_cpu.default:
        out, lse, *_ = cp._templated_ring_attention(
            mesh.get_group(), _SDPA_SEQ_DIM, _aten._scaled_dot_product_flash_attention_for_cpu,
            query=bound["query"], key=bound["key"], value=bound["value"], **common,
        )
        results: tuple[torch.Tensor, ...] = (out, lse)
    elif op_call == _aten._scaled_dot_product_flash_attention_for_cpu_backward.default:
        grads = cp._templated_ring_attention_backward(
            mesh.get_group(), _SDPA_SEQ_DIM, _aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
            grad_out=bound["grad_out"], grad_out_name="grad_out", query=bound["query"], key=bound["key"],
            value=bound["value"], out=bound["out"], logsumexp=bound["logsumexp"], **common,
        )
        results = tuple(grads[:3])  # (grad_query, grad_key, grad_value)
    else:
        raise AssertionError(f"unexpected op {op_call} in the CPU ring-attention handler")
    return tuple(_wrap_seq_sharded(t, mesh) for t in results)


class _WaitedRotater:
    """One of torch's ring rotaters whose exchange is complete when `exchange_buffers` returns.

    torch's ring backward keeps two exchanges in flight on the cp group at once (the K/V all-gather or
    permute, and the K/V-gradient permute). Two functional collectives in flight on one gloo process
    group corrupt the heap now and then (torch 2.13: "malloc(): unaligned tcache chunk detected",
    SIGABRT or SIGSEGV, in about one 4-rank cp2 x pp2 run of 30; a 4-process script doing nothing but
    two all_gather_single on one gloo group per iteration crashed within 20000 iterations, while the
    same two collectives through the c10d API with async_op=True never did). So on CPU each exchange is
    waited for before the next is issued; the ring's math and order are unchanged (the exchange is only
    completed earlier), and CPU ring attention loses its overlap of the exchange with the block compute.
    """

    def __init__(self, inner: Any):
        self._inner = inner
        self._ready: torch.Tensor | None = None

    def exchange_buffers(self, curr_buffer: torch.Tensor) -> None:
        self._inner.exchange_buffers(curr_buffer)
        # torch's next_buffer() is always the call right after it (per rotater), so taking it now reads
        # the same block: the all-gather rotater picks its chunk by the exchange count, unchanged.
        self._ready = self._inner.next_buffer()

    def next_buffer(self) -> torch.Tensor:
        if self._ready is None:
            raise AssertionError("ring attention: next_buffer() without an exchange_buffers() before it")
        ready, self._ready = self._ready, None
        return ready


@contextlib.contextmanager
def _one_exchange_in_flight(cp: ModuleType) -> Iterator[None]:
    """Make torch's ring attention (called inside) create _WaitedRotater-wrapped rotaters."""
    create = cp._create_rotater

    def create_waited(*args: Any, **kwargs: Any) -> _WaitedRotater:
        return _WaitedRotater(create(*args, **kwargs))

    cp._create_rotater = create_waited
    try:
        yield
    finally:
        cp._create_rotater = create


def _bind(op_call: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The op's arguments by schema name, defaults filled in (dispatch may pass them either way)."""
    bound: dict[str, Any] = {}
    for i, arg in enumerate(op_call._schema.arguments):
        if i < len(args) and not arg.kwarg_only:
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
        else:
            raise AssertionError(f"{op_call}: missing argument {arg.name}")
    return bound


def _wrap_seq_sharded(local: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    # The global shape is the local one times cp on the sequence dim: CP shards evenly (checked on entry).
    with torch.no_grad():
        return DTensor.from_local(local, mesh, [Shard(_SDPA_SEQ_DIM)], run_check=False)


__all__: list[str] = [
    "check_cp_supported",
    "context_parallel_ctx",
    "enable_cpu_ring_attention",
    "set_rotate_method",
    "supported_rotate_methods",
]
