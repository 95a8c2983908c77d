"""Activation checkpointing: memory order, the CPU attention op in the op policy, training parity, errors.

Memory is measured with torch's MemTracker (torch.distributed._tools.mem_tracker), which follows
every tensor storage created under it through a dispatch mode and records the peak of the live
bytes. It counts storage sizes, not allocator blocks, so it is deterministic and independent of
malloc, thread count or other processes on the machine (RSS is none of those), and it sees the
tensors that checkpoint keeps in its own storage, which an outer saved_tensors_hooks would not.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.utils._python_dispatch import TorchDispatchMode

from feature_runs import STEPS, baseline_grad_norms, baseline_losses, grad_norms, losses, train
from torchtitan_like.config.loader import load_config
from torchtitan_like.config.schema import ActivationCheckpoint
from torchtitan_like.distributed.activation_checkpoint import OP_SAC_SAVE_LIST, apply_ac, memory_budget_context
from torchtitan_like.errors import ConfigError
from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS
from torchtitan_like.models.llama3.model import Transformer

MODES = {
    "none": ActivationCheckpoint(mode="none"),
    "selective_2": ActivationCheckpoint(mode="selective", selective_ac_option="2"),
    "selective_op": ActivationCheckpoint(mode="selective", selective_ac_option="op"),
    "full": ActivationCheckpoint(mode="full"),
}


def _model(ac: ActivationCheckpoint, *, n_layers: int = 4, seq: int = 256, vocab: int = 256) -> Transformer:
    args = replace(LLAMA3_FLAVORS["debugmodel"], n_layers=n_layers, max_seq_len=seq, vocab_size=vocab)
    model = Transformer(args)
    apply_ac(model, ac)
    with torch.no_grad():
        model.init_weights(0)
    return model


def _tokens(model: Transformer, batch: int = 2) -> torch.Tensor:
    a = model.args
    return torch.randint(0, a.vocab_size, (batch, a.max_seq_len), generator=torch.Generator().manual_seed(0))


def peak_bytes_of_step(model: Transformer, tokens: torch.Tensor) -> int:
    """Peak live bytes (MemTracker) of one forward + backward of `model` on `tokens`."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        model(tokens).float().pow(2).mean().backward()
    (per_device,) = tracker.get_tracker_snapshot("peak").values()
    return max(v for k, v in per_device.items() if str(k) == "Total")


def _peak_bytes(ac: ActivationCheckpoint) -> int:
    # Activations dominate here (seq 256, vocab 256): the quantity AC trades for recompute.
    model = _model(ac)
    return peak_bytes_of_step(model, _tokens(model))


def test_peak_memory_falls_none_selective_full():
    peak = {name: _peak_bytes(ac) for name, ac in MODES.items()}
    assert peak["none"] > peak["selective_2"] > peak["full"], peak
    assert peak["none"] > peak["selective_op"] > peak["full"], peak
    # Not a rounding difference: each step down saves at least a tenth of the no-AC activations.
    assert peak["none"] - max(peak["selective_2"], peak["selective_op"]) > 0.1 * (peak["none"] - peak["full"]), peak


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] = self.counts.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def _op_counts(ac: ActivationCheckpoint) -> dict[str, int]:
    model = _model(ac, n_layers=2, seq=16)
    tokens = _tokens(model)
    with _CountOps() as mode:
        model(tokens).sum().backward()
    return mode.counts


def test_op_policy_saves_cpu_attention_and_matmuls_but_recomputes_the_rest():
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default in OP_SAC_SAVE_LIST
    attn, mm, silu = "aten._scaled_dot_product_flash_attention_for_cpu.default", "aten.mm.default", "aten.silu.default"
    none, op, full = (_op_counts(MODES[m]) for m in ("none", "selective_op", "full"))
    assert none[attn] == 2  # one per block; the counts below show what the policy recomputes
    assert full[attn] == 4  # full AC recomputes attention in backward...
    assert op[attn] == 2  # ...the op policy keeps its output: no second attention forward
    assert op[mm] == none[mm] < full[mm]  # matmul outputs saved too
    assert op[silu] == full[silu] == 2 * none[silu]  # the cheap element-wise ops are recomputed


def test_wrapped_blocks_keep_names_and_weights():
    plain = _model(MODES["none"], n_layers=6, seq=16)
    every2 = _model(MODES["selective_2"], n_layers=6, seq=16)
    wrapped = [k for k, b in every2.layers.items() if type(b).__name__ == "CheckpointWrapper"]
    assert wrapped == ["1", "3", "5"]
    a, b = get_model_state_dict(plain), get_model_state_dict(every2)
    assert list(a) == list(b)  # checkpoints load across AC settings
    for name in a:
        assert torch.equal(a[name], b[name]), name  # init_weights seeds by the unwrapped name


@pytest.mark.parametrize(
    "overrides",
    [
        ("--activation_checkpoint.mode", "full"),
        ("--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "2"),
        ("--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op"),
    ],
    ids=["full", "selective_layer", "selective_op"],
)
def test_ac_trains_like_eager(tmp_path, overrides):
    trainer = train(tmp_path, *overrides)
    got = losses(trainer)
    want = baseline_losses()
    assert len(got) == STEPS
    # Recomputation runs the same fp32 kernels on the same inputs: the same training, to rounding.
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.tensor(grad_norms(trainer)), torch.tensor(baseline_grad_norms()), rtol=1e-6, atol=0)


@pytest.mark.parametrize("option", ["abc", "0", "-1", "1.5", "OP"])
def test_selective_ac_option_must_be_int_or_op(option):
    with pytest.raises(ConfigError) as e:
        load_config(["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", option])
    msg = str(e.value)
    assert f"activation_checkpoint.selective_ac_option={option!r}" in msg
    assert "positive integer N" in msg and '"op"' in msg


def test_unknown_ac_mode_is_named():
    with pytest.raises(ConfigError, match=r"activation_checkpoint.mode='ful' is not one of 'none', 'full', 'selective', "
                                          r"'memory_budget'"):
        load_config(["--activation_checkpoint.mode", "ful"])


def _saved_bytes_compiled(budget: float | None) -> int:
    """Bytes saved for backward in one forward of the aot_eager-compiled blocks (saved_tensors_hooks see
    what the compiled function saves), under memory_budget_context (None: outside any)."""
    import torch._dynamo

    torch._dynamo.reset()  # (each budget is a new partition of the same blocks)
    model = _model(MODES["none"], n_layers=2, seq=128)
    for layer_id, block in list(model.layers.items()):
        model.layers.register_module(layer_id, torch.compile(block, backend="aot_eager", fullgraph=True))
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    ac = ActivationCheckpoint(mode="memory_budget", memory_budget=budget) if budget is not None else MODES["none"]
    with memory_budget_context(ac), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(_tokens(model)).float().pow(2).mean().backward()
    torch._dynamo.reset()
    return total[0]


def test_memory_budget_lowers_what_the_compiled_blocks_save():
    """torchtitan's mode = "memory_budget": the budget reaches the compiler's partitioner, and saved
    activations fall with it; 1.0 is the compiler's default, and the setting is restored afterwards."""
    import torch._functorch.config as functorch_config

    saved = {b: _saved_bytes_compiled(b) for b in (0.0, 0.5, 1.0)}
    assert saved[0.0] < saved[0.5] < saved[1.0] == _saved_bytes_compiled(None), saved
    assert saved[1.0] - saved[0.0] > 0.3 * saved[1.0], saved  # a real trade, not rounding
    assert functorch_config.activation_memory_budget == 1.0


def test_memory_budget_trains_like_eager_with_the_budget_in_force(tmp_path, monkeypatch):
    """20 steps of the compiled debug model at budget 0.0 (the most recompute) against eager fp32; the
    budget is in force while the trainer compiles (inside train()), and only then."""
    import torch._dynamo
    import torch._functorch.config as functorch_config

    from torchtitan_like.trainer import Trainer

    seen: list[float] = []
    step = Trainer.train_step

    def recording(self, batches):
        seen.append(functorch_config.activation_memory_budget)
        return step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", recording)
    torch._dynamo.reset()
    trainer = train(tmp_path, "--compile.enable", "--compile.backend", "aot_eager", "--activation_checkpoint.mode",
                    "memory_budget", "--activation_checkpoint.memory_budget", "0.0")
    torch._dynamo.reset()
    assert seen == [0.0] * STEPS and functorch_config.activation_memory_budget == 1.0
    assert all(type(b).__name__ == "OptimizedModule" for b in trainer.model_parts[0].layers.values())
    # The compile tests' tolerance (test_compile.py): recomputation reruns the same fp32 ops.
    torch.testing.assert_close(torch.tensor(losses(trainer)), torch.tensor(baseline_losses()), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(grad_norms(trainer)), torch.tensor(baseline_grad_norms()), rtol=1e-4, atol=0)


@pytest.mark.parametrize("overrides, message", [
    ([], r'mode="memory_budget" is carried out by torch.compile\'s partitioner .* but compile.enable=false'),
    (["--compile.enable", "--compile.backend", "eager"], "compile.backend='eager' does not partition the graph"),
    (["--compile.enable", "--compile.components", "loss"], r"compile.components=\['loss'\] has no \"model\""),
    (["--compile.enable", "--activation_checkpoint.memory_budget", "1.5"],
     r"activation_checkpoint.memory_budget=1.5 must be between 0.0"),
])
def test_memory_budget_needs_compiled_blocks_and_a_budget_in_range(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["--activation_checkpoint.mode", "memory_budget", *overrides])
