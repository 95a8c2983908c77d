"""A candidate layout of one job, the inputs of a plan, and the enumeration of the valid layouts.

Every candidate is turned into the trainer's own config (`load_config` with the layout's overrides)
and checked with the trainer's own `check_job` (degrees, divisibility, batch, pipeline plan) and
float8 converter: a layout the planner offers is one the trainer accepts.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from torchtitan_like.config.loader import load_config
from torchtitan_like.config.schema import JobConfig
from torchtitan_like.distributed.pipeline import PipelinePlan, available_schedules
from torchtitan_like.errors import ConfigError
from torchtitan_like.models.llama3.args import TransformerArgs
from torchtitan_like.planner.hardware import HardwareProfile

logger = logging.getLogger(__name__)

AC_MODES = ("none", "selective_op", "full")
"""Activation checkpointing choices: activation_checkpoint.mode none / selective with "op" / full."""
FEATURES = ("fsdp", "hsdp", "ddp", "tp", "async_tp", "pp", "cp", "float8", "ac")
LOSS_CHUNK = 2048
"""training.loss_chunk_size the planner tries on layouts without loss parallel (tp 1, or any tp when the
job sets parallelism.disable_loss_parallel) whose sequence shard is longer: one chunk's logits instead of
the whole sequence's, for a recompute of the output projection in backward."""


@dataclass(frozen=True)
class Layout:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    local_batch_size: int
    """Sequences one data-parallel rank runs per forward/backward (or per pipeline step)."""
    microbatch_size: int
    """Pipeline microbatch (sequences); equals local_batch_size without PP."""
    pp_schedule: str = "1F1B"
    ac: str = "none"
    float8: bool = False
    loss_chunk_size: int = 0
    """training.loss_chunk_size (0: whole logits); always written, so a base config's value never
    reaches a layout with loss parallel, which refuses it."""
    async_tp: bool = False
    """parallelism.enable_async_tensor_parallel: the TP collectives overlap the matmuls they feed
    (CUDA and compile only); always written."""
    reshard_after_forward: bool = True
    """parallelism.fsdp_reshard_after_forward "default" (blocks free their gathered parameters after
    forward and gather them again in backward) or "never" (they stay gathered: one all-gather per
    microbatch, the whole model's parameters in memory); always written. PP never reshards either way."""
    float8_all_gather: bool = False
    """quantize.linear.float8.enable_fsdp_float8_all_gather with precompute_float8_dynamic_scale_for_fsdp:
    FSDP gathers the float8 linears' weights in float8 (tensorwise, float8 and FSDP only); always written."""

    @property
    def degrees(self) -> dict[str, int]:
        return {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "cp": self.cp,
                "tp": self.tp}

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def overrides(self) -> list[str]:
        """The config overrides (`--section.key value`) that select this layout."""
        out = [
            "--parallelism.data_parallel_replicate_degree", str(self.dp_replicate),
            "--parallelism.data_parallel_shard_degree", str(self.dp_shard),
            "--parallelism.context_parallel_degree", str(self.cp),
            "--parallelism.tensor_parallel_degree", str(self.tp),
            "--parallelism.pipeline_parallel_degree", str(self.pp),
            "--training.local_batch_size", str(self.local_batch_size),
        ]
        if self.pp > 1:
            out += ["--parallelism.pipeline_parallel_schedule", self.pp_schedule,
                    "--parallelism.pipeline_parallel_microbatch_size", str(self.microbatch_size)]
        mode = {"none": "none", "full": "full", "selective_op": "selective"}[self.ac]
        out += ["--activation_checkpoint.mode", mode]
        if self.ac == "selective_op":
            out += ["--activation_checkpoint.selective_ac_option", "op"]
        out += ["--model.converters", "float8" if self.float8 else ""]
        out += ["--training.loss_chunk_size", str(self.loss_chunk_size)]
        out += [_flag("parallelism.enable_async_tensor_parallel", self.async_tp)]
        out += ["--parallelism.fsdp_reshard_after_forward", "default" if self.reshard_after_forward else "never"]
        out += [_flag(f"quantize.linear.float8.{key}", self.float8_all_gather)
                for key in ("enable_fsdp_float8_all_gather", "precompute_float8_dynamic_scale_for_fsdp")]
        return out

    def describe(self) -> str:
        parts = []
        # Replicas of a sharded model (over dp_shard or cp) are HSDP; of a whole one, DDP.
        for name, d in (("pp", self.pp), ("hsdp" if self.dp_shard * self.cp > 1 else "ddp", self.dp_replicate),
                        ("fsdp", self.dp_shard), ("cp", self.cp), ("tp", self.tp)):
            if d > 1:
                parts.append(f"{name}{d}")
        text = "x".join(parts) or "single"
        if self.pp > 1:
            text += f" {self.pp_schedule} mb{self.microbatch_size}"
        text += f" lbs{self.local_batch_size} ac={self.ac}"
        if not self.reshard_after_forward:
            text += " no-reshard"
        if self.async_tp:
            text += " asyncTP"
        if self.float8:
            text += " fp8" + ("+fp8AG" if self.float8_all_gather else "")
        if self.loss_chunk_size:
            text += f" loss_chunk{self.loss_chunk_size}"
        return text


def _flag(key: str, on: bool) -> str:
    """`--section.key` or `--section.no_key`: a bool key set either way."""
    section, _, name = key.rpartition(".")
    return f"--{key}" if on else f"--{section}.no_{name}"


@dataclass(frozen=True)
class PlanInputs:
    """What the user asks to plan: the job (a base config) on a number of GPUs of one kind."""

    base_argv: tuple[str, ...]
    """Config arguments of the job (a TOML and/or overrides); the layout's overrides go after them."""
    world_size: int
    hardware: HardwareProfile
    seq_len: int
    global_batch_size: int
    """Sequences per optimizer step."""
    compile: bool = True
    allow: frozenset[str] = field(default_factory=lambda: frozenset(FEATURES))
    """Features the planner may use (FEATURES): a layout that shards parameters (dp_shard or cp > 1) needs
    "fsdp", replicas of a sharded model "hsdp", replicas of a whole one "ddp"."""
    max_local_batch_size: int = 8

    def argv(self, layout: Layout) -> list[str]:
        return [
            *self.base_argv,
            "--training.seq_len", str(self.seq_len),
            "--training.global_batch_size", str(self.global_batch_size),
            *layout.overrides(),
            "--compile.enable" if self.compile else "--compile.no_enable",
        ]


@dataclass(frozen=True)
class Candidate:
    """A layout the trainer's checks accept, with what they resolved."""

    layout: Layout
    cfg: JobConfig
    model_args: TransformerArgs
    pp_plan: PipelinePlan | None
    device: str = "cuda"
    """The hardware profile's device type: it resolves mixed_precision_param "auto" as the trainer does
    there (bfloat16 on CUDA, float32 on CPU)."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _powers_of_two_up_to(n: int) -> list[int]:
    return [2**i for i in range(n.bit_length()) if 2**i <= n]


def layouts(inputs: PlanInputs, n_layers: int) -> Iterator[Layout]:
    """Every layout in the search space (not yet checked): TP inside a node, CP and PP over powers
    of two and divisors, every split of data parallel into replicas x shards, the batch split into
    microbatches."""
    world, allow, gpn = inputs.world_size, inputs.allow, inputs.hardware.gpus_per_node
    tps = [t for t in _divisors(min(world, gpn)) if t == 1 or "tp" in allow]
    cps = [c for c in _powers_of_two_up_to(world) if c == 1 or "cp" in allow]
    ac_modes = [a for a in AC_MODES if a == "none" or "ac" in allow]
    base = load_config(list(inputs.base_argv))
    # Async TP is an inductor pass over symmetric memory: CUDA jobs compiled by inductor only.
    async_ok = ("async_tp" in allow and inputs.compile and inputs.hardware.device == "cuda"
                and base.compile.backend == "inductor")
    schedules = [s for s in ("1F1B", "Interleaved1F1B") if s in available_schedules()]
    # The job's own choice: with disable_loss_parallel the logits are whole under TP too.
    loss_parallel = not base.parallelism.disable_loss_parallel
    for tp, cp in itertools.product(tps, cps):
        if world % (tp * cp):
            continue
        for pp in _divisors(world // (tp * cp)):
            if pp > 1 and ("pp" not in allow or pp > n_layers // 2):
                continue
            dp_total = world // (tp * cp * pp)
            for dp_replicate in _divisors(dp_total):
                dp_shard = dp_total // dp_replicate
                if dp_replicate > 1 and dp_shard * cp > 1 and "hsdp" not in allow:
                    continue
                if dp_replicate > 1 and dp_shard * cp == 1 and "ddp" not in allow:
                    continue
                if dp_shard * cp > 1 and "fsdp" not in allow:
                    continue
                dp = dp_replicate * dp_shard
                if inputs.global_batch_size % dp:
                    continue
                per_rank = inputs.global_batch_size // dp
                if pp == 1:
                    batch_options = [(lb, lb, "1F1B") for lb in _divisors(per_rank) if lb <= inputs.max_local_batch_size]
                else:
                    # The whole per-rank batch goes through the schedule; microbatches of 1, 2, 4 ...
                    batch_options = [
                        (per_rank, mb, sched) for mb in _divisors(per_rank) if per_rank // mb >= pp
                        for sched in schedules
                    ]
                # Chunking the loss only where the logits are whole on the vocabulary (no loss parallel).
                whole_vocab = tp == 1 or not loss_parallel
                chunks = [0, LOSS_CHUNK] if whole_vocab and inputs.seq_len // cp > LOSS_CHUNK else [0]
                asyncs = [False, True] if tp > 1 and async_ok else [False]
                # Keeping the blocks gathered from forward to backward: FSDP without PP (PP never reshards).
                reshards = [True, False] if pp == 1 and dp_shard * cp > 1 else [True]
                # float8, and float8 with FSDP's float8 all-gather where parameters are sharded
                # (refused by the trainer's checks unless the job's recipe is tensorwise).
                f8s = [(False, False)]
                if "float8" in allow:
                    f8s += [(True, False)] + ([(True, True)] if dp_shard * cp > 1 else [])
                for (lb, mb, sched), ac, (f8, f8ag), chunk, atp, reshard in itertools.product(
                    batch_options, ac_modes, f8s, chunks, asyncs, reshards
                ):
                    yield Layout(dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, tp=tp, pp=pp,
                                 local_batch_size=lb, microbatch_size=mb, pp_schedule=sched, ac=ac, float8=f8,
                                 loss_chunk_size=chunk, async_tp=atp, float8_all_gather=f8ag,
                                 reshard_after_forward=reshard)


def check(inputs: PlanInputs, layout: Layout) -> Candidate:
    """The layout as the trainer's config, through the trainer's checks for the hardware profile's device;
    ConfigError if refused."""
    from torchtitan_like.components.float8 import build_float8_converter
    from torchtitan_like.distributed.pipeline import check_schedule_backend
    from torchtitan_like.distributed.utils import param_dtype
    from torchtitan_like.trainer import check_job, check_job_device

    cfg = load_config(inputs.argv(layout))
    device = inputs.hardware.device
    # The device's own refusals first, as the trainer runs them (flex attention or pinned-memory staging on
    # a CPU profile): a layout the planner offers is one the job's device accepts too.
    check_job_device(cfg, device)
    checked = check_job(cfg, layout.world_size)
    if checked.pp_plan is not None:
        check_schedule_backend(checked.pp_plan, device)
    converter = build_float8_converter(
        cfg.model.converters, cfg.quantize.linear.float8, parallel_dims=checked.parallel_dims,
        device=torch.device(device), param_dtype=param_dtype(cfg.training, device),
        check_device=False,
    )
    if converter is not None and device == "cuda" and not cfg.quantize.linear.float8.emulate:
        _check_float8_gemm_dims(cfg, checked.model_args, tp=layout.tp)
    return Candidate(layout=layout, cfg=cfg, model_args=checked.model_args, pp_plan=checked.pp_plan, device=device)


@functools.lru_cache(maxsize=16)
def _float8_weight_shapes(model_args: TransformerArgs, recipe: str, filter_fqns: tuple[str, ...]
                          ) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, full weight shape) of each linear that float8 converts under `recipe` and `filter_fqns`: one
    meta build and conversion per model and filter, not per layout."""
    from torchtitan_like.components.float8 import Float8Converter, is_float8_linear
    from torchtitan_like.config.schema import Float8, Parallelism
    from torchtitan_like.distributed.parallel_dims import ParallelDims
    from torchtitan_like.models import MODELS

    # (Which linears convert depends on the recipe and filter only; one rank stands for the layout.)
    converter = Float8Converter(
        Float8(recipe_name=recipe, filter_fqns=list(filter_fqns), emulate=True),
        parallel_dims=ParallelDims.from_config(Parallelism(), 1), device=torch.device("meta"), check_device=False,
    )
    with torch.device("meta"):
        model = MODELS["llama3"].build(model_args)
    converter.convert(model)
    return tuple((name, tuple(m.weight.shape)) for name, m in model.named_modules() if is_float8_linear(m))


def _check_float8_gemm_dims(cfg: JobConfig, model_args: TransformerArgs, *, tp: int) -> None:
    """The trainer's Float8Converter.check_gemm_dims on CUDA, from shapes: each converted linear's weight, as a
    rank multiplies it after tensor parallel's split, must have both dimensions divisible by 16."""
    from torchtitan_like.components.float8 import gemm_dims_error
    from torchtitan_like.planner.state import tp_shard_dim

    f8 = cfg.quantize.linear.float8
    for name, full in _float8_weight_shapes(model_args, f8.recipe_name, tuple(f8.filter_fqns)):
        shape = list(full)
        dim = tp_shard_dim(f"{name}.weight")
        split = tp > 1 and dim is not None
        if split:
            shape[dim] //= tp  # (as check_gemm_dims divides it)
        error = gemm_dims_error(name, shape, tp_split=split)
        if error:
            raise ConfigError(error)


def _top_level_split(text: str, sep: str) -> list[str]:
    """`text` split at each `sep` outside parentheses and brackets."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c in "([":
            depth += 1
        elif c in ")]":
            depth = max(0, depth - 1)
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            start = i = i + len(sep)
            continue
        i += 1
    parts.append(text[start:])
    return parts


def refusal_reason(message: str) -> str:
    """The rule a trainer's refusal states, without its fix and its layout-specific hints, so that the layouts
    refused for one rule count together: "key=value must ... (why)" of "key=value must ... (why); hint: fix".
    A bare label before the first ": " ("float8: linear 'output' ...") keeps the whole statement after it:
    alone it would say nothing."""
    segments = _top_level_split(message, ": ")
    if len(segments) > 1 and " " not in segments[0]:
        return f"{segments[0]}: {segments[1]}"
    return _top_level_split(segments[0], "; ")[0]


def valid_candidates(inputs: PlanInputs, n_layers: int) -> tuple[list[Candidate], Counter[str]]:
    """The layouts the trainer accepts, and how many were refused for each reason (`refusal_reason`)."""
    ok: list[Candidate] = []
    refused: Counter[str] = Counter()
    for layout in layouts(inputs, n_layers):
        try:
            ok.append(check(inputs, layout))
        except ConfigError as e:
            refused[refusal_reason(str(e))] += 1
    return ok, refused
