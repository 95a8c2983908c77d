"""Resuming from a checkpoint continues the same training: exactly on the same layout, and within fp
tolerance when the checkpoint is loaded into another layout (resharding).

Every run is the real Trainer (trainer_runs.py): debug model, fp32, deterministic, 10 steps,
checkpoints every 5. A "crash" is SimulatedCrash raised at the start of step 6 on every rank, after
step 5's checkpoint is complete; a fresh Trainer in fresh processes, built from the same command
line, then finds step-5 in its dump folder and resumes from it. What must survive: weights, AdamW
state, LR schedule, the data stream position and the step (the loader deals out the same global
batches whatever the layout, so the stream continues exactly under another data-parallel degree).

The uninterrupted 10-step runs are computed once per module and shared: they are the references, and
their step-5 checkpoints seed the resharding chains.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from harness import run_on_ranks
from torchtitan_like.components.checkpoint import COMPONENTS
from torchtitan_like.components.manifest import complete_steps, dcp_contents
from trainer_runs import LAYOUTS, STEPS, train_run, trainer_argv

SAVE_EVERY = 5
CHECKPOINTS = ("--checkpoint.enable", "--checkpoint.interval", str(SAVE_EVERY))
# Resharding: the same training in another layout is the same up to fp32 rounding, not bitwise
# (other reduction orders); the tolerances and their reasons are those of test_trainer_parity.py.
# Seen here (with 20 steps): loss <= 2e-7, grad norm <= 6e-6 relative, weights <= 2e-6.
RTOL = 1e-4
NORM_RTOL = 1e-4
PARAM_ATOL = 2e-5


def run(layout: str, dump: Path, tmp_path: Path, *overrides: str, crash_at_step: int | None = None) -> list[dict]:
    world, _ = LAYOUTS[layout]
    argv = trainer_argv(dump, layout, *CHECKPOINTS, *overrides)
    # 300 s: a 10-step FSDP(2) x TP(2) run takes ~15 s on 2 idle cores, 2-3x that when they are shared.
    return run_on_ranks(train_run, world_size=world, tmp_path=tmp_path, args=(argv, crash_at_step), timeout_s=300)


class StraightRuns:
    """Uninterrupted 10-step runs (with their checkpoints on disk), one per layout, made on first use."""

    def __init__(self, root: Path):
        self.root = root
        self.runs: dict[str, dict] = {}

    def dump(self, layout: str) -> Path:
        return self.root / layout

    def __call__(self, layout: str) -> dict:
        if layout not in self.runs:
            ranks = run(layout, self.dump(layout), self.root)
            assert not ranks[0]["crashed"]
            assert [h["step"] for h in ranks[0]["history"]] == list(range(1, STEPS + 1))
            assert sorted(complete_steps(self.dump(layout) / "checkpoint")) == [SAVE_EVERY, STEPS]
            self.runs[layout] = ranks[0]
        return self.runs[layout]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> StraightRuns:
    return StraightRuns(tmp_path_factory.mktemp("straight"))


def _values(history: list[dict], key: str) -> list[float]:
    return [h[key] for h in history]


@pytest.mark.parametrize("layout", ["one", "fsdp2xtp2"])
def test_resume_after_crash_is_exact(layout: str, straight: StraightRuns, tmp_path) -> None:
    ref = straight(layout)
    dump = tmp_path / "run"

    crashed = run(layout, dump, tmp_path, crash_at_step=SAVE_EVERY + 1)
    assert all(r["crashed"] for r in crashed)
    # Up to the crash, the same training as the straight run (deterministic, same layout).
    assert crashed[0]["history"] == ref["history"][:SAVE_EVERY]
    ckpts = complete_steps(dump / "checkpoint")
    assert sorted(ckpts) == [SAVE_EVERY], "the crash must leave step-5 complete, and nothing after it"
    assert dcp_contents(ckpts[SAVE_EVERY]) == set(COMPONENTS)

    # A fresh Trainer with the same command line resumes from step-5 by itself.
    resumed = run(layout, dump, tmp_path)
    for r, out in enumerate(resumed):
        got, want = out["history"], ref["history"][SAVE_EVERY:]
        assert _values(got, "step") == list(range(SAVE_EVERY + 1, STEPS + 1)), f"rank {r}"
        # Bitwise: same layout, same reduction orders, every bit of state restored.
        assert _values(got, "loss") == _values(want, "loss"), f"rank {r}"
        assert _values(got, "grad_norm") == _values(want, "grad_norm"), f"rank {r}"
        assert _values(got, "lr") == _values(want, "lr"), f"rank {r}"
    params, want = resumed[0]["params"], ref["params"]
    assert params.keys() == want.keys()
    for name, w in want.items():
        assert torch.equal(params[name], w), f"{layout}: final {name} differs after resume"


# Each chain: the first layout's straight run saved step-5; load it under FSDP(2) x TP(2) and train to
# step 8 (saving there), "crash", then load step-8 under the last layout and train to step 10.
CHAINS = {
    "fsdp4-fsdp2xtp2-one": ("fsdp4", "fsdp2xtp2", "one"),
    "one-fsdp2xtp2-fsdp4": ("one", "fsdp2xtp2", "fsdp4"),
}


@pytest.mark.parametrize("chain", list(CHAINS))
def test_resume_under_other_layouts(chain: str, straight: StraightRuns, tmp_path) -> None:
    first, middle, last = CHAINS[chain]
    ref = straight(first)
    dump = tmp_path / "run"
    # The first layout's step-5, as if this run had saved it (a user copying a checkpoint over).
    saved = Path("checkpoint") / f"step-{SAVE_EVERY}"
    shutil.copytree(straight.dump(first) / saved, dump / saved)

    mid = run(middle, dump, tmp_path, "--checkpoint.interval", "4", crash_at_step=9)
    assert all(r["crashed"] for r in mid)
    assert sorted(complete_steps(dump / "checkpoint")) == [SAVE_EVERY, 8]
    end = run(last, dump, tmp_path, "--checkpoint.interval", "4")

    got = mid[0]["history"] + end[0]["history"]
    want = ref["history"][SAVE_EVERY:]
    assert _values(got, "step") == list(range(SAVE_EVERY + 1, STEPS + 1)), "resumed from the wrong step"
    assert _values(got, "lr") == _values(want, "lr")
    # A data stream resumed at the wrong position, or a lost optimizer state, is off by far more: the
    # loss changes by ~1e-1 from one step to the next.
    torch.testing.assert_close(
        torch.tensor(_values(got, "loss")), torch.tensor(_values(want, "loss")), rtol=RTOL, atol=0,
        msg=lambda m: f"{chain}: loss of steps 6-10: {m}",
    )
    torch.testing.assert_close(
        torch.tensor(_values(got, "grad_norm")), torch.tensor(_values(want, "grad_norm")), rtol=NORM_RTOL, atol=0,
        msg=lambda m: f"{chain}: grad norm of steps 6-10: {m}",
    )
    params, want_params = end[0]["params"], ref["params"]
    assert params.keys() == want_params.keys()
    for name, w in want_params.items():
        torch.testing.assert_close(
            params[name], w, rtol=0, atol=PARAM_ATOL, msg=lambda m: f"{chain}: final {name}: {m}"
        )
