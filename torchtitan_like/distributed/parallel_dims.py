"""Parallel degrees of one job, their validation, and the named DeviceMesh built from them.

`ParallelDims.from_config` resolves `data_parallel_shard_degree = -1` and checks the degrees
against the world size; `validate` checks them against the model and the batch, before any model
is built. Both raise `ConfigError` naming the keys and a value that works.

`build_mesh` makes one `init_device_mesh` over the dims whose degree is > 1, in the order
pp, dp_replicate, dp_shard, cp, tp (tp innermost: its ranks are neighbours), plus flattened views:

    "dp"           dp_replicate x dp_shard      the batch is split over it (data loading)
    "dp_shard_cp"  dp_shard x cp                FSDP shards parameters over it
    "dp_cp"        dp_replicate x dp_shard x cp the loss sums and token counts are all-reduced over it

and "hsdp", the 2D (dp_replicate, dp_shard_cp) mesh that fully_shard takes for HSDP. A mesh exists
only when it has more than one rank; `get_mesh(name)` returns None otherwise. When every degree is 1
there is nothing to build and `build_mesh` returns None.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from torchtitan_like.config.schema import Parallelism, Training
from torchtitan_like.config.validate import resolve_global_batch
from torchtitan_like.errors import ConfigError
from torchtitan_like.models.llama3.args import TransformerArgs

logger = logging.getLogger(__name__)

# Outer to inner. TP is innermost so a TP group is made of neighbouring ranks (one node on GPU).
_MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
_FLATTENED = {
    "dp": ("dp_replicate", "dp_shard"),
    "dp_shard_cp": ("dp_shard", "cp"),
    "dp_cp": ("dp_replicate", "dp_shard", "cp"),
}


class _MeshSlot:
    """The one mutable part of ParallelDims: the meshes, set once by build_mesh."""

    def __init__(self) -> None:
        self.built = False
        self.root: DeviceMesh | None = None
        self.meshes: dict[str, DeviceMesh] = {}


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    """Replicas (DDP, or the replicate dim of HSDP)."""
    dp_shard: int
    """FSDP shard degree (resolved: never -1)."""
    cp: int
    """Context parallel degree."""
    tp: int
    """Tensor parallel degree."""
    pp: int
    """Pipeline parallel degree."""
    world_size: int
    """Processes in the job; the degrees above multiply to it."""
    disable_loss_parallel: bool = False
    """parallelism.disable_loss_parallel: with TP, gather the full logits before the loss."""
    dp_shard_auto: bool = True
    """data_parallel_shard_degree was -1 (it follows the other degrees); suggestions for another degree
    hold only while it does."""
    _slot: _MeshSlot = field(default_factory=_MeshSlot, init=False, repr=False, compare=False)

    # ---- construction and validation -------------------------------------------------------

    @classmethod
    def from_config(cls, p: Parallelism, world_size: int) -> ParallelDims:
        """Resolve `data_parallel_shard_degree = -1` and check the degrees against the world size."""
        keys = {
            "data_parallel_replicate_degree": p.data_parallel_replicate_degree,
            "context_parallel_degree": p.context_parallel_degree,
            "tensor_parallel_degree": p.tensor_parallel_degree,
            "pipeline_parallel_degree": p.pipeline_parallel_degree,
            "expert_parallel_degree": p.expert_parallel_degree,
        }
        for key, value in keys.items():
            if value < 1:
                raise ConfigError(f"parallelism.{key}={value} must be >= 1 (1 disables it)")
        if p.expert_parallel_degree != 1:
            raise ConfigError(
                f"parallelism.expert_parallel_degree={p.expert_parallel_degree} is reserved until MoE models "
                "exist: set it to 1"
            )
        if p.enable_async_tensor_parallel and p.tensor_parallel_degree <= 1:
            # The compile.enable part is checked by config/validate.py, the CUDA part by parallelize.
            raise ConfigError(
                f"parallelism.enable_async_tensor_parallel=true needs tensor_parallel_degree > 1 (got "
                f"{p.tensor_parallel_degree}), CUDA and compile.enable=true; set it to false or enable tensor parallel"
            )

        dp_replicate, cp, tp, pp = (
            p.data_parallel_replicate_degree,
            p.context_parallel_degree,
            p.tensor_parallel_degree,
            p.pipeline_parallel_degree,
        )
        others = dp_replicate * cp * tp * pp
        dp_shard = p.data_parallel_shard_degree
        if dp_shard == -1:
            if world_size % others != 0:
                raise ConfigError(
                    f"parallelism: data_parallel_shard_degree=-1 takes what the world size leaves, but "
                    f"{_product_text(p, shard='-1', with_shard=False)} = {others} does not divide world size "
                    f"{world_size} (NGPU); choose degrees whose product divides {world_size}"
                    f"{_divisor_hint(p, world_size)}"
                )
            dp_shard = world_size // others
        elif dp_shard < 1:
            raise ConfigError(
                f"parallelism.data_parallel_shard_degree={dp_shard} must be >= 1, or -1 for what the world "
                "size leaves"
            )
        if others * dp_shard != world_size:
            fix = ("set data_parallel_shard_degree=-1 to take what the others leave" if world_size % others == 0
                   else f"the other degrees multiply to {others}, which does not divide {world_size}: change them"
                        f"{_divisor_hint(p, world_size)}")
            if world_size == 1 and "RANK" not in os.environ:
                fix += (f"; or, for {others * dp_shard} ranks, launch through torchrun: "
                        f"NGPU={others * dp_shard} ./run_train.sh (RANK is unset here, so this is one process)")
            raise ConfigError(
                f"parallelism: {_product_text(p, shard=str(dp_shard), with_shard=True)} = {others * dp_shard} "
                f"!= world size {world_size} (NGPU); the degrees must multiply to the world size ({fix})"
            )
        return cls(
            dp_replicate=dp_replicate,
            dp_shard=dp_shard,
            cp=cp,
            tp=tp,
            pp=pp,
            world_size=world_size,
            disable_loss_parallel=p.disable_loss_parallel,
            dp_shard_auto=p.data_parallel_shard_degree == -1,
        )

    def validate(self, *, model_args: TransformerArgs, training: Training) -> None:
        """Check the degrees against the model shape and the batch; call before building the model."""
        if self.tp > 1:
            n_heads, n_kv = model_args.n_heads, model_args.kv_heads
            if n_heads % self.tp or n_kv % self.tp:
                g = math.gcd(n_heads, n_kv)
                # Degrees that divide the heads, fit the ranks the other degrees leave to dp_shard x tp
                # (from_config's check), the sequence and the global batch (the next checks; dp_shard
                # takes what tp leaves).
                pool = self.world_size // (self.dp_replicate * self.cp * self.pp)
                gbs, lbs = training.global_batch_size, training.local_batch_size
                valid = [d for d in range(1, g + 1) if g % d == 0 and pool % d == 0
                         and (d * self.cp == 1 or training.seq_len % (d * 2 * self.cp) == 0)
                         and (gbs == -1 or gbs % (lbs * self.dp_replicate * (pool // d)) == 0)]
                shard = "" if self.dp_shard_auto else (
                    " with data_parallel_shard_degree=-1 (it takes what the other degrees leave),"
                )
                # (d = 1 always fits without CP and with global_batch_size -1: one of these is set.)
                also = ([f"training.seq_len={training.seq_len} (a multiple of tp x 2 x context_parallel_degree"
                         f"({self.cp}))"] if self.cp > 1 else []) + (
                        [f"training.global_batch_size={gbs} (a multiple of local_batch_size({lbs}) x the "
                         "data-parallel degree the world leaves)"] if gbs != -1 else [])
                fix = f"{shard} try {_or_list(valid)}" if valid else (
                    f" no degree that does also fits {' and '.join(also)}: change those too, or let tools/plan.py "
                    "choose the layout"
                )
                raise ConfigError(
                    f"parallelism.tensor_parallel_degree={self.tp} must divide model n_heads={n_heads} and "
                    f"n_kv_heads={n_kv} (KV heads are sharded, not replicated);{fix}"
                )
        if self.tp > 1 or self.cp > 1:
            unit = self.tp * 2 * self.cp
            if training.seq_len % unit:
                raise ConfigError(
                    f"training.seq_len={training.seq_len} must be divisible by tensor_parallel_degree({self.tp})"
                    f" x 2 x context_parallel_degree({self.cp}) = {unit} (sequence-parallel shards and "
                    f"context-parallel load balancing); try {_round_up(training.seq_len, unit)}"
                )
        if self.cp > 1 and model_args.max_seq_len != training.seq_len:
            raise ConfigError(
                f"model.max_seq_len={model_args.max_seq_len} must equal training.seq_len={training.seq_len} with "
                f"context_parallel_degree={self.cp}: context parallel shards the RoPE table along the sequence "
                f"with the batch, so it must cover exactly one sequence; set model.max_seq_len={training.seq_len} "
                "(or leave it unset)"
            )
        if training.loss_chunk_size and self.loss_parallel_enabled:
            raise ConfigError(
                f"training.loss_chunk_size={training.loss_chunk_size} does not work with loss parallel, which already "
                "keeps the logits sharded on the vocabulary: set it to 0, or set parallelism.disable_loss_parallel=true "
                "to chunk the gathered logits instead"
            )
        resolve_global_batch("training", training.local_batch_size, training.global_batch_size, self.dp_degree)
        if training.enable_cpu_offload and not self.fsdp_enabled:
            raise ConfigError(
                "training.enable_cpu_offload=true needs FSDP (data_parallel_shard_degree x context_parallel_degree > 1); "
                "set it to false or shard the model"
            )

    # ---- degrees ---------------------------------------------------------------------------

    @property
    def dp_degree(self) -> int:
        """Ways the batch is split (dp_replicate x dp_shard); CP ranks share a batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_enabled(self) -> bool:
        return self.dp_degree > 1

    @property
    def dp_replicate_enabled(self) -> bool:
        return self.dp_replicate > 1

    @property
    def fsdp_enabled(self) -> bool:
        """Parameters are sharded (FSDP, or the shard dim of HSDP) over dp_shard x cp."""
        return self.dp_shard * self.cp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def loss_parallel_enabled(self) -> bool:
        """With TP and not disable_loss_parallel: logits stay sharded on vocab (a DTensor)."""
        return self.tp_enabled and not self.disable_loss_parallel

    # ---- mesh ------------------------------------------------------------------------------

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """Create the device mesh (once); None when every degree is 1 (no process group needed)."""
        if self._slot.built:
            raise RuntimeError("ParallelDims.build_mesh() was already called")
        names = [n for n in _MESH_DIMS if self._degree(n) > 1]
        if names:
            if dist.get_world_size() != self.world_size:
                raise RuntimeError(f"world size is {dist.get_world_size()}, ParallelDims says {self.world_size}")
            mesh = init_device_mesh(device_type, tuple(self._degree(n) for n in names), mesh_dim_names=tuple(names))
            self._slot.meshes = {n: mesh[n] for n in names}
            for flat, dims in _FLATTENED.items():
                present = tuple(d for d in dims if d in names)
                # Keep the flattened meshes here: torch deprecates slicing them back out of the root.
                if len(present) == 1:
                    self._slot.meshes[flat] = mesh[present[0]]  # one dim: the same ranks, no new group
                elif present:
                    self._slot.meshes[flat] = mesh[present]._flatten(flat)
            if self.dp_replicate > 1 and self.dp_shard * self.cp > 1:
                # HSDP: fully_shard takes a 2D (replicate, shard) mesh; with CP the shard dim is the
                # flattened dp_shard x cp (sliced from the root by the name _flatten gave it).
                shard_dims = [d for d in ("dp_shard", "cp") if d in names]
                shard = "dp_shard_cp" if len(shard_dims) == 2 else shard_dims[0]
                self._slot.meshes["hsdp"] = mesh[("dp_replicate", shard)]
            self._slot.root = mesh
            logger.info("device mesh %s", dict(zip(names, (self._degree(n) for n in names))))
        self._slot.built = True
        return self._slot.root

    @property
    def mesh(self) -> DeviceMesh | None:
        """The mesh from build_mesh (None when every degree is 1)."""
        if not self._slot.built:
            raise RuntimeError("call ParallelDims.build_mesh() first")
        return self._slot.root

    def get_mesh(self, name: str) -> DeviceMesh | None:
        """A named dim or flattened view ("tp", "dp", "dp_shard_cp", "dp_cp", ...) as a 1D mesh, or
        "hsdp" (2D: dp_replicate, dp_shard_cp); None when that mesh would have one rank."""
        if name not in _MESH_DIMS and name not in _FLATTENED and name != "hsdp":
            raise KeyError(f"unknown mesh dim {name!r}")
        if not self._slot.built:
            raise RuntimeError("call ParallelDims.build_mesh() first")
        return self._slot.meshes.get(name)

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (which slice of the batch it loads)."""
        dp = self.get_mesh("dp")
        return 0 if dp is None else dp.get_local_rank()

    @property
    def pp_rank(self) -> int:
        """This rank's index among the pipeline ranks (which stages it runs)."""
        pp = self.get_mesh("pp")
        return 0 if pp is None else pp.get_local_rank()

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        """Group of the pipeline ranks that hold the other stages of this rank's model replica."""
        m = self.get_mesh("pp")
        return None if m is None else m.get_group()

    @property
    def batch_group(self) -> dist.ProcessGroup | None:
        """Group over which the global batch is split (dp = dp_replicate x dp_shard): token counts are
        summed over it. CP ranks share their batch, so it excludes cp; None if 1."""
        m = self.get_mesh("dp")
        return None if m is None else m.get_group()

    @property
    def loss_group(self) -> dist.ProcessGroup | None:
        """Group over which per-rank loss sums and token counts are all-reduced (dp x cp); None if 1."""
        m = self.get_mesh("dp_cp")
        return None if m is None else m.get_group()

    def _degree(self, name: str) -> int:
        return {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "cp": self.cp,
                "tp": self.tp}[name]


def _product_text(p: Parallelism, *, shard: str, with_shard: bool) -> str:
    parts = [f"data_parallel_replicate_degree({p.data_parallel_replicate_degree})"]
    if with_shard:
        parts.append(f"data_parallel_shard_degree({shard})")
    parts += [
        f"context_parallel_degree({p.context_parallel_degree})",
        f"tensor_parallel_degree({p.tensor_parallel_degree})",
        f"pipeline_parallel_degree({p.pipeline_parallel_degree})",
    ]
    return " x ".join(parts)


def _divisor_hint(p: Parallelism, world_size: int) -> str:
    """Where one degree besides data_parallel_shard_degree is set: the values that divide the world size."""
    named = {"data_parallel_replicate_degree": p.data_parallel_replicate_degree,
             "context_parallel_degree": p.context_parallel_degree, "tensor_parallel_degree": p.tensor_parallel_degree,
             "pipeline_parallel_degree": p.pipeline_parallel_degree}
    over = [k for k, v in named.items() if v > 1]
    if len(over) != 1:
        return ""
    return f", e.g. {over[0]} {_or_list([d for d in range(1, world_size + 1) if world_size % d == 0])}"


def _or_list(values: list[int]) -> str:
    text = [str(v) for v in values]
    return text[0] if len(text) == 1 else ", ".join(text[:-1]) + " or " + text[-1]


def _round_up(x: int, unit: int) -> int:
    return ((x + unit - 1) // unit) * unit
