"""ParallelDims' errors suggest only what the next checks accept: TP degrees that also fit the sequence
under CP and the global batch, and data_parallel_shard_degree=-1 only where the other degrees divide
the world size; with nothing to suggest, a ConfigError that says what else to change."""

from __future__ import annotations

import re

import pytest

from torchtitan_like.config.schema import Parallelism, Training
from torchtitan_like.distributed.parallel_dims import ParallelDims
from torchtitan_like.errors import ConfigError
from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS


def _suggested_tp(msg: str) -> list[int]:
    """The TP degrees after "try " in a tensor_parallel_degree error ([] if it suggests none)."""
    if "try " not in msg:
        return []
    return [int(v) for v in re.findall(r"\d+", msg.split("try ", 1)[1])]


def test_bad_tp_with_cp_and_no_fitting_suggestion_is_a_config_error() -> None:
    # world 6 = cp 2 x tp 3 (dp_shard -1 -> 1). tp 3 does not divide n_heads 16; seq_len 6 is not a
    # multiple of 2 x cp = 4, so no TP degree passes the suggestion filter and the list is empty.
    pd = ParallelDims.from_config(Parallelism(context_parallel_degree=2, tensor_parallel_degree=3), 6)
    args = LLAMA3_FLAVORS["debugmodel"].with_seq_len(6)
    with pytest.raises(ConfigError) as e:
        pd.validate(model_args=args, training=Training(seq_len=6, local_batch_size=1))
    assert "tensor_parallel_degree" in str(e.value) or "seq_len" in str(e.value)


def test_suggested_tp_degrees_fit_the_global_batch() -> None:
    # world 6, tp 3 -> dp_shard 2: global 4 = local 2 x dp 2 is fine. tp 1 or 2 would make dp_shard 6 or
    # 3 (it follows the world size), so global 4 is no longer a multiple of local x dp.
    training = Training(seq_len=64, local_batch_size=2, global_batch_size=4)
    args = LLAMA3_FLAVORS["debugmodel"].with_seq_len(64)
    pd = ParallelDims.from_config(Parallelism(tensor_parallel_degree=3), 6)
    with pytest.raises(ConfigError) as e:
        pd.validate(model_args=args, training=training)
    refused = []
    for tp in _suggested_tp(str(e.value)):
        try:
            ParallelDims.from_config(Parallelism(tensor_parallel_degree=tp), 6).validate(model_args=args, training=training)
        except ConfigError as err:
            refused.append((tp, str(err)))
    assert refused == [], f"suggested in {str(e.value)!r}, then refused: {refused}"


def test_product_mismatch_suggests_minus_one_only_when_it_works() -> None:
    # world 4 with tp 3: 3 does not divide 4, so -1 cannot fit either.
    with pytest.raises(ConfigError) as e:
        ParallelDims.from_config(Parallelism(tensor_parallel_degree=3, data_parallel_shard_degree=1), 4)
    msg = str(e.value)
    if "data_parallel_shard_degree=-1" in msg:
        ParallelDims.from_config(Parallelism(tensor_parallel_degree=3, data_parallel_shard_degree=-1), 4)
