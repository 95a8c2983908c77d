"""Error messages suggest only values that the next checks accept.

README: "Rules, checked before any model is built (each error names the keys and suggests values)".

- ParallelDims.validate (parallel_dims.py): a tensor_parallel_degree that does not divide the heads
  once got "try" + every divisor of gcd(n_heads, n_kv_heads), whatever the world size: on 6 GPUs the
  debug model's "try 1, 2, 4 or 8" offered 4 and 8, which from_config then refuses (they do not divide 6).
- plan_pipeline (pipeline.py): a microbatch size that does not divide local_batch_size once got every
  divisor of local_batch_size, whatever the schedule: with 1F1B over 4 ranks and local_batch_size 8,
  "try a microbatch size of 1, 2, 4 or 8" offered 4 and 8, which give 2 and 1 microbatches, and
  1F1B then refuses them (it needs at least 4).
"""

from __future__ import annotations

import re

import pytest

from torchtitan_like.config.schema import Parallelism, Training
from torchtitan_like.distributed.parallel_dims import ParallelDims
from torchtitan_like.distributed.pipeline import plan_pipeline
from torchtitan_like.errors import ConfigError
from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS

DEBUG = LLAMA3_FLAVORS["debugmodel"].with_seq_len(64)


def _suggested(msg: str, prefix: str) -> list[int]:
    tail = msg.split(prefix, 1)[1]
    return [int(v) for v in re.findall(r"\d+", tail)]


def _tp_refusals(world: int, tp: int) -> tuple[str, list[int]]:
    pd = ParallelDims.from_config(Parallelism(tensor_parallel_degree=tp), world)
    with pytest.raises(ConfigError) as e:
        pd.validate(model_args=DEBUG, training=Training(seq_len=64, local_batch_size=1))
    msg = str(e.value)
    refused = []
    for value in _suggested(msg, "try "):
        try:
            ParallelDims.from_config(Parallelism(tensor_parallel_degree=value), world).validate(
                model_args=DEBUG, training=Training(seq_len=64, local_batch_size=1)
            )
        except ConfigError:
            refused.append(value)
    return msg, refused


def test_every_suggested_tp_degree_is_accepted() -> None:
    _, refused = _tp_refusals(6, 3)
    assert refused == []


def _mbs_refusals() -> tuple[str, list[int]]:
    def plan(mbs: int):
        p = Parallelism(pipeline_parallel_degree=4, pipeline_parallel_schedule="1F1B", pipeline_parallel_microbatch_size=mbs)
        return plan_pipeline(p, n_layers=6, local_batch_size=8, tie_word_embeddings=False, compile_model=False)

    with pytest.raises(ConfigError) as e:
        plan(3)
    msg = str(e.value)
    refused = []
    for value in _suggested(msg, "try a microbatch size of "):
        try:
            plan(value)
        except ConfigError:
            refused.append(value)
    return msg, refused


def test_every_suggested_microbatch_size_is_accepted() -> None:
    _, refused = _mbs_refusals()
    assert refused == []
