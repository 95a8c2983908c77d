"""The dry run and the planner know each rank's state memory exactly, for a 3D layout.

The other layouts (FSDP, HSDP, DDP, TP, FSDP x TP, PP x FSDP, PP x TP, CP alone and with FSDP /
TP / PP) are checked at the end of their parity tests (test_trainer_parity.py, test_pipeline.py,
test_context_parallel.py), on the same runs. Here: PP(2) x FSDP(2) x TP(2) on 8 ranks, every rank,
for two steps (the state exists after the first).
"""

from __future__ import annotations

from pathlib import Path

from harness import run_on_ranks
from trainer_runs import LAYOUTS, assert_state_matches_dry_run, train_run, trainer_argv


def test_3d_state_bytes_equal_dry_run_and_planner_on_every_rank(tmp_path: Path) -> None:
    world, _ = LAYOUTS["pp2xfsdp2xtp2"]
    argv = trainer_argv(tmp_path / "run", "pp2xfsdp2xtp2", steps=2)
    ranks = run_on_ranks(train_run, world_size=world, tmp_path=tmp_path, args=(argv,), timeout_s=300)
    assert all(len(r["history"]) == 2 for r in ranks)
    # Ranks differ: pipeline rank 0 holds the embedding, rank 1 the output; TP and FSDP split each.
    assert len({r["state"]["params"] for r in ranks}) > 1
    assert_state_matches_dry_run(argv, world, ranks, check_ranks=list(range(world)))
