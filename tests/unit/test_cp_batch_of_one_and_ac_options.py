"""Context parallel with a batch of one, and activation checkpointing options that did not do what they say.

- CP shards `inputs` and `labels` *in place* (torch's `context_parallel` does `resize_` + `copy_`
  on each buffer). With `local_batch_size = 1` the loader's inputs and labels were once views of one
  storage, one token apart (`.contiguous()` of a (1, n) slice is no copy): writing the labels' shard
  overwrote the inputs' shard, so on CPU (where `.to("cpu")` is a no-op) every CP run with a batch of
  one trained and validated on corrupted token ids. The loader now returns copies, and the CP context
  refuses buffers that share storage.
- `activation_checkpoint.selective_ac_option = N` with N larger than the number of blocks wrapped no
  block at all, silently: now a ConfigError.
- The "op" policy saved `aten.abs` outputs: with float8 linears every cast's abs(x), a full-size
  copy of the linear's input, was kept for backward, so selective "op" AC held more memory than no
  AC at all.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_on_ranks
from torchtitan_like.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

# fp32 deterministic runs: CP matches one process to ~1e-7 relative (seen in the parity tests);
# the corruption moves the loss by ~1e-3 and the validation loss by ~1e-4.
RTOL = 1e-5


def _argv(dump: Path, *overrides: str) -> list[str]:
    return [
        "--job.config_file", str(ROOT / "train_configs" / "debug_model.toml"),
        "--job.dump_folder", str(dump),
        "--training.seq_len", "64",
        "--training.global_batch_size", "2",
        "--training.local_batch_size", "1",  # the case that shares storage between inputs and labels
        "--training.steps", "1",
        "--metrics.no_enable_tensorboard",
        "--debug.deterministic",
        "--validation.enable",
        "--validation.seq_len", "64",
        "--validation.local_batch_size", "1",
        "--validation.steps", "2",
        "--validation.freq", "1000",  # only the explicit validate() call below
        *overrides,
    ]


def _train_and_validate(argv: list[str]) -> dict:
    """Rank function: one training step, then one validation pass; the step loss and the val loss."""
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.trainer import Trainer

    trainer = Trainer(load_config(argv))
    try:
        trainer.train()
        assert trainer.validator is not None
        val = trainer.validator.validate(trainer.model_parts)
    finally:
        trainer.close()
    return {"loss": trainer.history[0]["loss"], "val_loss": val["val_loss"]}


@pytest.fixture(scope="module")
def cp_batch_of_one(tmp_path_factory) -> tuple[dict, dict]:
    """(one process, CP(2)) with local batch 1 in training and validation, same global batches."""
    tmp = tmp_path_factory.mktemp("cp_bs1")
    (one,) = run_on_ranks(
        _train_and_validate, world_size=1, tmp_path=tmp,
        args=(_argv(tmp / "one", "--parallelism.data_parallel_shard_degree", "1"),),
    )
    cp = run_on_ranks(
        _train_and_validate, world_size=2, tmp_path=tmp, timeout_s=300,
        args=(_argv(tmp / "cp2", "--parallelism.context_parallel_degree", "2",
                    "--parallelism.data_parallel_shard_degree", "1"),),
    )
    return one, cp[0]


def test_cp_training_with_batch_of_one_matches_one_process(cp_batch_of_one) -> None:
    one, cp = cp_batch_of_one
    torch.testing.assert_close(
        torch.tensor(cp["loss"], dtype=torch.float64), torch.tensor(one["loss"], dtype=torch.float64),
        rtol=RTOL, atol=0,
    )


def test_cp_validation_with_batch_of_one_matches_one_process(cp_batch_of_one) -> None:
    one, cp = cp_batch_of_one
    torch.testing.assert_close(
        torch.tensor(cp["val_loss"], dtype=torch.float64), torch.tensor(one["val_loss"], dtype=torch.float64),
        rtol=RTOL, atol=0,
    )


def test_selective_ac_every_n_beyond_the_layer_count_is_a_config_error(tmp_path) -> None:
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.trainer import check_job

    cfg = load_config([
        "--job.config_file", str(ROOT / "train_configs" / "debug_model.toml"),
        "--job.dump_folder", str(tmp_path),
        "--training.dataset", "synthetic",
        "--training.seq_len", "32",
        "--metrics.no_enable_tensorboard",
        "--activation_checkpoint.mode", "selective",
        "--activation_checkpoint.selective_ac_option", "7",  # debugmodel has 6 blocks
    ])
    assert cfg.model.flavor == "debugmodel"
    with pytest.raises(ConfigError, match=r"activation_checkpoint\.selective_ac_option='7' checkpoints every 7-th "
                                          r"block, but the model has 6 \(model\.flavor='debugmodel'\)"):
        check_job(cfg, 1)


def test_cp_context_refuses_buffers_that_share_storage() -> None:
    from torchtitan_like.distributed.context_parallel import context_parallel_ctx

    batch = torch.arange(9).reshape(1, 9)
    with pytest.raises(ValueError, match="buffers share storage"):
        context_parallel_ctx(None, buffers=[batch[:, :-1], batch[:, 1:]], seq_dims=[1, 1], no_restore_buffers=set(),
                             rotate_method="allgather")


# ---- selective "op" policy with float8 ---------------------------------------------------------


def _float8_peak_bytes(ac) -> int:
    """Peak live bytes (MemTracker, as tests/unit/test_activation_checkpoint.py measures) of one
    forward + backward of a 4-block debug model whose linears are float8 (tensorwise, emulated:
    the same casts, abs and amax as on a GPU), under activation checkpointing `ac`."""
    from dataclasses import replace

    from test_activation_checkpoint import peak_bytes_of_step

    from torchtitan_like.components.float8 import Float8Converter
    from torchtitan_like.config.schema import Float8, Parallelism
    from torchtitan_like.distributed.activation_checkpoint import apply_ac
    from torchtitan_like.distributed.parallel_dims import ParallelDims
    from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS
    from torchtitan_like.models.llama3.model import Transformer

    args = replace(LLAMA3_FLAVORS["debugmodel"], n_layers=4, max_seq_len=256, vocab_size=256)
    model = Transformer(args)
    Float8Converter(
        Float8(emulate=True), parallel_dims=ParallelDims.from_config(Parallelism(), 1), device=torch.device("cpu"),
    ).convert(model)
    apply_ac(model, ac)
    with torch.no_grad():
        model.init_weights(0)
    tokens = torch.randint(0, args.vocab_size, (2, args.max_seq_len), generator=torch.Generator().manual_seed(0))
    return peak_bytes_of_step(model, tokens)


def test_selective_op_ac_with_float8_uses_less_memory_than_no_ac() -> None:
    from torchtitan_like.config.schema import ActivationCheckpoint

    peak = {
        "none": _float8_peak_bytes(ActivationCheckpoint(mode="none")),
        "op": _float8_peak_bytes(ActivationCheckpoint(mode="selective", selective_ac_option="op")),
        "full": _float8_peak_bytes(ActivationCheckpoint(mode="full")),
    }
    assert peak["full"] < peak["none"], peak  # the measurement itself sees AC
    # README / activation_checkpoint.py: memory falls none > selective (layer or op) > full.
    assert peak["none"] > peak["op"] > peak["full"], peak
