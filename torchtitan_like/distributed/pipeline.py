"""Pipeline parallelism: plan the split, cut the model into stages, build the torch schedule.

What comes in: `[parallelism]` (degree, schedule or CSV, microbatch size, layers per stage or an
explicit `module_fqns_per_model_part`), the layer count and the local batch size. What goes out:

- `plan_pipeline(...)` -> `PipelinePlan`: every check, before any model is built. It names the
  keys and a value that works (too many stages, an uneven explicit split, a microbatch count the
  schedule refuses, a schedule the installed torch does not have, compile with a zero-bubble
  schedule, tied embeddings).
- `split_model(model, fqns)`: one stage = a deep copy of the whole (meta) model minus the modules it
  does not own. `tok_embeddings` stays only on the first stage, `norm` and `output` only on the last;
  the layers live in a ModuleDict keyed by layer id, so every parameter keeps its name and a
  checkpoint moves between PP and non-PP layouts.
- `build_schedule(plan, stages, loss_fn)`: the `torch.distributed.pipelining` schedule, with
  `scale_grads=False` because our loss is already divided by the global token count.
- `TimedPipelineStage`: a `PipelineStage` that adds up its own compute time, so the trainer can
  log the share of each step a stage spends waiting on its neighbours.

Stage placement: single-stage schedules (GPipe, 1F1B) put stage r on pp rank r. Looped schedules
(Interleaved1F1B, LoopedBFS, InterleavedZeroBubble) put stages r, r+p, r+2p, ... on rank r. V
schedules (ZBVZeroBubble, DualPipeV) put r and 2p-1-r on rank r, so the first and the last stage,
and the loss, sit on rank 0. A CSV schedule places stages as its rows say.
"""

from __future__ import annotations

import csv
import inspect
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchtitan_like.config.schema import Parallelism
from torchtitan_like.errors import ConfigError

logger = logging.getLogger(__name__)

# Schedule names as torch.distributed.pipelining spells them (its get_schedule_class also takes
# PipelineScheduleSingle/Multi, which are base classes, not schedules).
KNOWN_SCHEDULES = (
    "GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV",
)
SINGLE_STAGE_SCHEDULES = frozenset({"GPipe", "1F1B"})
V_SCHEDULES = frozenset({"ZBVZeroBubble", "DualPipeV"})
ZERO_BUBBLE_SCHEDULES = frozenset({"InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"})
# These split each backward into input- and weight-gradient parts run at different times, which
# does not work on compiled graphs: torch 2.13 refuses OptimizedModule stages for them in the
# constructor; 2.11 accepts them and fails later inside the step. We refuse it for every version.
COMPILE_INCOMPATIBLE = ZERO_BUBBLE_SCHEDULES
CSV_SCHEDULE = "csv"


def available_schedules() -> list[str]:
    """The schedules of KNOWN_SCHEDULES that the installed torch has (DualPipeV is newer than the rest)."""
    from torch.distributed.pipelining.schedules import get_schedule_class

    out = []
    for name in KNOWN_SCHEDULES:
        try:
            get_schedule_class(name)
        except ValueError:
            continue
        out.append(name)
    return out


def check_schedule_backend(plan: PipelinePlan, device_type: str) -> None:
    """Refuse, on CPU (gloo), a schedule with two adjacent stages on one rank (the V schedules always,
    a CSV schedule may) where torch's stages send to their own rank: torch 2.11 passes activations
    between them by send/recv (its shape inference does at the first step); gloo cannot send to the
    sending rank ("Pair is not connected"), NCCL can. From torch 2.12 the stages hand them over in
    memory (`PipelineStage._is_same_rank`; not on `_PipelineStageBase`)."""
    if device_type != "cpu":
        return
    adjacent = [s for s in range(plan.num_stages - 1) if plan.stage_ranks[s] == plan.stage_ranks[s + 1]]
    if not adjacent:
        return
    from torch.distributed.pipelining import PipelineStage

    if not hasattr(PipelineStage, "_is_same_rank"):
        which = (f"parallelism.pipeline_parallel_schedule_csv={plan.csv_path!r} (stages {adjacent[0]} and "
                 f"{adjacent[0] + 1} on one rank)" if plan.schedule == CSV_SCHEDULE
                 else f"parallelism.pipeline_parallel_schedule={plan.schedule!r}")
        raise ConfigError(
            f"{which} on CPU (gloo) needs torch >= 2.12: torch {torch.__version__} sends between the two adjacent "
            f"stages a rank holds, which gloo cannot; use a looped schedule (e.g. InterleavedZeroBubble or "
            f"Interleaved1F1B) here, or run on CUDA (NCCL)"
        )


def resolve_schedule_name(name: str) -> str:
    """The canonical spelling of a schedule name (case-insensitive), or a ConfigError listing the valid ones."""
    available = available_schedules()
    by_lower = {n.lower(): n for n in available}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    missing = [n for n in KNOWN_SCHEDULES if n not in available and n.lower() == name.lower()]
    why = f" (torch {torch.__version__} does not have it)" if missing else ""
    raise ConfigError(
        f"parallelism.pipeline_parallel_schedule={name!r} is not a schedule of the installed torch{why}; "
        f"valid: {', '.join(available)} (or set pipeline_parallel_schedule_csv)"
    )


@dataclass(frozen=True)
class PipelinePlan:
    """How the model is cut and scheduled; identical on every rank."""

    schedule: str
    """Canonical torch schedule name, or "csv"."""
    csv_path: str | None
    pp: int
    """Pipeline ranks."""
    fqns_per_stage: tuple[tuple[str, ...], ...]
    """Module names each stage owns, stage order."""
    stage_ranks: tuple[int, ...]
    """pp rank of each stage."""
    microbatch_size: int
    n_microbatches: int
    """Microbatches per schedule step (= training.local_batch_size // microbatch_size)."""
    splits_backward: bool = False
    """Each backward runs as an input part and a weight part (zero-bubble schedules, a CSV with I/W
    actions): the weight part assigns the weights' `.grad` itself, without autograd's accumulate hooks."""

    @property
    def num_stages(self) -> int:
        return len(self.fqns_per_stage)

    @property
    def stages_per_rank(self) -> int:
        return self.num_stages // self.pp

    @property
    def single_stage(self) -> bool:
        return self.schedule in SINGLE_STAGE_SCHEDULES

    def stage_ids(self, pp_rank: int) -> list[int]:
        """The stages that pp rank `pp_rank` runs, ascending."""
        return [s for s, r in enumerate(self.stage_ranks) if r == pp_rank]

    def bubble_fraction(self) -> float | None:
        """Theoretical idle time / ideal compute time: (p-1)/m for GPipe and 1F1B, (p-1)/(v*m) for
        interleaved and looped schedules with m >= p ((v*(p-m)+m-1)/(v*m) below), about 0 for
        zero-bubble ones (with enough microbatches), None for a CSV schedule."""
        p, m, v = self.pp, self.n_microbatches, self.stages_per_rank
        if self.schedule == CSV_SCHEDULE:
            return None
        if self.schedule in ZERO_BUBBLE_SCHEDULES:
            return 0.0
        if self.schedule in SINGLE_STAGE_SCHEDULES:
            return (p - 1) / m
        if m < p:
            # A round of microbatches cannot fill the loop: the last one enters at (m-1)/v and then
            # crosses all v*p stages (1/v each).
            return (v * (p - m) + m - 1) / (v * m)
        return (p - 1) / (v * m)

    def describe(self) -> str:
        layers = [sum(f.startswith("layers.") for f in fqns) for fqns in self.fqns_per_stage]
        bubble = self.bubble_fraction()
        formula = "(p-1)/m" if self.single_stage else "(p-1)/(v*m)" if self.n_microbatches >= self.pp else "(v*(p-m)+m-1)/(v*m)"
        if self.schedule in ZERO_BUBBLE_SCHEDULES:
            bubble_text = "~0 (zero bubble)"
        elif bubble is None:
            bubble_text = "unknown (custom CSV schedule)"
        else:
            bubble_text = f"{bubble:.3f} = {formula}"
        return (
            f"pipeline: schedule {self.schedule}{' ' + self.csv_path if self.csv_path else ''}, p={self.pp}, "
            f"v={self.stages_per_rank} stage(s) per rank, m={self.n_microbatches} microbatches of "
            f"{self.microbatch_size}, layers per stage {layers}, theoretical bubble {bubble_text}"
        )


# ---- planning (all checks, no model) --------------------------------------------------------


def plan_pipeline(
    p: Parallelism,
    *,
    n_layers: int,
    local_batch_size: int,
    tie_word_embeddings: bool,
    compile_model: bool,
    compile_loss: bool = False,
    op_ac: bool = False,
) -> PipelinePlan:
    """Check the pipeline keys against the model and the batch; raise ConfigError or return the plan.

    compile_model / compile_loss: compile.enable with "model" / "loss" in compile.components.
    op_ac: activation_checkpoint.mode="selective" with selective_ac_option="op"."""
    pp = p.pipeline_parallel_degree
    if pp < 2:
        raise ValueError("plan_pipeline needs pipeline_parallel_degree >= 2")
    if tie_word_embeddings:
        raise ConfigError(
            f"parallelism.pipeline_parallel_degree={pp}: this model flavor ties tok_embeddings and output weights "
            "(model args tie_word_embeddings), which pipeline parallel puts on different stages; use an untied "
            "flavor or pipeline_parallel_degree=1"
        )
    csv_ranks: list[set[int]] | None = None
    csv_actions: dict[int, list[Any]] = {}
    csv_microbatches = 0
    splits_backward = False
    if p.pipeline_parallel_schedule_csv:
        schedule = CSV_SCHEDULE
        csv_ranks, csv_microbatches, csv_actions = _read_csv(p.pipeline_parallel_schedule_csv, pp)
        splits_backward = any(a.computation_type.name in ("BACKWARD_INPUT", "BACKWARD_WEIGHT")
                              for row in csv_actions.values() for action in row
                              for a in (getattr(action, "sub_actions", None) or (action,)))
        key = f"parallelism.pipeline_parallel_schedule_csv={p.pipeline_parallel_schedule_csv!r}"
        what = "its I/W actions split each backward"
    else:
        schedule = resolve_schedule_name(p.pipeline_parallel_schedule)
        splits_backward = schedule in COMPILE_INCOMPATIBLE
        key = f"parallelism.pipeline_parallel_schedule={schedule!r}"
        what = "zero-bubble schedules split each backward"
    compiled = [c for c, on in (("model", compile_model), ("loss", compile_loss)) if on]
    if splits_backward and compiled:
        # The compiled loss runs inside the last stage's backward as well (measured: "Failed to run stage
        # backward input ... compiled with non-empty donated buffers").
        raise ConfigError(
            f"{key} cannot run a compiled {' or '.join(compiled)} ({what} into input and weight parts, which "
            "compiled graphs do not support): set compile.enable=false, drop "
            f"{' and '.join(repr(c) for c in compiled)} from compile.components, or use a schedule without "
            "split backward (1F1B, Interleaved1F1B)"
        )
    if splits_backward and op_ac:
        # torch's selective checkpoint lets each region be backpropagated once; the weight-gradient half
        # is a second backward (measured: "Trying to backward an extra time ... selective activation
        # checkpoint" at the first step).
        raise ConfigError(
            f"{key} cannot run activation_checkpoint.selective_ac_option=\"op\" ({what} into input and weight "
            "parts, and an op-level checkpointed region can be backpropagated only once): use "
            "activation_checkpoint.mode=\"full\" or selective_ac_option=N (every N-th block), or a schedule "
            "without split backward (1F1B, Interleaved1F1B)"
        )

    mbs = p.pipeline_parallel_microbatch_size
    if mbs < 1 or local_batch_size % mbs:
        # Suggest sizes that also leave a microbatch per rank (what every schedule but GPipe needs).
        sizes = [d for d in _divisors(local_batch_size) if local_batch_size // d >= pp] or [1]
        raise ConfigError(
            f"training.local_batch_size={local_batch_size} must be a multiple of "
            f"parallelism.pipeline_parallel_microbatch_size={mbs}; try a microbatch size of {_or_list(sizes)}"
        )
    n_mb = local_batch_size // mbs

    # Stages: explicit list, or from layers_per_stage, or the schedule's default per rank.
    first_less, last_less = p.pipeline_parallel_first_stage_less_layers, p.pipeline_parallel_last_stage_less_layers
    if p.module_fqns_per_model_part is not None:
        if p.pipeline_parallel_layers_per_stage is not None:
            raise ConfigError(
                "parallelism.module_fqns_per_model_part and pipeline_parallel_layers_per_stage both set the split: "
                "keep one"
            )
        fqns = _check_explicit_split(p.module_fqns_per_model_part, n_layers)
    else:
        if p.pipeline_parallel_layers_per_stage is not None:
            num_stages = _stages_from_layers_per_stage(
                p.pipeline_parallel_layers_per_stage, n_layers=n_layers, first_less=first_less, last_less=last_less
            )
        elif csv_ranks is not None:
            num_stages = len(csv_ranks)
        else:
            num_stages = pp * (1 if schedule in SINGLE_STAGE_SCHEDULES else 2)
        fqns = split_fqns(
            n_layers, num_stages, first_less=first_less, last_less=last_less,
            layers_per_stage=p.pipeline_parallel_layers_per_stage,
        )
    num_stages = len(fqns)
    if num_stages % pp:
        raise ConfigError(
            f"the pipeline has {num_stages} stages, which do not divide over pipeline_parallel_degree={pp} ranks: "
            f"choose a split into a multiple of {pp} stages (parallelism.pipeline_parallel_layers_per_stage or "
            "module_fqns_per_model_part)"
        )
    v = num_stages // pp
    if schedule in SINGLE_STAGE_SCHEDULES and v != 1:
        raise ConfigError(
            f"parallelism.pipeline_parallel_schedule={schedule!r} runs one stage per rank, but the split has {v} "
            f"per rank ({num_stages} stages over {pp} ranks); use Interleaved1F1B / LoopedBFS for several, or "
            f"split into {pp} stages"
        )
    if schedule in V_SCHEDULES and v != 2:
        raise ConfigError(
            f"parallelism.pipeline_parallel_schedule={schedule!r} needs exactly 2 stages per rank (a V), but the "
            f"split has {num_stages} stages over {pp} ranks; split into {2 * pp} stages"
        )

    if csv_ranks is not None:
        if csv_microbatches != n_mb:
            raise ConfigError(
                f"parallelism.pipeline_parallel_schedule_csv={p.pipeline_parallel_schedule_csv!r} schedules "
                f"{csv_microbatches} microbatches but training.local_batch_size={local_batch_size} / "
                f"pipeline_parallel_microbatch_size={mbs} gives {n_mb}; make them agree"
            )
        if len(csv_ranks) != num_stages:
            raise ConfigError(
                f"parallelism.pipeline_parallel_schedule_csv={p.pipeline_parallel_schedule_csv!r} schedules "
                f"{len(csv_ranks)} stages but the split has {num_stages}; make them agree"
            )
        stage_ranks = []
        for s, ranks in enumerate(csv_ranks):
            if len(ranks) != 1:
                raise ConfigError(
                    f"parallelism.pipeline_parallel_schedule_csv: stage {s} appears on ranks {sorted(ranks)}; "
                    "each stage must run on exactly one rank"
                )
            stage_ranks.append(next(iter(ranks)))
        idle = sorted(set(range(pp)) - set(stage_ranks))
        if idle:
            raise ConfigError(
                f"parallelism.pipeline_parallel_schedule_csv={p.pipeline_parallel_schedule_csv!r} gives pipeline "
                f"rank(s) {idle} no stage; every rank (row) must run at least one"
            )
        _check_csv_order(p.pipeline_parallel_schedule_csv, csv_actions, pp=pp, num_stages=num_stages, n_mb=n_mb)
    elif schedule in V_SCHEDULES:
        stage_ranks = [s if s < pp else 2 * pp - 1 - s for s in range(num_stages)]
    else:
        stage_ranks = [s % pp for s in range(num_stages)]

    _check_microbatches(schedule, n_mb=n_mb, pp=pp, num_stages=num_stages, local_batch_size=local_batch_size, mbs=mbs)
    return PipelinePlan(
        schedule=schedule,
        csv_path=p.pipeline_parallel_schedule_csv,
        pp=pp,
        fqns_per_stage=tuple(tuple(f) for f in fqns),
        stage_ranks=tuple(stage_ranks),
        microbatch_size=mbs,
        n_microbatches=n_mb,
        splits_backward=splits_backward,
    )


def split_fqns(
    n_layers: int,
    num_stages: int,
    *,
    first_less: int = 1,
    last_less: int = 1,
    layers_per_stage: int | None = None,
) -> list[list[str]]:
    """Module names per stage. The embedding counts as `first_less` layers of work on the first stage,
    norm + output (+ loss) as `last_less` on the last; each stage then gets an equal share of the
    work (or `layers_per_stage` of it, the last stage taking the rest). The first and the last stage
    may hold no layer (the embedding, or norm + output, is their work); a middle stage may not."""
    most = n_layers + (first_less > 0) + (last_less > 0)
    if num_stages > most:
        raise ConfigError(
            f"a pipeline of {num_stages} stages over a model with {n_layers} layers leaves stages without a layer: "
            f"use at most {most} stages (lower pipeline_parallel_degree, or raise "
            "pipeline_parallel_layers_per_stage)"
        )
    total = n_layers + first_less + last_less
    if layers_per_stage is not None:
        units = [layers_per_stage] * (num_stages - 1) + [total - layers_per_stage * (num_stages - 1)]
    else:
        base, extra = divmod(total, num_stages)
        units = [base] * num_stages
        # Leftover work goes to the middle stages first: they carry no embedding and no output.
        order = list(range(1, num_stages - 1)) + [num_stages - 1, 0]
        for s in order[:extra]:
            units[s] += 1
    counts = list(units)
    counts[0] -= first_less
    counts[-1] -= last_less
    for s, c in enumerate(counts):
        owns_more = (s == 0) or (s == num_stages - 1)
        if c < 0 or (c == 0 and not owns_more):
            which = {0: "first", num_stages - 1: "last"}.get(s, "a middle")
            raise ConfigError(
                f"the pipeline split leaves {which} stage (of {num_stages}) with {c} layers "
                f"(layers {counts}, model has {n_layers}; pipeline_parallel_first_stage_less_layers={first_less}, "
                f"pipeline_parallel_last_stage_less_layers={last_less}"
                f"{f', pipeline_parallel_layers_per_stage={layers_per_stage}' if layers_per_stage else ''}); "
                "lower the *_less_layers keys or use fewer stages"
            )
    out: list[list[str]] = []
    layer = 0
    for s, c in enumerate(counts):
        fqns = ["tok_embeddings"] if s == 0 else []
        fqns += [f"layers.{i}" for i in range(layer, layer + c)]
        layer += c
        if s == num_stages - 1:
            fqns += ["norm", "output"]
        out.append(fqns)
    return out


def _stages_from_layers_per_stage(lps: int, *, n_layers: int, first_less: int, last_less: int) -> int:
    total = n_layers + first_less + last_less
    return math.ceil(total / lps)


def _check_explicit_split(parts: list[list[str]], n_layers: int) -> list[list[str]]:
    key = "parallelism.module_fqns_per_model_part"
    expected = ["tok_embeddings"] + [f"layers.{i}" for i in range(n_layers)] + ["norm", "output"]
    position = {name: i for i, name in enumerate(expected)}
    seen: dict[str, int] = {}
    for s, part in enumerate(parts):
        if not part:
            raise ConfigError(f"{key}: stage {s} is empty; every stage needs at least one module")
        for name in part:
            if name not in position:
                raise ConfigError(
                    f"{key}: {name!r} (stage {s}) is not a module of this model; valid: tok_embeddings, "
                    f"layers.0 .. layers.{n_layers - 1}, norm, output"
                )
            if name in seen:
                raise ConfigError(f"{key}: {name!r} is in stage {seen[name]} and stage {s}; list each module once")
            seen[name] = s
    missing = [n for n in expected if n not in seen]
    if missing:
        raise ConfigError(f"{key}: no stage owns {', '.join(missing)}; every module must be in exactly one stage")
    flat = [name for part in parts for name in part]
    if [position[n] for n in flat] != sorted(position[n] for n in flat):
        raise ConfigError(
            f"{key}: the stages must follow the model's order (tok_embeddings, layers.0, ..., norm, output), "
            f"got {parts}"
        )
    return [list(p) for p in parts]


def _check_microbatches(schedule: str, *, n_mb: int, pp: int, num_stages: int, local_batch_size: int, mbs: int) -> None:
    # The constraints torch's schedule constructors enforce (torch 2.11-2.13), checked here so the
    # error names our keys and comes before the model is built.
    need = None
    if schedule == "1F1B" and n_mb < num_stages:
        need = f"at least {num_stages} microbatches (one per stage)"
    elif schedule == "DualPipeV" and n_mb < num_stages:
        need = f"at least {num_stages} microbatches (one per stage)"
    elif schedule in ("Interleaved1F1B", "InterleavedZeroBubble") and n_mb % _rounds(n_mb, pp):
        # torch runs the microbatches in rounds of at least pp: m // pp rounds, which must share them evenly.
        fits = [m for m in range(1, 2 * n_mb) if m % _rounds(m, pp) == 0]
        below, above = max(m for m in fits if m < n_mb), min(m for m in fits if m > n_mb)
        need = (f"a microbatch count that fills its rounds evenly (m // pipeline_parallel_degree={pp} rounds: "
                f"e.g. {below} or {above} microbatches)")
    if need:
        raise ConfigError(
            f"parallelism.pipeline_parallel_schedule={schedule!r} needs {need}, but training.local_batch_size="
            f"{local_batch_size} / pipeline_parallel_microbatch_size={mbs} gives {n_mb}; raise local_batch_size or "
            "lower the microbatch size"
        )


def _rounds(n_mb: int, pp: int) -> int:
    """The rounds an interleaved schedule runs `n_mb` microbatches in (torch 2.11-2.13)."""
    return max(1, n_mb // pp)


def _check_csv_order(path: str, actions: dict[int, list[Any]], *, pp: int, num_stages: int, n_mb: int) -> None:
    """torch's own check of a loaded action list (a backward before its forward, a W before its I, ...),
    run here so the dry run and the start of a job refuse what building the schedule would."""
    from torch.distributed.pipelining.schedules import _validate_schedule  # private: torch 2.6 - 2.13

    try:
        _validate_schedule(actions, pp, num_stages, n_mb)
    except (AssertionError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"parallelism.pipeline_parallel_schedule_csv={path!r}: torch refuses it: {first}") from None


def check_validation_schedule(plan: PipelinePlan) -> None:
    """Validation runs the schedule forward only (torch's eval()). torch 2.13's runtime still hands
    input gradients between two adjacent stages on one rank in that mode, and fails ("can't
    steal_bwd_input if this stage doesn't have backward"): the V schedules always place stages so, and
    a CSV schedule may."""
    adjacent = [s for s in range(plan.num_stages - 1) if plan.stage_ranks[s] == plan.stage_ranks[s + 1]]
    if not adjacent:
        return
    which = (f"parallelism.pipeline_parallel_schedule_csv={plan.csv_path!r}" if plan.schedule == CSV_SCHEDULE
             else f"parallelism.pipeline_parallel_schedule={plan.schedule!r}")
    raise ConfigError(
        f"validation.enable=true with {which}: stages {adjacent[0]} and {adjacent[0] + 1} run on the same rank, and "
        "torch cannot run such a schedule forward only (eval); use a schedule that puts adjacent stages on "
        "different ranks (1F1B, Interleaved1F1B, ...) or validation.enable=false"
    )


def _read_csv(path: str, pp: int) -> tuple[list[set[int]], int, dict[int, list[Any]]]:
    """For each stage index in the CSV, the ranks (rows) that compute it; the microbatch count; and
    each rank's parsed actions."""
    from torch.distributed.pipelining.schedules import _Action  # private: the CSV action parser

    key = "parallelism.pipeline_parallel_schedule_csv"
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{key}={path!r}: no such file")
    with file.open(newline="") as f:
        rows = [row for row in csv.reader(f)]
    if len(rows) != pp:
        raise ConfigError(f"{key}={path!r} has {len(rows)} rows but pipeline_parallel_degree={pp}; one row per rank")
    stages: dict[int, set[int]] = {}
    microbatches: set[int] = set()
    actions: dict[int, list[Any]] = {}
    for rank, row in enumerate(rows):
        actions[rank] = []
        for cell in row:
            cell = cell.strip()
            if not cell:
                continue
            try:
                action = _Action.from_str(cell)
            except Exception as e:  # torch raises RuntimeError / ValueError / AssertionError by version
                raise ConfigError(f"{key}={path!r} row {rank + 1}: cannot parse action {cell!r} ({e})") from None
            if action is None:
                continue
            # OVERLAP_F_B is a container (stage -1) of compute actions: count the stages inside it.
            parts = tuple(getattr(action, "sub_actions", None) or (action,))
            comms = [str(a) for a in parts if not a.computation_type.name.startswith(("FORWARD", "BACKWARD", "FULL_BACKWARD"))]
            if comms:
                raise ConfigError(
                    f"{key}={path!r} row {rank + 1}: {cell!r} is a communication action ({comms[0]}); the CSV must be "
                    "compute-only (F, B, I, W, OVERLAP_F_B): the runtime adds the sends, receives and resharding itself "
                    "(torch's _dump_csv writes this format with format=\"compute_only\")"
                )
            actions[rank].append(action)
            for a in parts:
                stages.setdefault(a.stage_index, set()).add(rank)
                if a.microbatch_index is not None:
                    microbatches.add(a.microbatch_index)
    if not stages or sorted(stages) != list(range(len(stages))):
        raise ConfigError(f"{key}={path!r}: stage indices must be 0..N-1 with none missing, got {sorted(stages)}")
    if sorted(microbatches) != list(range(len(microbatches))):
        raise ConfigError(f"{key}={path!r}: microbatch indices must be 0..M-1 with none missing, got {sorted(microbatches)}")
    return [stages[s] for s in range(len(stages))], len(microbatches), actions


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _or_list(values: list[int]) -> str:
    text = [str(v) for v in values]
    return text[0] if len(text) == 1 else ", ".join(text[:-1]) + " or " + text[-1]


# ---- the model side ---------------------------------------------------------------------------


def split_model(model: nn.Module, fqns: tuple[str, ...] | list[str]) -> nn.Module:
    """A deep copy of the (meta) model keeping only the modules in `fqns`; names are unchanged."""
    import copy

    part = copy.deepcopy(model)
    keep = set(fqns)
    if "tok_embeddings" not in keep:
        part.tok_embeddings = None
    for layer_id in list(part.layers.keys()):
        if f"layers.{layer_id}" not in keep:
            del part.layers[layer_id]
    if "norm" not in keep:
        part.norm = None
    if "output" not in keep:
        part.output = None
    return part


class _ComputeClock:
    """Adds up the time spent in a stage's own forward/backward work (not in waiting for peers).

    CPU: wall time. CUDA: events on the current stream, read once per step after the trainer's
    synchronize, so the measurement adds no sync of its own; a chunk's start event runs only after
    the stream's wait on the received activations, so it times the compute alone.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._cpu_s = 0.0
        self._events: list[tuple[Any, Any]] = []

    def __enter__(self) -> None:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._events.append((start, None))
        else:
            self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events[-1] = (self._events[-1][0], end)
        else:
            self._cpu_s += time.perf_counter() - self._t0

    def discard(self) -> None:
        """Forget what was timed since the last take(), without reading it (no synchronize needed)."""
        self._cpu_s, self._events = 0.0, []

    def take(self) -> float:
        """Seconds of compute since the last take() (CUDA: the stream must be synchronized)."""
        total = self._cpu_s + sum(s.elapsed_time(e) / 1e3 for s, e in self._events if e is not None)
        self._cpu_s, self._events = 0.0, []
        return total


def _pipeline_stage_class() -> type:
    from torch.distributed.pipelining import PipelineStage

    class TimedPipelineStage(PipelineStage):
        """A PipelineStage that times its forward/backward chunks (see _ComputeClock)."""

        def __init__(self, *args: Any, clock: _ComputeClock, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.clock = clock

        def forward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
            with self.clock:
                return super().forward_one_chunk(*args, **kwargs)

        def backward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
            with self.clock:
                return super().backward_one_chunk(*args, **kwargs)

        def backward_weight_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
            with self.clock:
                return super().backward_weight_one_chunk(*args, **kwargs)

    return TimedPipelineStage


def schedule_switches_modes() -> bool:
    """Whether this torch's schedules can run forward-only (`eval()`) between training steps.

    torch 2.12's and 2.13's schedules notice a switch between `step()` and `eval()` and rebuild the
    stages' receive buffers and metadata for it (`_PipelineSchedule._initialize_pp_stages`). torch 2.11's
    build them once, for whichever came first: an eval before the first training step would leave
    training with receive buffers that do not require grad, and shapes cannot change. Private
    attribute, feature-detected; without it validation under PP is refused at start.
    """
    from torch.distributed.pipelining.schedules import _PipelineSchedule

    return hasattr(_PipelineSchedule, "_initialize_pp_stages")


class Pipeline:
    """This rank's stages and the schedule that runs them.

    `step(inputs, labels, losses, denominator=...)` runs one schedule step (forward and backward)
    over a local batch, split into the plan's microbatches; `losses` receives the last stage's
    per-microbatch losses, `loss_fn(logits, labels) / denominator`, on the rank that owns it.
    `eval(inputs, labels, losses)` runs the same forward only, with the token-sum losses (validation).
    `compute_s()` returns this rank's compute seconds since the last call.
    `doc_ids(inputs)`, where given (block_causal attention), gives every stage the batch's document ids
    (the `doc_ids` keyword of the model's forward, split into microbatches like the inputs): a stage
    after the first has no token ids to find the documents in.
    """

    def __init__(
        self,
        plan: PipelinePlan,
        *,
        pp_rank: int,
        parts: list[nn.Module],
        pp_group: torch.distributed.ProcessGroup,
        device: torch.device,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        doc_ids: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.plan = plan
        self._doc_ids = doc_ids
        self.stage_ids = plan.stage_ids(pp_rank)
        if len(parts) != len(self.stage_ids):
            raise AssertionError(f"{len(parts)} model parts for stages {self.stage_ids}")
        self.clock = _ComputeClock(device)
        cls = _pipeline_stage_class()
        self.stages = [
            cls(part, sid, plan.num_stages, device, group=pp_group, clock=self.clock)
            for part, sid in zip(parts, self.stage_ids)
        ]
        self.has_first = 0 in self.stage_ids
        self.has_last = plan.num_stages - 1 in self.stage_ids
        self._loss_fn = loss_fn
        self._denominator = 1.0
        self.schedule = build_schedule(plan, self.stages, loss_fn=self._scaled_loss)
        # return_outputs=False (torch >= 2.12): do not keep the last stage's logits of every microbatch.
        self._step_kwargs = (
            {"return_outputs": False} if "return_outputs" in inspect.signature(self.schedule.step).parameters else {}
        )

    def _scaled_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Called by the schedule on the last stage, once per microbatch, outside the stage's timed
        # forward: timed here (with a chunked loss it holds the output projection too).
        with self.clock:
            return self._loss_fn(logits, labels) / self._denominator

    def step(
        self, inputs: torch.Tensor, labels: torch.Tensor, losses: list[torch.Tensor], *, denominator: float
    ) -> None:
        self._denominator = denominator
        self.schedule.step(*self._args(inputs), **self._kwargs(inputs, labels, losses), **self._step_kwargs)

    def eval(self, inputs: torch.Tensor, labels: torch.Tensor, losses: list[torch.Tensor]) -> None:
        """Forward only (call under torch.no_grad()); `losses` gets the token-sum loss of each microbatch."""
        self._denominator = 1.0
        self.schedule.eval(*self._args(inputs), **self._kwargs(inputs, labels, losses), **self._step_kwargs)
        # Forward-only compute is not training time: keep it out of compute_s() (discarded, not read: on
        # CUDA reading the events would need the stream synchronized first).
        self.clock.discard()

    def _args(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (inputs,) if self.has_first else ()

    def _kwargs(self, inputs: torch.Tensor, labels: torch.Tensor, losses: list[torch.Tensor]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"target": labels, "losses": losses} if self.has_last else {}
        if self._doc_ids is not None:
            kwargs["doc_ids"] = self._doc_ids(inputs)  # passed on to every stage's forward
        return kwargs

    def compute_s(self) -> float:
        return self.clock.take()


def build_schedule(plan: PipelinePlan, stages: list[Any], *, loss_fn: Callable) -> Any:
    """The torch schedule for `plan` over this rank's stages."""
    from torch.distributed.pipelining import schedules

    # scale_grads=False: loss_fn already divides by the global token count (the same denominator
    # with or without PP); torch's default would divide the gradients by n_microbatches again.
    kwargs = {"n_microbatches": plan.n_microbatches, "loss_fn": loss_fn, "scale_grads": False}
    try:
        if plan.schedule == CSV_SCHEDULE:
            # Private runtime (torch >= 2.6) that executes a loaded action list; _load_csv is marked
            # internal by torch and may be renamed.
            schedule = schedules._PipelineScheduleRuntime(stages, **kwargs)
            schedule._load_csv(plan.csv_path, format="compute_only")
            return schedule
        cls = schedules.get_schedule_class(plan.schedule)
        if plan.single_stage:
            return cls(stages[0], **kwargs)
        return cls(stages, **kwargs)
    except (ValueError, RuntimeError, AssertionError) as e:
        key = "pipeline_parallel_schedule_csv" if plan.schedule == CSV_SCHEDULE else "pipeline_parallel_schedule"
        raise ConfigError(f"parallelism.{key}: torch refused the schedule: {e}") from None


def log_plan(plan: PipelinePlan, pp_rank: int) -> None:
    logger.info("%s; this rank runs stage(s) %s", plan.describe(), plan.stage_ids(pp_rank))

