"""Initial weights have the std asked for (hidden weights were once cut at +-2 std, 12% too narrow), and
the LR schedule keeps what the config says: a warmup longer than the run keeps its ramp (with a warning),
a decay_ratio above 0 always decays."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from torchtitan_like.components.lr_scheduler import build_lr_scheduler
from torchtitan_like.config.schema import LRScheduler
from torchtitan_like.models.llama3 import LLAMA3_FLAVORS, Transformer


def _built(flavor: str, seed: int = 0) -> Transformer:
    args = LLAMA3_FLAVORS[flavor].with_seq_len(16)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model


def _lr_factors(cfg: LRScheduler, steps: int, n: int | None = None) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sched = build_lr_scheduler(opt, cfg, steps=steps)
    out = []
    for _ in range(steps if n is None else n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_hidden_weights_have_the_requested_init_std() -> None:
    model = _built("debugmodel")
    # wq/wk/wv/w1 are drawn with std 0.02 (torchtitan: trunc_normal_(w, std=0.02), default a=-2, b=2, i.e.
    # effectively untruncated). ~1.8M samples over the 6 layers: the sample std is within ~0.1%.
    first = torch.cat([
        torch.cat([b.attention.wq.weight.flatten(), b.feed_forward.w1.weight.flatten()]) for b in model.layers.values()
    ])
    assert first.std().item() == pytest.approx(0.02, rel=0.03)
    # Depth-scaled output projections: layer 0's wo / w2 / w3 use 0.02 / sqrt(2).
    block = model.layers["0"]
    out = torch.cat([block.attention.wo.weight.flatten(), block.feed_forward.w2.weight.flatten(),
                     block.feed_forward.w3.weight.flatten()])
    assert out.std().item() == pytest.approx(0.02 / math.sqrt(2), rel=0.03)


def test_warmup_longer_than_the_run_keeps_its_ramp_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    cfg = LRScheduler(warmup_steps=10, decay_ratio=0.0)
    with caplog.at_level(logging.WARNING, logger="torchtitan_like"):
        got = _lr_factors(cfg, steps=5)
    # The lr of a step does not depend on training.steps: a longer run resumed from here continues the ramp.
    assert got == pytest.approx([(k + 1) / 11 for k in range(5)])
    assert [r.getMessage() for r in caplog.records] == [
        "lr_scheduler.warmup_steps=10 is longer than training.steps=5: the run ends during warmup, at 45% of optimizer.lr"
    ]


def test_a_nonzero_decay_ratio_always_decays_to_min_lr_factor() -> None:
    # 10 steps, warmup 5, decay_ratio 0.05: 0.05 x 10 rounds to 0, yet one step decays.
    cfg = LRScheduler(warmup_steps=5, decay_ratio=0.05, decay_type="linear", min_lr_factor=0.1)
    got = _lr_factors(cfg, steps=10)
    assert got[-1] == pytest.approx(0.1), got
    assert got[:-1] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1, 1, 1, 1])


@pytest.mark.skipif(tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13),
                    reason="torch 2.11's nn.init.trunc_normal_ draws with another algorithm (the reason for _truncate_)")
@pytest.mark.parametrize("std, cutoff", [(0.02, 2.0), (256**-0.5, 3 * 256**-0.5)])
def test_truncated_draws_are_torch_2_13s_trunc_normal(std: float, cutoff: float) -> None:
    """The init's truncation is written out so that torch 2.11 (the GPU machines') draws the same weights as
    2.13; on 2.13 it is trunc_normal_ to the bit, for the hidden weights' bounds and the output head's 3 std."""
    from torchtitan_like.models.llama3.model import _truncate_

    gen = torch.Generator().manual_seed(3)
    ours = torch.empty(2000, 256).normal_(0.0, std, generator=gen)
    _truncate_(ours, std=std, cutoff=cutoff, generator=gen)
    theirs = torch.empty(2000, 256)
    torch.nn.init.trunc_normal_(theirs, mean=0.0, std=std, a=-cutoff, b=cutoff, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours, theirs) and float(ours.abs().max()) <= cutoff
