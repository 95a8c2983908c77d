"""bf16 mixed precision under FSDP and DDP (MixedPrecisionPolicy): the blocks compute in bf16, but the
RoPE table they receive stays float32.

The table is a forward argument of every block. FSDP's default policy casts every floating-point
forward input to the parameter dtype, which would round cos/sin to bf16 (8 bits of mantissa: up to
4e-3 off at every position), while one process under autocast keeps them in float32. The blocks
are sharded with input casting off; their activations are bf16 anyway, coming from bf16 parameters.
"""

from __future__ import annotations

import pytest
import torch

from harness import run_on_ranks
from trainer_runs import trainer_argv


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
