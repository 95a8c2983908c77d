"""ParallelDims: degree resolution and every ConfigError of from_config / validate (no process group)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from torchtitan_like.config.schema import Parallelism, Training
from torchtitan_like.distributed.parallel_dims import ParallelDims
from torchtitan_like.errors import ConfigError
from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS

DEBUG = LLAMA3_FLAVORS["debugmodel"]  # n_heads 16, n_kv_heads 8


def _dims(world: int, **kw) -> ParallelDims:
    return ParallelDims.from_config(Parallelism(**kw), world)


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*args, **kwargs)
    return str(e.value)


# ---- resolution --------------------------------------------------------------------------------


def test_shard_degree_minus_one_takes_what_is_left() -> None:
    pd = _dims(8, data_parallel_replicate_degree=2, tensor_parallel_degree=2)
    assert (pd.dp_replicate, pd.dp_shard, pd.cp, pd.tp, pd.pp, pd.world_size) == (2, 2, 1, 2, 1, 8)
    assert pd.dp_degree == 4 and pd.dp_enabled and pd.fsdp_enabled and pd.tp_enabled
    assert pd.loss_parallel_enabled


def test_world_of_one_needs_no_mesh() -> None:
    pd = _dims(1)
    assert pd.dp_shard == 1 and not (pd.dp_enabled or pd.fsdp_enabled or pd.tp_enabled)
    assert pd.build_mesh("cpu") is None  # no process group needed
    assert pd.get_mesh("dp") is None and pd.get_mesh("tp") is None
    assert pd.dp_rank == 0 and pd.loss_group is None


def test_mesh_must_be_built_before_use() -> None:
    with pytest.raises(RuntimeError, match="build_mesh"):
        _dims(1).get_mesh("dp")


def test_flags() -> None:
    ddp = _dims(2, data_parallel_replicate_degree=2, data_parallel_shard_degree=1)
    assert ddp.dp_enabled and ddp.dp_replicate_enabled and not ddp.fsdp_enabled
    tp = _dims(2, tensor_parallel_degree=2, disable_loss_parallel=True)
    assert tp.dp_shard == 1 and tp.dp_degree == 1 and not tp.dp_enabled
    assert tp.tp_enabled and not tp.loss_parallel_enabled


# ---- from_config errors ------------------------------------------------------------------------


def test_product_must_equal_world_size() -> None:
    msg = _error(_dims, 4, data_parallel_shard_degree=2, tensor_parallel_degree=3)
    assert (
        "parallelism: data_parallel_replicate_degree(1) x data_parallel_shard_degree(2) x "
        "context_parallel_degree(1) x tensor_parallel_degree(3) x pipeline_parallel_degree(1) = 6 "
        "!= world size 4 (NGPU)"
    ) in msg
    # -1 is suggested only where it works: tp 3 does not divide 4 ranks.
    assert "data_parallel_shard_degree=-1" not in msg and "multiply to 3, which does not divide 4" in msg
    assert "change them, e.g. tensor_parallel_degree 1, 2 or 4" in msg  # (the one degree set: what fits)
    auto = _error(_dims, 2, tensor_parallel_degree=3)
    assert auto.endswith("choose degrees whose product divides 2, e.g. tensor_parallel_degree 1 or 2"), auto
    assert ", e.g." not in _error(_dims, 4, tensor_parallel_degree=3, pipeline_parallel_degree=3)  # (two set: no list)
    assert "set data_parallel_shard_degree=-1" in _error(_dims, 4, data_parallel_shard_degree=3, tensor_parallel_degree=2)


def test_a_layout_for_several_ranks_in_one_process_says_to_launch_through_torchrun(monkeypatch) -> None:
    monkeypatch.delenv("RANK", raising=False)  # `python -m torchtitan_like.train`, not torchrun
    msg = _error(_dims, 1, data_parallel_shard_degree=2, tensor_parallel_degree=2)
    assert "for 4 ranks, launch through torchrun: NGPU=4 ./run_train.sh (RANK is unset here" in msg, msg
    monkeypatch.setenv("RANK", "0")  # torchrun with NGPU=1: the usual message only
    assert "launch through torchrun" not in _error(_dims, 1, data_parallel_shard_degree=2)


def test_minus_one_shard_degree_must_divide() -> None:
    msg = _error(_dims, 4, tensor_parallel_degree=3)
    assert "data_parallel_shard_degree=-1" in msg
    assert "tensor_parallel_degree(3)" in msg and "= 3 does not divide world size 4 (NGPU)" in msg


@pytest.mark.parametrize(
    "key", ["data_parallel_replicate_degree", "tensor_parallel_degree", "context_parallel_degree",
            "pipeline_parallel_degree", "expert_parallel_degree"],
)
def test_degrees_must_be_positive(key: str) -> None:
    msg = _error(_dims, 4, **{key: 0})
    assert f"parallelism.{key}=0 must be >= 1" in msg


@pytest.mark.parametrize("value", [0, -2])
def test_shard_degree_must_be_positive_or_minus_one(value: int) -> None:
    msg = _error(_dims, 4, data_parallel_shard_degree=value)
    assert f"parallelism.data_parallel_shard_degree={value} must be >= 1, or -1" in msg


def test_expert_parallel_is_reserved() -> None:
    msg = _error(_dims, 2, expert_parallel_degree=2)
    assert "parallelism.expert_parallel_degree=2 is reserved until MoE models exist: set it to 1" in msg


def test_cp_needs_the_rope_table_to_be_one_sequence() -> None:
    pd = _dims(2, context_parallel_degree=2)
    assert pd.cp == 2 and pd.dp_shard == 1
    msg = _error(pd.validate, model_args=DEBUG.with_seq_len(128), training=Training(seq_len=64))
    assert "model.max_seq_len=128 must equal training.seq_len=64 with context_parallel_degree=2" in msg
    assert "set model.max_seq_len=64" in msg
    pd.validate(model_args=DEBUG.with_seq_len(64), training=Training(seq_len=64))


def test_seq_len_must_divide_by_two_times_cp() -> None:
    pd = _dims(4, context_parallel_degree=4)
    msg = _error(pd.validate, model_args=DEBUG.with_seq_len(60), training=Training(seq_len=60))
    assert "training.seq_len=60 must be divisible by tensor_parallel_degree(1) x 2 x context_parallel_degree(4) = 8" in msg


def test_async_tp_needs_tensor_parallel() -> None:
    # The compile.enable part: config/validate.py; the CUDA part: parallelize (tests/unit/test_compile.py).
    msg = _error(_dims, 2, tensor_parallel_degree=1, enable_async_tensor_parallel=True)
    assert "parallelism.enable_async_tensor_parallel=true needs tensor_parallel_degree > 1 (got 1)" in msg
    assert "compile.enable" in msg and "CUDA" in msg and "set it to false" in msg


# ---- validate errors ---------------------------------------------------------------------------


def test_tp_must_divide_query_and_kv_heads() -> None:
    pd = _dims(3, tensor_parallel_degree=3)
    msg = _error(pd.validate, model_args=DEBUG, training=Training(seq_len=12))
    assert "parallelism.tensor_parallel_degree=3 must divide model n_heads=16 and n_kv_heads=8" in msg
    assert "not replicated" in msg and msg.endswith("try 1")  # 2, 4 and 8 divide the heads, not the 3 ranks


def test_tp_suggestions_are_divisors_of_the_gcd() -> None:
    pd = _dims(4, tensor_parallel_degree=4)
    args = replace(DEBUG, n_heads=12, n_kv_heads=6)  # gcd 6: KV heads rule out 4
    msg = _error(pd.validate, model_args=args, training=Training(seq_len=16))
    assert "n_heads=12 and n_kv_heads=6" in msg and msg.endswith("try 1 or 2")  # 3 and 6 do not divide 4 ranks


def test_tp_dividing_heads_is_fine() -> None:
    _dims(8, tensor_parallel_degree=8).validate(model_args=DEBUG, training=Training(seq_len=32))


def test_seq_len_must_divide_by_tp_times_two_times_cp() -> None:
    pd = _dims(2, tensor_parallel_degree=2)
    msg = _error(pd.validate, model_args=DEBUG, training=Training(seq_len=6))
    assert re.search(
        r"training\.seq_len=6 must be divisible by tensor_parallel_degree\(2\) x 2 x "
        r"context_parallel_degree\(1\) = 4 .*try 8", msg
    )


def test_seq_len_is_free_without_tp_or_cp() -> None:
    _dims(2).validate(model_args=DEBUG, training=Training(seq_len=7, local_batch_size=1))


def test_global_batch_must_be_a_multiple_of_local_times_dp() -> None:
    pd = _dims(4, data_parallel_replicate_degree=2)  # dp degree 4
    msg = _error(pd.validate, model_args=DEBUG, training=Training(local_batch_size=3, global_batch_size=16))
    assert (
        "training.global_batch_size=16 must be a positive multiple of training.local_batch_size=3 x "
        "data-parallel degree 4 = 12 (try training.global_batch_size=12 or 24, or training.local_batch_size in "
        "[1, 2, 4]; -1 means 12)"
    ) in msg
    pd.validate(model_args=DEBUG, training=Training(local_batch_size=3, global_batch_size=24))
    pd.validate(model_args=DEBUG, training=Training(local_batch_size=3, global_batch_size=-1))


def test_global_batch_must_be_positive() -> None:
    msg = _error(_dims(2).validate, model_args=DEBUG, training=Training(local_batch_size=1, global_batch_size=0))
    assert "training.global_batch_size=0 must be a positive multiple" in msg


def test_local_batch_must_be_positive() -> None:
    msg = _error(_dims(2).validate, model_args=DEBUG, training=Training(local_batch_size=0))
    assert "training.local_batch_size=0 must be >= 1" in msg


def test_cpu_offload_needs_fsdp() -> None:
    pd = _dims(2, data_parallel_replicate_degree=2, data_parallel_shard_degree=1)
    msg = _error(pd.validate, model_args=DEBUG, training=Training(enable_cpu_offload=True))
    assert "training.enable_cpu_offload=true needs FSDP (data_parallel_shard_degree x context_parallel_degree > 1)" in msg
    _dims(2).validate(model_args=DEBUG, training=Training(enable_cpu_offload=True))


def test_tied_embeddings_with_tp_are_accepted() -> None:
    # TP keeps the tied weight one parameter (tests/distributed/test_parity.py trains it).
    _dims(2, tensor_parallel_degree=2).validate(model_args=LLAMA3_FLAVORS["1B"], training=Training(seq_len=64))
