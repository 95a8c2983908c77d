"""The pipeline split accepts stage counts above n_layers when every stage has work.

`split_fqns` (torchtitan_like/distributed/pipeline.py) counts the embedding as
`pipeline_parallel_first_stage_less_layers` units of work and norm + output as
`pipeline_parallel_last_stage_less_layers`, and explicitly lets the first and the last stage own no
transformer layer (they own tok_embeddings / norm + output). Its first check once refused any
`num_stages > n_layers`, so a split of n_layers + 2 stages (one unit of work each: [tok_embeddings],
[layers.0], ..., [norm, output]) was refused when it came from the default stage count or from
`pipeline_parallel_layers_per_stage = 1`, while the very same split given as
`module_fqns_per_model_part` was accepted and builds.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from torchtitan_like.config.schema import Parallelism
from torchtitan_like.distributed.pipeline import plan_pipeline, split_fqns
from torchtitan_like.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

# debugmodel: 6 layers. One unit of work per stage with the default *_less_layers = 1: 8 stages.
ONE_UNIT_PER_STAGE = [["tok_embeddings"]] + [[f"layers.{i}"] for i in range(6)] + [["norm", "output"]]


def _plan(**kw):
    p = Parallelism(pipeline_parallel_degree=kw.pop("pp", 4), **kw)
    return plan_pipeline(p, n_layers=6, local_batch_size=8, tie_word_embeddings=False, compile_model=False)


def test_explicit_one_unit_per_stage_split_is_accepted_and_builds() -> None:
    """The 8-stage split is a working layout: the dry run builds it on the first and the last pp rank."""
    from torchtitan_like.dry_run import dry_run

    plan = _plan(pipeline_parallel_schedule="Interleaved1F1B", module_fqns_per_model_part=ONE_UNIT_PER_STAGE)
    assert plan.num_stages == 8 and plan.stage_ids(0) == [0, 4] and plan.stage_ids(3) == [3, 7]
    # split_fqns itself accepts first/last stages without a transformer layer in other layouts:
    assert [sum(f.startswith("layers.") for f in s) for s in split_fqns(6, 4, first_less=2, last_less=2)] == [0, 3, 3, 0]

    logging.disable(logging.CRITICAL)
    try:
        explicit = ";".join(",".join(part) for part in ONE_UNIT_PER_STAGE)
        argv = [
            "--job.config_file", str(ROOT / "train_configs/debug_model.toml"), "--training.dataset", "synthetic",
            "--training.seq_len", "64", "--training.local_batch_size", "8",
            "--parallelism.pipeline_parallel_degree", "4", "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
            "--parallelism.module_fqns_per_model_part", explicit,
        ]
        for rank in (0, 3):
            report = dry_run(argv, world_size=4, rank=rank, device="cuda", files=False)
            assert report["stages"] == plan.stage_ids(rank)
    finally:
        logging.disable(logging.NOTSET)


def test_layers_per_stage_one_gives_one_unit_per_stage() -> None:
    # "Transformer layers per pipeline stage (counting the embedding and output as *_less_layers)":
    # with the defaults (1 and 1), layers_per_stage = 1 means 6 + 1 + 1 = 8 stages of one unit each.
    plan = _plan(pipeline_parallel_schedule="Interleaved1F1B", pipeline_parallel_layers_per_stage=1)
    assert [list(s) for s in plan.fqns_per_stage] == ONE_UNIT_PER_STAGE


def test_default_interleaved_split_with_one_unit_per_stage() -> None:
    # Interleaved1F1B defaults to 2 stages per rank: pp=4 -> 8 stages; 8 units of work shared evenly
    # gives exactly the explicit split above, which builds.
    plan = _plan(pipeline_parallel_schedule="Interleaved1F1B")
    assert [list(s) for s in plan.fqns_per_stage] == ONE_UNIT_PER_STAGE


def test_more_stages_than_layers_plus_the_embedding_and_output_are_refused() -> None:
    with pytest.raises(ConfigError, match="9 stages over a model with 6 layers .* use at most 8 stages"):
        split_fqns(6, 9)
    with pytest.raises(ConfigError, match="use at most 6 stages"):
        split_fqns(6, 7, first_less=0, last_less=0)
