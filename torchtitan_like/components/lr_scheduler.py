"""Linear warmup, then warmup-stable-decay (WSD) with a linear, sqrt or cosine decay."""

from __future__ import annotations

import functools
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from torchtitan_like.config.schema import LRScheduler


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


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: LRScheduler, *, steps: int) -> LambdaLR:
    warmup = min(cfg.warmup_steps, steps)
    after = steps - warmup
    decay = after if cfg.decay_ratio is None else round(cfg.decay_ratio * after)
    fn = functools.partial(
        lr_factor,
        warmup_steps=warmup,
        stable_steps=after - decay,
        decay_steps=decay,
        decay_type=cfg.decay_type,
        min_lr_factor=cfg.min_lr_factor,
    )
    return LambdaLR(optimizer, fn)


class LRSchedulers:
    """One LambdaLR per optimizer (one optimizer per pipeline model part), stepped together.

    They share a schedule, so they are always in the same state: the checkpoint holds the first
    one's state, which is what a single-part run saves, and loading applies it to all of them. A
    checkpoint therefore resumes under any number of model parts.
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
        return self.schedulers[0].state_dict()

    def load_state_dict(self, state: dict) -> None:
        for s in self.schedulers:
            s.load_state_dict(state)


def build_lr_schedulers(optimizers: list[torch.optim.Optimizer], cfg: LRScheduler, *, steps: int) -> LRSchedulers:
    return LRSchedulers([build_lr_scheduler(opt, cfg, steps=steps) for opt in optimizers])
