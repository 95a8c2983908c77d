"""build_optimizer: AdamW/Adam over several model parts, implementation flags, hyperparameters."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torchtitan_like.components import optimizer as optimizer_module
from torchtitan_like.components.optimizer import build_optimizer
from torchtitan_like.config.schema import Optimizer
from torchtitan_like.errors import ConfigError

CPU_FUSED = "cpu" in optimizer_module._fused_devices()


def model_parts() -> list[nn.Module]:
    torch.manual_seed(0)
    first = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3))
    second = nn.Linear(3, 2)
    frozen = nn.Linear(2, 2)
    frozen.weight.requires_grad_(False)  # a frozen parameter is not optimized
    return [first, nn.Sequential(second, frozen)]


def trainable(parts: list[nn.Module]) -> list[nn.Parameter]:
    return [p for m in parts for p in m.parameters() if p.requires_grad]


def train_step(parts: list[nn.Module], opt: torch.optim.Optimizer) -> None:
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    for m in parts:
        x = m(x)
    x.square().sum().backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("name, cls", [("AdamW", torch.optim.AdamW), ("Adam", torch.optim.Adam)])
def test_builds_the_named_class_over_every_trainable_parameter_of_every_part(name: str, cls: type) -> None:
    parts = model_parts()
    opt = build_optimizer(parts, Optimizer(name=name, implementation="for-loop"), device_type="cpu")  # type: ignore[arg-type]
    assert type(opt) is cls  # AdamW subclasses Adam in recent torch, so not isinstance
    got = [p for g in opt.param_groups for p in g["params"]]
    assert [id(p) for p in got] == [id(p) for p in trainable(parts)]
    assert len(got) == 7  # 4 from the first part, 2 + the frozen layer's bias from the second


def test_hyperparameters_are_passed_through() -> None:
    cfg = Optimizer(lr=3e-4, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.05, implementation="foreach")
    opt = build_optimizer(model_parts(), cfg, device_type="cpu")
    d = opt.defaults
    assert (d["lr"], d["betas"], d["eps"], d["weight_decay"]) == (3e-4, (0.8, 0.99), 1e-6, 0.05)


@pytest.mark.parametrize(
    "implementation, fused, foreach",
    [("fused", True, False), ("foreach", False, True), ("for-loop", False, False)],
)
@pytest.mark.parametrize("name", ["AdamW", "Adam"])
def test_implementation_flags(implementation: str, fused: bool, foreach: bool, name: str) -> None:
    if implementation == "fused" and not CPU_FUSED:
        pytest.skip(f"torch {torch.__version__} has no fused Adam kernel on CPU")
    cfg = Optimizer(name=name, implementation=implementation)  # type: ignore[arg-type]
    opt = build_optimizer(model_parts(), cfg, device_type="cpu")
    assert opt.defaults["fused"] is fused and opt.defaults["foreach"] is foreach


@pytest.mark.parametrize("name", ["AdamW", "Adam"])
def test_implementations_take_the_same_step(name: str) -> None:
    implementations = ["foreach", "for-loop"] + (["fused"] if CPU_FUSED else [])
    results = []
    for implementation in implementations:
        parts = model_parts()
        cfg = Optimizer(name=name, lr=1e-2, weight_decay=0.1, implementation=implementation)  # type: ignore[arg-type]
        opt = build_optimizer(parts, cfg, device_type="cpu")
        before = copy.deepcopy(trainable(parts))
        for _ in range(3):
            train_step(parts, opt)
        assert all(not torch.equal(a, b) for a, b in zip(before, trainable(parts))), "every trainable parameter moves"
        results.append([p.detach() for m in parts for p in m.parameters()])
    for other in results[1:]:
        torch.testing.assert_close(other, results[0])


def test_frozen_parameter_does_not_move() -> None:
    parts = model_parts()
    frozen = parts[1][1].weight
    before = frozen.detach().clone()
    train_step(parts, build_optimizer(parts, Optimizer(implementation="foreach"), device_type="cpu"))
    assert torch.equal(frozen, before)


def test_weight_decay_differs_between_adamw_and_adam() -> None:
    # Zero gradients isolate the decay term: AdamW shrinks the weight by lr * wd; Adam's L2 term goes
    # through the normalized update instead (a full lr-sized step).
    out = {}
    for name in ("AdamW", "Adam"):
        p = nn.Parameter(torch.ones(1))
        opt = build_optimizer([nn.ParameterList([p])], Optimizer(name=name, lr=0.1, weight_decay=0.5, implementation="for-loop"),  # type: ignore[arg-type]
                              device_type="cpu")
        p.grad = torch.zeros(1)
        opt.step()
        out[name] = p.item()
    assert out["AdamW"] == pytest.approx(1 - 0.1 * 0.5)
    assert out["Adam"] == pytest.approx(1 - 0.1, rel=1e-5)


def test_fused_on_a_device_without_kernels_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optimizer_module, "_fused_devices", lambda: {"cuda"})
    with pytest.raises(ConfigError) as info:
        build_optimizer(model_parts(), Optimizer(implementation="fused"), device_type="cpu")
    msg = str(info.value)
    assert "optimizer.implementation='fused' is not available on cpu" in msg and "'foreach' or 'for-loop'" in msg


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_adamw_on_cuda_matches_for_loop() -> None:
    results = []
    for implementation in ("fused", "for-loop"):
        parts = [m.cuda() for m in model_parts()]
        opt = build_optimizer(parts, Optimizer(lr=1e-2, implementation=implementation), device_type="cuda")  # type: ignore[arg-type]
        assert opt.defaults["fused"] is (implementation == "fused")
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1)).cuda()
        for _ in range(3):
            y = x
            for m in parts:
                y = m(y)
            y.square().sum().backward()
            opt.step()
            opt.zero_grad()
        results.append([p.detach().cpu() for m in parts for p in m.parameters()])
    torch.testing.assert_close(results[0], results[1])


# ---- gradient clipping (distributed/utils.clip_grad_norm_) ------------------------------------------------


def _grads(seed: int = 0) -> list[nn.Parameter]:
    torch.manual_seed(seed)
    params = [nn.Parameter(torch.randn(shape)) for shape in ((64, 32), (32,), (7, 5, 3))]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    return params


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_clip_grad_norm_matches_torch_on_plain_tensors(norm_type: float) -> None:
    """The parity tests compare layouts with one process through this same function, so they cannot see it
    fail to clip (under AdamW a constant gradient scale changes nothing they compare): torch's own
    clip_grad_norm_ is the reference here."""
    from torchtitan_like.distributed.utils import clip_grad_norm_

    ours, ref = _grads(), _grads()
    norm = clip_grad_norm_(ours, 1.0, norm_type=norm_type)
    want = torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type=norm_type)
    torch.testing.assert_close(norm, want, rtol=1e-6, atol=0)
    assert norm > 1.0  # so the clip did scale
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad, norm_type) for p in ours]),
                                       norm_type)
    assert clipped == pytest.approx(1.0, rel=1e-5)


def test_clip_grad_norm_with_max_norm_zero_only_measures() -> None:
    from torchtitan_like.distributed.utils import clip_grad_norm_

    params = _grads()
    before = [p.grad.clone() for p in params]
    norm = clip_grad_norm_(params, 0.0)
    assert norm == pytest.approx(torch.nn.utils.get_total_norm([p.grad for p in params]).item(), rel=1e-6)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))


def test_a_pipeline_stage_without_gradients_still_joins_the_stages_norm_reduction(monkeypatch) -> None:
    """Under PP every stage all-reduces its squared norm over the pp group: a stage with no gradient
    returned zero without joining, and the other stages waited for it until the collective timeout."""
    from torchtitan_like.distributed import utils
    from torchtitan_like.distributed.utils import clip_grad_norm_

    reduced = []

    def all_reduce(tensor, op=None, group=None):
        reduced.append((tensor.device.type, tensor.dtype, group))
        tensor += 9.0  # the other stage's squared norm

    monkeypatch.setattr(utils.dist, "all_reduce", all_reduce)
    group = object()
    frozen = [nn.Parameter(torch.ones(3), requires_grad=False)]
    norm = clip_grad_norm_(frozen, 1.0, pp_group=group)
    assert reduced == [("cpu", torch.float32, group)]
    assert norm.item() == pytest.approx(3.0)
    assert frozen[0].grad is None
