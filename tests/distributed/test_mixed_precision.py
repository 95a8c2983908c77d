"""bf16 mixed precision under FSDP and DDP (MixedPrecisionPolicy): the blocks compute in bf16, but the
RoPE table they receive stays float32.

The table is a forward argument of every block. FSDP's default policy casts every floating-point
forward input to the parameter dtype, which would round cos/sin to bf16 (8 bits of mantissa: up to
4e-3 off at every position), while one process under autocast keeps them in float32. The blocks
are sharded with input casting off; their activations are bf16 anyway, coming from bf16 parameters.

And bf16 FSDP(2) trains like bf16 on one process, to a stated tolerance (the two round differently).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from harness import run_on_ranks

from torchtitan_like.models.llama3 import LLAMA3_FLAVORS
from trainer_runs import N_LAYERS, assert_state_matches_dry_run, series, train_run, trainer_argv


def _attention_inputs(argv: list[str]) -> dict:
    """Rank function: 2 training steps; the dtypes each attention module's forward received."""
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.models.llama3.model import Attention
    from torchtitan_like.trainer import Trainer

    trainer = Trainer(load_config(argv))
    seen: set[tuple[str, str]] = set()
    for part in trainer.model_parts:
        for module in part.modules():
            if isinstance(module, Attention):
                module.register_forward_pre_hook(
                    lambda _m, args: seen.add((str(args[0].dtype), str(args[1].dtype)))
                )
    try:
        trainer.train()
    finally:
        trainer.close()
    return {"seen": seen, "losses": [h["loss"] for h in trainer.history]}


@pytest.mark.parametrize("layout", ["fsdp2", "ddp2"])
def test_bf16_blocks_get_a_float32_rope_table(layout: str, tmp_path) -> None:
    argv = trainer_argv(tmp_path / "run", layout, "--training.mixed_precision_param", "bfloat16", steps=2)
    ranks = run_on_ranks(_attention_inputs, world_size=2, tmp_path=tmp_path, args=(argv,))
    for r, got in enumerate(ranks):
        # (hidden states, RoPE table): bf16 activations from bf16 parameters, the table untouched.
        assert got["seen"] == {("torch.bfloat16", "torch.float32")}, f"rank {r}: {got['seen']}"
        assert all(torch.isfinite(torch.tensor(got["losses"]))), f"rank {r}: {got['losses']}"



# bf16 under FSDP (parameters cast once per all-gather, MixedPrecisionPolicy) and under autocast on one
# process (each matmul casts its fp32 weight) round differently: seen over 8 steps, losses 3e-4 and grad
# norms 1e-3 apart (relative), about what separates one process in bf16 from the same in fp32 (4e-5 and
# 5e-4). A gradient scaled twice by the data-parallel degree moves the grad norm by 50% (checked).
BF16_LOSS_RTOL = 2e-3
BF16_NORM_RTOL = 5e-3


def test_bf16_fsdp_trains_like_bf16_on_one_process(tmp_path) -> None:
    def run(layout: str, world: int) -> dict:
        argv = trainer_argv(tmp_path / layout, layout, "--training.mixed_precision_param", "bfloat16", steps=8)
        return run_on_ranks(train_run, world_size=world, tmp_path=tmp_path / f"ranks_{layout}", args=(argv,))[0]

    one, fsdp = run("one", 1), run("fsdp2", 2)
    assert fsdp["misplaced_grads"] == []
    assert [h["lr"] for h in fsdp["history"]] == [h["lr"] for h in one["history"]]
    for key, rtol in (("loss", BF16_LOSS_RTOL), ("grad_norm", BF16_NORM_RTOL)):
        torch.testing.assert_close(series(fsdp["history"], key), series(one["history"], key), rtol=rtol, atol=0,
                                   msg=lambda m, key=key: f"bf16 fsdp2 vs one process: {key}: {m}")


def _bf16_storage_run(layout: str, world: int, tmp_path) -> tuple[list[str], list[dict]]:
    argv = trainer_argv(tmp_path / layout, layout, "--training.dtype", "bfloat16", steps=8)
    return argv, run_on_ranks(train_run, world_size=world, tmp_path=tmp_path / f"ranks_{layout}", args=(argv,))


@pytest.fixture(scope="module")
def bf16_storage_one(tmp_path_factory) -> dict:
    _, (one,) = _bf16_storage_run("one", 1, tmp_path_factory.mktemp("one"))
    # Every parameter, gradient and AdamW state in bf16: 2 bytes per element (and the fp32 step counts).
    n = replace(LLAMA3_FLAVORS["debugmodel"], n_layers=N_LAYERS).num_params()
    assert (one["state"]["params"], one["state"]["grads"]) == (2 * n, 2 * n)
    assert 4 * n < one["state"]["optimizer"] < 4 * n + 4 * 64
    return one


# Seen over 8 steps: losses 3e-5 apart (relative), grad norms equal, and weights one bf16 step apart (the
# reduction order rounds differently), except a few embedding entries of rarely seen tokens: their gradient
# is a near-zero sum, so bf16 noise flips the sign of Adam's m / sqrt(v) and moves them by up to the learning
# rate a step (seen: 1 of 512000, 0.008 off). Adam does not see a gradient's scale: the grad-norm check
# catches that (50% off when scaled by the data-parallel degree); a shard stepped with another shard's
# gradient moves most of its weights.
BF16_PARAM_RTOL = 1.6e-2  # (bf16's own tolerance in torch.testing)
BF16_PARAM_ATOL = 4e-3
BF16_PARAM_OFF_FRACTION = 1e-4
BF16_PARAM_MAX = 8 * 2 * 3e-3  # 8 steps, up to twice the peak learning rate each
@pytest.mark.parametrize("layout, world", [("fsdp2", 2), ("fsdp2xtp2", 4), ("ddp2", 2)])
def test_bf16_storage_trains_like_one_process(layout: str, world: int, bf16_storage_one: dict, tmp_path) -> None:
    """training.dtype = "bfloat16": parameters, gradients and optimizer states in bf16 under data and tensor
    parallelism, as in one process; the dry run predicts the halved state."""
    one = bf16_storage_one
    argv, ranks = _bf16_storage_run(layout, world, tmp_path)
    got = ranks[0]
    assert got["misplaced_grads"] == []
    for key, rtol in (("loss", BF16_LOSS_RTOL), ("grad_norm", BF16_NORM_RTOL)):
        torch.testing.assert_close(series(got["history"], key), series(one["history"], key), rtol=rtol, atol=0,
                                   msg=lambda m, key=key: f"bf16 storage {layout} vs one process: {key}: {m}")
    assert {p.dtype for p in got["params"].values()} == {torch.bfloat16}
    for name, want in one["params"].items():
        diff = (got["params"][name].float() - want.float()).abs()
        off = diff > BF16_PARAM_ATOL + BF16_PARAM_RTOL * want.float().abs()
        assert off.float().mean().item() <= BF16_PARAM_OFF_FRACTION and diff.max().item() <= BF16_PARAM_MAX, (
            f"{layout}: {name}: {int(off.sum())} of {off.numel()} weights off, largest difference {diff.max().item()}")
    assert_state_matches_dry_run(argv, world, ranks, check_ranks=[0, world - 1])
