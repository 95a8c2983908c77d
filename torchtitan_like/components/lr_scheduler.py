"""Linear warmup, then warmup-stable-decay (WSD) with a linear, sqrt or cosine decay."""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from torchtitan_like.config.schema import LRScheduler

logger = logging.getLogger(__name__)


def lr_factor(step: int, *, warmup_steps: int, stable_steps: int, decay_steps: int, decay_type: str, min_lr_factor: float) -> float:
    """Multiplier of optimizer.lr for 0-based `step` (the step about to run)."""
    if step < warmup_steps:
        # (step + 1) / (warmup + 1): the first step already moves, and warmup ends just below the peak.
        return (step + 1) / (warmup_steps + 1)
    if step < warmup_steps + stable_steps or decay_steps == 0:
        return 1.0
    progress = min(1.0, (step - warmup_steps - stable_steps + 1) / decay_steps)
    if decay_type == "linear":
        remaining = 1.0 - progress
    elif decay_type == "sqrt":
        remaining = 1.0 - math.sqrt(progress)
    elif decay_type == "cosine":
        remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise AssertionError(decay_type)
    return min_lr_factor + (1.0 - min_lr_factor) * remaining


@dataclass(frozen=True)
class Phases:
    """Steps of warmup, stable and decay of a run of `steps` steps (warmup may outlast the run)."""

    warmup: int
    stable: int
    decay: int


def phases(cfg: LRScheduler, *, steps: int) -> Phases:
    """The schedule's phases over lr_scheduler.total_steps (unset: the run's `steps`), as torchtitan reads
    the same keys: decay_ratio is a fraction of all those steps, decaying at the end (at least one step
    when it is above 0); unset, every step after warmup decays. Nothing the user set is changed silently:
    a warmup longer than the schedule keeps its ramp (it ends during it, and a longer run resumed from it
    continues the same ramp), a decay that does not fit after the warmup is shortened, and a run longer
    than total_steps keeps the final learning rate, each with a warning."""
    if steps == 0 and not cfg.total_steps:
        return Phases(warmup=cfg.warmup_steps, stable=0, decay=0)  # (an evaluation: nothing trains, nothing to warn)
    span, key = (cfg.total_steps, "lr_scheduler.total_steps") if cfg.total_steps else (steps, "training.steps")
    warmup = cfg.warmup_steps
    after = max(0, span - warmup)
    if warmup > span:
        logger.warning(
            "lr_scheduler.warmup_steps=%d is longer than %s=%d: the %s ends during warmup, at %.0f%% of "
            "optimizer.lr", warmup, key, span, "run" if key == "training.steps" else "schedule", 100 * span / (warmup + 1),
        )
    if cfg.decay_ratio is None:
        decay = after
    else:
        decay = round(cfg.decay_ratio * span)
        if cfg.decay_ratio > 0:
            decay = max(1, decay)
        if decay > after:
            logger.warning(
                "lr_scheduler.decay_ratio=%g of %s=%d asks for %d decay steps, but only %d follow the "
                "warmup: decaying over those %d", cfg.decay_ratio, key, span, decay, after, after,
            )
            decay = after
    if steps > span and warmup > span:
        # (The ramp is not cut at total_steps: a run that goes on continues it, as a resumed longer run does.)
        last = lr_factor(steps - 1, warmup_steps=warmup, stable_steps=after - decay, decay_steps=decay,
                         decay_type=cfg.decay_type, min_lr_factor=cfg.min_lr_factor)
        logger.warning(
            "training.steps=%d runs past lr_scheduler.total_steps=%d, inside lr_scheduler.warmup_steps=%d: the "
            "warmup goes on ramping%s (the last step at %.0f%% of optimizer.lr)", steps, span, warmup,
            "" if steps <= warmup else ", then optimizer.lr holds", 100 * last,
        )
    elif steps > span:
        logger.warning(
            "training.steps=%d runs past lr_scheduler.total_steps=%d: its last %d steps keep the schedule's final "
            "learning rate", steps, span, steps - span,
        )
    return Phases(warmup=warmup, stable=after - decay, decay=decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: LRScheduler, *, steps: int,
                       schedule: Phases | None = None) -> LambdaLR:
    p = schedule if schedule is not None else phases(cfg, steps=steps)
    fn = functools.partial(
        lr_factor,
        warmup_steps=p.warmup,
        stable_steps=p.stable,
        decay_steps=p.decay,
        decay_type=cfg.decay_type,
        min_lr_factor=cfg.min_lr_factor,
    )
    return LambdaLR(optimizer, fn)


class LRSchedulers:
    """One LambdaLR per optimizer (one optimizer per pipeline model part), stepped together.

    They share a schedule, so they are always in the same state: the checkpoint holds the first
    one's state, which is what a single-part run saves, and loading applies it to all of them. A
    checkpoint therefore resumes under any number of model parts.

    Every param group follows that schedule too (optimizer.no_weight_decay_keywords splits a part's
    parameters into two groups, or leaves one where the part has nothing it names), so the per-group
    lists of the state keep one entry: the state is the same on every pipeline rank, and it loads into
    any number of groups (LambdaLR itself refuses a state with more groups than its optimizer).
    """

    def __init__(self, schedulers: list[LambdaLR]):
        if not schedulers:
            raise ValueError("LRSchedulers needs at least one scheduler")
        self.schedulers = schedulers

    def step(self) -> None:
        for s in self.schedulers:
            s.step()

    def get_last_lr(self) -> list[float]:
        return self.schedulers[0].get_last_lr()

    def state_dict(self) -> dict:
        state = self.schedulers[0].state_dict()
        return {k: v[:1] if k in _PER_GROUP else v for k, v in state.items()}

    def load_state_dict(self, state: dict) -> None:
        for s in self.schedulers:
            groups = len(s.optimizer.param_groups)
            s.load_state_dict({k: v[:1] * groups if k in _PER_GROUP else v for k, v in state.items()})


# LambdaLR's state entries that hold one item per param group.
_PER_GROUP = ("base_lrs", "_last_lr", "lr_lambdas")


def build_lr_schedulers(optimizers: list[torch.optim.Optimizer], cfg: LRScheduler, *, steps: int) -> LRSchedulers:
    schedule = phases(cfg, steps=steps)  # (its warnings once, not once per model part)
    return LRSchedulers([build_lr_scheduler(opt, cfg, steps=steps, schedule=schedule) for opt in optimizers])
