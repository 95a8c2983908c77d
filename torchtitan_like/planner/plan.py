"""Rank the valid layouts of a job by predicted throughput among those that fit in memory; render
the table, one layout's full breakdown (`explain`), and the winner as a TOML the trainer runs."""

from __future__ import annotations

import logging
import shlex
from collections import Counter
from dataclasses import dataclass

from torchtitan_like.config.loader import to_toml
from torchtitan_like.planner.hardware import HardwareProfile
from torchtitan_like.planner.layout import Candidate, Layout, PlanInputs, check, valid_candidates
from torchtitan_like.planner.memory import MemoryEstimate, peak_memory
from torchtitan_like.planner.step_time import StepTime, Throughput, estimate_step_time, throughput

logger = logging.getLogger(__name__)

GIB = 2**30


@dataclass(frozen=True)
class Prediction:
    candidate: Candidate
    memory: MemoryEstimate
    step: StepTime
    speed: Throughput
    fits: bool

    @property
    def layout(self):
        return self.candidate.layout


@dataclass(frozen=True)
class Plan:
    inputs: PlanInputs
    ranked: list[Prediction]
    """Layouts that fit, fastest first."""
    too_big: list[Prediction]
    """Valid layouts whose predicted peak exceeds the GPU, smallest peak first."""
    refused: Counter[str]
    """Layouts the trainer's checks refused, by reason."""


def predict(c: Candidate, hw: HardwareProfile, *, compile: bool) -> Prediction:
    memory = peak_memory(c)
    step = estimate_step_time(c, hw, compile=compile)
    fits = memory.total + hw.reserved_gib * GIB <= hw.hbm_bytes
    return Prediction(candidate=c, memory=memory, step=step, speed=throughput(c, step, hw), fits=fits)


def predict_layout(inputs: PlanInputs, layout: Layout) -> Prediction:
    """One given layout through the trainer's checks (ConfigError if refused) and the cost model."""
    return predict(check(inputs, layout), inputs.hardware, compile=inputs.compile)


def make_plan(inputs: PlanInputs, n_layers: int) -> Plan:
    candidates, refused = valid_candidates(inputs, n_layers)
    preds = [predict(c, inputs.hardware, compile=inputs.compile) for c in candidates]
    ranked = sorted((p for p in preds if p.fits), key=lambda p: -p.speed.tokens_per_s_per_gpu)
    too_big = sorted((p for p in preds if not p.fits), key=lambda p: p.memory.total)
    return Plan(inputs=inputs, ranked=ranked, too_big=too_big, refused=refused)


def table(plan: Plan, top: int = 10) -> str:
    hw = plan.inputs.hardware
    width = max([len(p.layout.describe()) for p in plan.ranked[:top]] + [40])
    head = (f"{'#':>3}  {'layout':<{width}} {'tok/s/GPU':>10} {'TFLOPS':>7} {'MFU':>6} {'step s':>8} "
            f"{'peak GiB':>9} {'state':>7} {'act':>7} {'exposed comm s':>15}")
    lines = [head, "-" * len(head)]
    for i, p in enumerate(plan.ranked[:top], 1):
        m, s = p.memory, p.step
        comm = s.fsdp_exposed + s.tp + s.cp + s.pp_p2p
        lines.append(
            f"{i:>3}  {p.layout.describe():<{width}} {p.speed.tokens_per_s_per_gpu:>10.0f} {p.speed.tflops_per_gpu:>7.1f} "
            f"{p.speed.mfu:>6.1%} {s.total:>8.3f} {m.total / GIB:>9.1f} {m.state.total / GIB:>7.1f} "
            f"{m.activations / GIB:>7.1f} {comm:>15.3f}"
        )
    lines.append(
        f"{len(plan.ranked)} layouts fit in {hw.hbm_gib:.0f} GiB - {hw.reserved_gib:.0f} GiB reserved on {hw.name}; "
        f"{len(plan.too_big)} valid ones do not; {sum(plan.refused.values())} refused by the trainer's checks"
    )
    return "\n".join(lines)


def explain(p: Prediction, hw: HardwareProfile) -> str:
    """Every item of one layout's memory and step-time prediction."""
    L, m, s = p.layout, p.memory, p.step
    out = [f"layout: {L.describe()}  (world {L.world_size})", "  config overrides: " + shlex.join(L.overrides())]
    out.append(f"  peak memory (pipeline rank {m.pp_rank}): {m.total / GIB:.2f} GiB "
               f"+ {hw.reserved_gib:.1f} GiB reserved vs {hw.hbm_gib:.1f} GiB -> {'fits' if p.fits else 'DOES NOT FIT'}")
    for k, v in m.items().items():
        if k != "total":
            out.append(f"    {k:<13} {v / GIB:9.3f} GiB")
    # The items do not all coexist: the peak is params + optimizer + the largest phase (+ margin).
    phases = m.phases()
    out.append("  above params + optimizer, by phase: " + ", ".join(
        f"{k.replace('_', ' ')} {v / GIB:.3f} GiB" + (" (the peak)" if k == m.peak_phase else "")
        for k, v in phases.items()))
    out.append(f"  step time: {s.total:.4f} s")
    for k, v in s.items().items():
        if k not in ("total",):
            out.append(f"    {k:<12} {v:9.4f} s")
    out.append(f"  throughput: {p.speed.tokens_per_s_per_gpu:.0f} tokens/s/GPU, {p.speed.tflops_per_gpu:.1f} TFLOPS/GPU, "
               f"MFU {p.speed.mfu:.1%} (of {hw.peak_bf16_tflops:.0f} bf16 TFLOPS)")
    return "\n".join(out)


def winner_toml(p: Prediction) -> str:
    """The winning layout as a complete config TOML (the base job with the layout applied)."""
    header = (f"# Written by tools/plan.py: {p.layout.describe()}, predicted {p.speed.tokens_per_s_per_gpu:.0f} "
              f"tokens/s/GPU, peak {p.memory.total / GIB:.1f} GiB per GPU.\n")
    return header + to_toml(p.candidate.cfg)
