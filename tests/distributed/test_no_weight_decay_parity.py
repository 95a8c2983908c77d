"""optimizer.no_weight_decay_keywords trains the same model under FSDP x TP and pipeline parallel as in one
process, and a pipeline run resumed from a checkpoint continues it: the stages hold different numbers of
param groups (the first stage one, the second two), which the learning-rate schedule's checkpoint state
must not depend on (without that, the first stage failed to load the second's state; the reverse
direction is tests/unit/test_no_weight_decay.py's resume).

Weight decay 0.5 on the rest: over the first steps' lr (3e-4 .. 1.2e-3, warmup) a parameter that decays
where it should not, or the reverse, moves by ~1e-3 of its size (norm weights are 1 at the start), fifty
times the weights' tolerance.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import run_on_ranks
from trainer_runs import LAYOUTS, assert_same_training, merged_params, train_run, trainer_argv

STEPS = 4
# The first stage of pp2 holds tok_embeddings and layers.0: the patterns name nothing there, and the
# norms of the second stage (layers.1, norm, output).
DECAY = ("--optimizer.weight_decay", "0.5", "--optimizer.no_weight_decay_keywords", "norm.*,layers.1.*norm*")


def _argv(dump: Path, layout: str, *extra: str) -> list[str]:
    return trainer_argv(dump, layout, *DECAY, *extra, steps=STEPS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("reference")
    (ref,) = run_on_ranks(train_run, world_size=1, tmp_path=tmp, args=(_argv(tmp / "run", "one"),))
    return ref


def test_the_keywords_change_training(reference: dict, tmp_path: Path) -> None:
    """Without the keywords (every parameter decays) the weights they name end elsewhere."""
    argv = trainer_argv(tmp_path / "run", "one", "--optimizer.weight_decay", "0.5", steps=STEPS)
    (decay_all,) = run_on_ranks(train_run, world_size=1, tmp_path=tmp_path, args=(argv,))
    for name in ("norm.weight", "layers.1.attention_norm.weight"):
        gap = (decay_all["params"][name] - reference["params"][name]).abs().max().item()
        assert gap > 5e-4, f"{name}: {gap}"
    for name in ("layers.0.attention_norm.weight", "output.weight"):  # decayed in both runs
        gap = (decay_all["params"][name] - reference["params"][name]).abs().max().item()
        assert gap < 1e-4, f"{name}: {gap}"


@pytest.mark.parametrize("layout", ["fsdp2xtp2", "pp2"])
def test_layout_matches_one_process(layout: str, reference: dict, tmp_path: Path) -> None:
    world, _ = LAYOUTS[layout]
    ranks = run_on_ranks(train_run, world_size=world, tmp_path=tmp_path, args=(_argv(tmp_path / "run", layout),),
                         timeout_s=300)
    params = merged_params(ranks) if layout.startswith("pp") else ranks[0]["params"]
    for r, out in enumerate(ranks):
        assert_same_training(out, reference, f"{layout} rank {r}", params=params if r == 0 else None)


def test_pipeline_resume_with_stages_of_different_group_counts(reference: dict, tmp_path: Path) -> None:
    world, _ = LAYOUTS["pp2"]
    argv = _argv(tmp_path / "run", "pp2", "--checkpoint.enable", "--checkpoint.interval", "2")
    crashed = run_on_ranks(train_run, world_size=world, tmp_path=tmp_path, args=(argv, 3), timeout_s=300)
    assert all(r["crashed"] for r in crashed)
    resumed = run_on_ranks(train_run, world_size=world, tmp_path=tmp_path, args=(argv,), timeout_s=300)
    for r, (before, after) in enumerate(zip(crashed, resumed, strict=True)):
        assert [h["step"] for h in after["history"]] == [3, 4], f"rank {r}: it resumed from step 2"
        joined = {**after, "history": before["history"] + after["history"]}
        assert_same_training(joined, reference, f"pp2 resumed, rank {r}", params=merged_params(resumed) if r == 0 else None)
