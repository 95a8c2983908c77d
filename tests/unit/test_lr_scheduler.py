"""LR schedule: linear warmup, stable phase, linear/sqrt/cosine decay to min_lr_factor, state round trip.

The lr of step k (0-based) is the one the optimizer holds when step k runs: read before
`optimizer.step()`, then `scheduler.step()` moves to step k + 1.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from torchtitan_like.components.lr_scheduler import build_lr_scheduler
from torchtitan_like.config.schema import LRScheduler

PEAK = 0.5


def make(cfg: LRScheduler, steps: int) -> tuple[torch.optim.Optimizer, LambdaLR]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=PEAK)
    return opt, build_lr_scheduler(opt, cfg, steps=steps)


def run(opt: torch.optim.Optimizer, sched: LambdaLR, n: int) -> list[float]:
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def factors(cfg: LRScheduler, steps: int) -> list[float]:
    """lr / optimizer.lr for every step of the run."""
    return [lr / PEAK for lr in run(*make(cfg, steps), steps)]


def test_is_a_lambda_lr() -> None:
    _, sched = make(LRScheduler(), 100)
    assert isinstance(sched, LambdaLR)


def test_warmup_is_linear_from_one_over_w_plus_one_to_the_peak() -> None:
    got = factors(LRScheduler(warmup_steps=4, decay_ratio=0.0), 10)
    assert got == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5, 1, 1, 1, 1, 1, 1])


# warmup 2, 10 steps, decay_ratio 0.4 -> 4 of the 10 steps decay (6-9), the 4 before them are stable (2-5).
# Decay progress at steps 6..9 is 1/4, 2/4, 3/4, 1; lr factor = 0.2 + 0.8 * remaining(progress).
WSD = LRScheduler(warmup_steps=2, decay_ratio=0.4, min_lr_factor=0.2)
S = math.sqrt(0.5)


@pytest.mark.parametrize(
    "decay_type, decay",
    [
        ("linear", [0.8, 0.6, 0.4, 0.2]),
        ("sqrt", [0.6, 0.2 + 0.8 * (1 - S), 0.2 + 0.8 * (1 - math.sqrt(0.75)), 0.2]),
        ("cosine", [0.2 + 0.4 * (1 + S), 0.6, 0.2 + 0.4 * (1 - S), 0.2]),
    ],
)
def test_hand_computed_warmup_stable_decay(decay_type: str, decay: list[float]) -> None:
    cfg = LRScheduler(warmup_steps=WSD.warmup_steps, decay_ratio=WSD.decay_ratio, decay_type=decay_type,  # type: ignore[arg-type]
                      min_lr_factor=WSD.min_lr_factor)
    got = factors(cfg, 10)
    assert got == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1, *decay])


@pytest.mark.parametrize("decay_type", ["linear", "sqrt", "cosine"])
@pytest.mark.parametrize("min_lr_factor", [0.0, 0.1])
@pytest.mark.parametrize("decay_ratio", [None, 0.3])
def test_decay_ends_at_min_lr_factor(decay_type: str, min_lr_factor: float, decay_ratio: float | None) -> None:
    cfg = LRScheduler(warmup_steps=5, decay_ratio=decay_ratio, decay_type=decay_type, min_lr_factor=min_lr_factor)  # type: ignore[arg-type]
    got = factors(cfg, 55)
    assert got[-1] == pytest.approx(min_lr_factor)
    after_warmup = got[5:]
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:])), "the lr never rises after warmup"
    assert min(got[:-1]) > min_lr_factor, "min_lr_factor is reached at the last step, not before"
    # Past the end of the run the lr stays at the floor.
    opt, sched = make(cfg, 55)
    assert run(opt, sched, 60)[-1] / PEAK == pytest.approx(min_lr_factor)


@pytest.mark.parametrize(
    "steps, warmup, decay_ratio, stable",
    [
        (110, 10, 0.2, 78),  # decay = 0.2 x 110 = 22 of all the steps; stable = 110 - 10 - 22
        (100, 0, 0.25, 75),
        (50, 10, 1.0, 0),  # asks for 50 decay steps, 40 follow the warmup: decay over those (a warning)
        (50, 10, None, 0),  # unset = decay over every step after warmup
        (50, 10, 0.0, 40),  # no decay at all
        (10, 5, 0.05, 4),  # 0.05 x 10 rounds to 0, but a ratio above 0 decays at least one step
    ],
)
def test_decay_ratio_sets_the_stable_phase(steps: int, warmup: int, decay_ratio: float | None, stable: int) -> None:
    got = factors(LRScheduler(warmup_steps=warmup, decay_ratio=decay_ratio, min_lr_factor=0.1), steps)
    assert all(f < 1 for f in got[:warmup])
    assert got[warmup:warmup + stable] == [1.0] * stable
    if warmup + stable < steps:
        assert all(f < 1 for f in got[warmup + stable:])
        decay_steps = steps - warmup - stable
        # Linear decay: each decaying step takes the same bite out of (1 - min_lr_factor).
        assert got[warmup + stable] == pytest.approx(0.1 + 0.9 * (1 - 1 / decay_steps))
        assert got[-1] == pytest.approx(0.1)


def test_no_warmup_starts_decaying_at_step_zero() -> None:
    got = factors(LRScheduler(warmup_steps=0, min_lr_factor=0.0), 4)
    assert got == pytest.approx([0.75, 0.5, 0.25, 0.0])


def test_state_dict_round_trip_resumes_the_schedule() -> None:
    cfg = LRScheduler(warmup_steps=3, decay_ratio=0.5, decay_type="cosine", min_lr_factor=0.1)
    opt, sched = make(cfg, 20)
    run(opt, sched, 7)
    # The scheduler is part of a checkpoint: its state (and its lambda) must pickle.
    sched_state = pickle.loads(pickle.dumps(sched.state_dict()))
    opt_state = pickle.loads(pickle.dumps(opt.state_dict()))
    pickle.dumps(sched.lr_lambdas[0])
    assert sched_state["last_epoch"] == 7

    opt2, sched2 = make(cfg, 20)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    assert sched2.last_epoch == 7 and sched2.get_last_lr() == sched.get_last_lr()
    assert run(opt2, sched2, 13) == run(opt, sched, 13)


def test_total_steps_sets_the_curve_whatever_the_run_length(caplog) -> None:
    """lr_scheduler.total_steps (torchtitan's key): a short run follows the first steps of the long run's
    curve, and a run past the schedule keeps its final learning rate."""
    import logging

    from torchtitan_like.components.lr_scheduler import phases
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.config.validate import ignored_settings
    from torchtitan_like.errors import ConfigError

    cfg = LRScheduler(warmup_steps=10, decay_ratio=0.5, decay_type="cosine", min_lr_factor=0.1)
    full = factors(cfg, 100)
    assert factors(LRScheduler(**{**vars(cfg), "total_steps": 100}), 30) == full[:30]
    assert phases(LRScheduler(**{**vars(cfg), "total_steps": 100}), steps=30) == phases(cfg, steps=100)
    with caplog.at_level(logging.WARNING):
        longer = factors(LRScheduler(**{**vars(cfg), "total_steps": 100}), 120)
    assert longer[:100] == full and longer[100:] == [full[-1]] * 20 and full[-1] == pytest.approx(0.1)
    assert "training.steps=120 runs past lr_scheduler.total_steps=100: its last 20 steps keep the schedule's final" in caplog.text
    # Inside a warmup longer than total_steps the ramp goes on: the warning said the lr was held (it was not).
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ramp = factors(LRScheduler(warmup_steps=10, total_steps=4), 8)
    assert ramp == pytest.approx([(i + 1) / 11 for i in range(8)])
    assert ("training.steps=8 runs past lr_scheduler.total_steps=4, inside lr_scheduler.warmup_steps=10: the warmup "
            "goes on ramping (the last step at 73% of optimizer.lr)") in caplog.text
    assert "keep the schedule's final" not in caplog.text
    with pytest.raises(ConfigError, match=r"lr_scheduler.total_steps=0 is out of range: must be >= 1"):
        load_config(["--lr_scheduler.total_steps", "0"])
    assert ignored_settings(load_config(["--debug.deterministic_warn_only"]), pp=1) == [
        "debug.deterministic_warn_only (debug.deterministic=false)"]


# ---- what README says of the schedule, and of torchtitan 0.2.2's ------------------------------------------------


def torchtitan_factor(step: int, *, steps: int, warmup: int, decay_ratio: float | None, decay_type: str,
                      min_lr_factor: float) -> float:
    """torchtitan 0.2.2's factor for 0-based `step` of a `steps`-step schedule, restated from its formula: the warmup
    is cut to the schedule, its stable phase has one step more than the steps left by warmup and decay, and step s
    of the decay (s >= warmup + stable) is at progress (s + 1 - warmup - stable) / decay."""
    warmup = min(warmup, steps)
    decay = steps - warmup if decay_ratio is None else min(round(steps * decay_ratio), steps - warmup)
    stable = steps + 1 - warmup - decay
    if step < warmup:
        return (step + 1) / warmup
    if step < warmup + stable:
        return 1.0
    p = (step + 1 - warmup - stable) / decay
    remaining = {"linear": 1 - p, "sqrt": 1 - math.sqrt(p), "cosine": 0.5 * (1 + math.cos(math.pi * p))}[decay_type]
    return min_lr_factor + (1 - min_lr_factor) * remaining


def _readme_row(name: str) -> list[float]:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    rows = [line for line in readme.splitlines() if line.startswith(f"| {name} | ")]
    assert len(rows) == 1, f"README.md has {len(rows)} schedule example rows for {name!r}, not 1"
    return [float(v) for v in rows[0].split("|")[2].split()]


def test_the_readme_example_is_our_schedule_and_torchtitans() -> None:
    """README's example (10 steps, warmup 2, decay_ratio unset, min_lr_factor 0.1): our factors, read from the
    scheduler, and torchtitan 0.2.2's."""
    cfg = LRScheduler(warmup_steps=2, min_lr_factor=0.1)
    assert _readme_row("ours") == pytest.approx(factors(cfg, 10), abs=1e-4)
    theirs = [torchtitan_factor(s, steps=10, warmup=2, decay_ratio=None, decay_type="linear", min_lr_factor=0.1)
              for s in range(10)]
    assert _readme_row("torchtitan 0.2.2") == pytest.approx(theirs, abs=1e-4)


@pytest.mark.parametrize("decay_type", ["linear", "sqrt", "cosine"])
@pytest.mark.parametrize("min_lr_factor", [0.0, 0.1])
@pytest.mark.parametrize(
    "steps, warmup, decay_ratio",
    [(10, 2, None), (10, 2, 0.5), (10, 0, None), (10, 0, 0.3), (10, 3, 1.0), (10, 10, None), (1, 0, None),
     (10, 5, 0.04), (500, 50, 0.2), (97, 13, 0.37)],
)
def test_torchtitans_schedule_differs_from_ours_as_the_readme_says(
    steps: int, warmup: int, decay_ratio: float | None, decay_type: str, min_lr_factor: float
) -> None:
    """README (Training): with the warmup inside the schedule, torchtitan 0.2.2's warmup is k/W where ours is
    k/(W+1), and after it its factor at each step is ours of the step before (1 after our warmup): its curve is
    ours one step later, so never below it. Ours ends at min_lr_factor; its last step one decay step above."""
    cfg = LRScheduler(warmup_steps=warmup, decay_ratio=decay_ratio, decay_type=decay_type,  # type: ignore[arg-type]
                      min_lr_factor=min_lr_factor)
    ours = factors(cfg, steps)
    theirs = [torchtitan_factor(s, steps=steps, warmup=warmup, decay_ratio=decay_ratio, decay_type=decay_type,
                                min_lr_factor=min_lr_factor) for s in range(steps)]
    assert ours[:warmup] == pytest.approx([(k + 1) / (warmup + 1) for k in range(warmup)])
    assert theirs[:warmup] == pytest.approx([(k + 1) / warmup for k in range(warmup)])
    assert theirs[warmup:] == pytest.approx([ours[s - 1] if s > warmup else 1.0 for s in range(warmup, steps)])
    if warmup < steps and decay_ratio != 0:
        assert ours[-1] == pytest.approx(min_lr_factor)  # (a ratio that rounds to no step still decays one)


def test_torchtitan_cuts_a_warmup_longer_than_the_schedule_and_ours_keeps_its_ramp() -> None:
    """README (Training): 10 steps, warmup_steps 12: torchtitan 0.2.2 reaches the peak at step 10, ours 10/13."""
    ours = factors(LRScheduler(warmup_steps=12), 10)
    theirs = [torchtitan_factor(s, steps=10, warmup=12, decay_ratio=None, decay_type="linear", min_lr_factor=0.0)
              for s in range(10)]
    assert ours == pytest.approx([k / 13 for k in range(1, 11)])
    assert theirs == pytest.approx([k / 10 for k in range(1, 11)])
