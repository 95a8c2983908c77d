"""torch.compile per block and of the loss: parity with eager, composition, the compile report, errors.

One test compiles with inductor (cold: 15-25 s on 2 cores; the inductor cache under /tmp makes a
rerun take a few seconds). The composition test (AC op policy + float8 + compile) uses the
aot_eager backend: the same dynamo capture with fullgraph=True and the same AOTAutograd joint graph
(through the checkpoint and the float8 tensor subclass) as inductor, without inductor's C++
codegen, which would cost another 20-40 s here.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch._dynamo

from feature_runs import STEPS, baseline_grad_norms, baseline_losses, grad_norms, losses, train
from test_float8 import GRAD_NORM_FIRST_TOL, GRAD_NORM_TOL
from torchtitan_like.config.loader import load_config
from torchtitan_like.config.schema import Parallelism, Training
from torchtitan_like.distributed.compile import CompileMonitor
from torchtitan_like.distributed.parallel_dims import ParallelDims
from torchtitan_like.errors import ConfigError
from torchtitan_like.models.llama3.parallelize import parallelize_llama


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # A compiled code object remembers the modules of earlier tests: without a reset, compiling the
    # same block class again for a new Trainer counts as a recompile.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _metric_lines(trainer) -> list[dict]:
    path = trainer.metrics.jsonl_path
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_compiled_blocks_and_loss_train_like_eager(tmp_path):
    trainer = train(tmp_path, "--compile.enable")
    model = trainer.model_parts[0]
    assert all(type(b).__name__ == "OptimizedModule" for b in model.layers.values())
    assert hasattr(trainer.loss_fn, "_torchdynamo_orig_callable")  # the loss is compiled too
    got, want = losses(trainer), baseline_losses()
    assert len(got) == STEPS
    # Inductor fuses and reorders fp32 reductions: rounding-level differences (seen: 1e-7).
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(grad_norms(trainer)), torch.tensor(baseline_grad_norms()), rtol=1e-4, atol=0)
    lines = _metric_lines(trainer)
    assert [r["step"] for r in lines] == [10, 20]
    assert lines[0]["compile_s"] > 0 and lines[-1]["compile_s"] >= lines[0]["compile_s"]
    assert all(r["recompiles"] == 0 for r in lines)  # one shape, one dtype: nothing to recompile


def test_compile_composes_with_selective_ac_and_float8(tmp_path):
    trainer = train(
        tmp_path,
        "--compile.enable", "--compile.backend", "aot_eager",
        "--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op",
        "--model.converters", "float8", "--quantize.linear.float8.emulate",  # CPU float8 matmul: see test_float8.py
    )
    # Every pass is in place: each block compiled around its AC wrapper, float8 linears inside.
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from torchtitan_like.components.float8 import is_float8_linear

    blocks = list(trainer.model_parts[0].layers.values())
    assert all(type(b).__name__ == "OptimizedModule" and isinstance(b._orig_mod, CheckpointWrapper) for b in blocks)
    assert all(sum(is_float8_linear(m) for m in b.modules()) == 7 for b in blocks)
    got, want = torch.tensor(losses(trainer)), torch.tensor(baseline_losses())
    # float8's tolerance (see test_float8.py): 1.5% of the loss at every step; the gradient norm too.
    assert ((got - want).abs() / want).max() <= 0.015
    grad_rel = (torch.tensor(grad_norms(trainer)) - torch.tensor(baseline_grad_norms())).abs() / torch.tensor(
        baseline_grad_norms())
    assert grad_rel[0] <= GRAD_NORM_FIRST_TOL and grad_rel.max() <= GRAD_NORM_TOL, grad_rel
    assert not torch.equal(got, want)
    assert _metric_lines(trainer)[-1]["recompiles"] == 0


def test_compile_loss_only_leaves_blocks_eager(tmp_path):
    cfg = load_config(["--compile.enable", "--compile.components", "loss", "--compile.backend", "eager",
                       "--training.dataset", "synthetic", "--job.dump_folder", str(tmp_path)])
    from torchtitan_like.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        assert not any(type(b).__name__ == "OptimizedModule" for b in trainer.model_parts[0].layers.values())
        assert hasattr(trainer.loss_fn, "_torchdynamo_orig_callable")
    finally:
        trainer.close()


def test_recompiles_are_counted_and_logged(caplog):
    monitor = CompileMonitor()
    try:
        fn = torch.compile(lambda x: x * 2 + 1, backend="eager")
        fn(torch.ones(4))
        fn(torch.ones(4))  # same guards: no compile
        first = monitor.metrics()
        assert first["recompiles"] == 0 and first["compile_s"] > 0
        with caplog.at_level(logging.WARNING, logger="torchtitan_like.distributed.compile"):
            fn(torch.ones(4, dtype=torch.float64))  # dtype guard fails: a recompile
            second = monitor.metrics()
        assert second["recompiles"] == 1 and second["compile_s"] > first["compile_s"]
        assert "recompiled 1 time(s) since the last log (1 in all)" in caplog.text
        assert "TORCH_LOGS=recompiles" in caplog.text
    finally:
        monitor.close()
    fn(torch.ones(4, dtype=torch.int64))  # after close(), nothing is counted any more
    assert monitor.recompiles == 1


def test_recompiles_are_reported_for_the_rank_with_the_most(caplog):
    monitor = CompileMonitor()  # none here; another rank (a pipeline stage) had 3
    try:
        with caplog.at_level(logging.WARNING, logger="torchtitan_like.distributed.compile"):
            assert monitor.metrics(lambda mine: max(mine, 3))["recompiles"] == 3
            assert monitor.metrics(lambda mine: max(mine, 3))["recompiles"] == 3  # no new ones: no warning
    finally:
        monitor.close()
    assert caplog.text.count("recompiled 3 time(s) since the last log (3 in all, on the rank with the most)") == 1


# ---- errors ------------------------------------------------------------------------------------


def _config_error(*argv: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(list(argv))
    return str(e.value)


def test_unknown_compile_component_is_named():
    msg = _config_error("--compile.enable", "--compile.components", "model,los")
    assert "compile.components='los' is not one of 'model', 'loss' (did you mean 'loss'?)" in msg


def test_compile_component_listed_twice():
    assert "compile.components=['model', 'model'] lists a component twice" in _config_error(
        "--compile.components", "model,model"
    )


def test_compile_with_no_components_compiles_nothing():
    msg = _config_error("--compile.enable", "--compile.components", "")
    assert "compile.enable=true with compile.components=[] compiles nothing" in msg


def test_async_tp_needs_compile():
    msg = _config_error("--parallelism.tensor_parallel_degree", "2", "--parallelism.enable_async_tensor_parallel")
    assert "parallelism.enable_async_tensor_parallel=true needs compile.enable=true" in msg
    assert "CUDA" in msg and "set it to false" in msg


@pytest.mark.parametrize("backend", ["aot_eager", "eager"])
def test_async_tp_needs_the_inductor_backend(backend):
    """Async TP is inductor's micro-pipeline pass: with another backend it was accepted and did nothing."""
    msg = _config_error("--parallelism.tensor_parallel_degree", "2", "--parallelism.enable_async_tensor_parallel",
                        "--compile.enable", "--compile.backend", backend)
    assert 'parallelism.enable_async_tensor_parallel=true needs compile.backend="inductor"' in msg
    assert f"the {backend!r} backend never runs" in msg and "set enable_async_tensor_parallel=false" in msg


def test_async_tp_needs_cuda():
    p = Parallelism(tensor_parallel_degree=2, enable_async_tensor_parallel=True)
    dims = ParallelDims.from_config(p, 2)  # compile is on (validated elsewhere); the device is not CUDA
    with pytest.raises(ConfigError, match=r"enable_async_tensor_parallel=true needs CUDA .*not cpu: set it to false"):
        parallelize_llama(None, dims, parallelism=p, training=Training(), device_type="cpu")  # type: ignore[arg-type]


def test_async_tp_on_a_cpu_job_is_refused_before_anything_is_built(monkeypatch):
    """The Trainer checks the device first (it was refused only when parallelizing, after the data and the
    collectives were set up)."""
    import torchtitan_like.trainer as trainer_mod
    from torchtitan_like.dry_run import dry_run

    monkeypatch.setattr(trainer_mod, "check_job", lambda *a, **k: pytest.fail("checked the job before the device"))
    argv = ["--parallelism.tensor_parallel_degree", "2", "--compile.enable", "--parallelism.enable_async_tensor_parallel"]
    with pytest.raises(ConfigError, match=r"enable_async_tensor_parallel=true needs CUDA .*not cpu"):
        dry_run(argv, world_size=2, rank=0, device="cpu")


def test_compile_caches_are_keyed_by_process_group_names_after_the_users_tag(monkeypatch):
    import torch.compiler.config

    from torchtitan_like.distributed.compile import CACHE_KEY_TAG_ENV, separate_compile_caches

    before = torch.compiler.config.cache_key_tag
    try:
        monkeypatch.delenv(CACHE_KEY_TAG_ENV, raising=False)
        assert separate_compile_caches({"tp": "4", "dp_shard": "2"}) == "process groups dp_shard=2,tp=4"
        assert torch.compiler.config.cache_key_tag == "process groups dp_shard=2,tp=4"
        # A second trainer in the process replaces the tag rather than adding to it; a user's own tag stays first.
        monkeypatch.setenv(CACHE_KEY_TAG_ENV, "mine")
        assert separate_compile_caches({"tp": "3"}) == "mine;process groups tp=3"
    finally:
        torch.compiler.config.cache_key_tag = before
