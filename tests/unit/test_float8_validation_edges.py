"""Edge cases of the float8 converter and the validation loop: a float8 filter name that matches no layer,
perplexity of a NaN loss, and validation under torch.compile not reported as a training recompile."""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_profiling import argv  # the debug model at seq 32, batch 2, 4 steps
from torch import nn

from torchtitan_like.components.float8 import Float8Converter, is_float8_linear
from torchtitan_like.config.schema import Float8, Parallelism, Validation
from torchtitan_like.distributed.parallel_dims import ParallelDims
from torchtitan_like.errors import ConfigError

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def _one_process() -> ParallelDims:
    return ParallelDims.from_config(Parallelism(), 1)


def _meta_model():
    from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS
    from torchtitan_like.models.llama3.model import Transformer

    args = replace(LLAMA3_FLAVORS["debugmodel"], n_layers=1, max_seq_len=64)
    with torch.device("meta"):
        return Transformer(args)


# ---- float8 --------------------------------------------------------------------------------------


def test_filter_fqns_entry_matching_no_linear_is_refused():
    model = _meta_model()
    cfg = Float8(filter_fqns=["output", "lm_head"])  # lm_head: the HF name of this model's `output`
    with pytest.raises(ConfigError, match=r"filter_fqns entries \['lm_head'\] match no linear layer"):
        Float8Converter(cfg, parallel_dims=_one_process(), device=CPU, check_device=False).convert(model)
    assert not is_float8_linear(model.output)  # refused before anything was swapped


# ---- validation ----------------------------------------------------------------------------------


class _NaNLogits(nn.Module):
    """A model whose logits are NaN (a diverged model): (bs, seqlen) -> (bs, seqlen, vocab)."""

    def __init__(self, vocab: int = 16) -> None:
        super().__init__()
        self.vocab = vocab
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.full((*tokens.shape, self.vocab), float("nan")) + self.w


def test_nan_val_loss_gives_nan_perplexity():
    from torchtitan_like.components.validation import Validator

    data = [(torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))]
    v = Validator(
        Validation(enable=True, steps=1, seq_len=8, local_batch_size=2), data, device=CPU, loss_group=None,
        loss_context=contextlib.nullcontext, amp_context=contextlib.nullcontext,
    )
    out = v.validate([_NaNLogits()])
    assert math.isnan(out["val_loss"])
    assert math.isnan(out["val_ppl"]), out


def _compile_argv(dump: Path) -> list[str]:
    return argv(
        dump,
        "--metrics.log_freq", "1",
        "--debug.deterministic",
        "--compile.enable", "--compile.backend", "aot_eager",
        "--validation.enable", "--validation.dataset", "synthetic", "--validation.steps", "1",
        "--validation.freq", "2", "--validation.seq_len", "32", "--validation.local_batch_size", "2",
    )


def test_validation_under_compile_does_not_raise_a_recompile_alarm(tmp_path, caplog):
    import json

    from torchtitan_like.config.loader import load_config
    from torchtitan_like.trainer import Trainer

    torch._dynamo.reset()
    caplog.set_level(logging.INFO, logger="torchtitan_like")
    trainer = Trainer(load_config(_compile_argv(tmp_path)))
    try:
        trainer.train()
    finally:
        trainer.close()
        torch._dynamo.reset()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]  # validation ran
    assert trainer.compile_monitor is not None and trainer.compile_monitor.compiles > 0  # compile ran
    alarms = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.WARNING and "torch.compile recompiled" in r.getMessage()]
    assert not alarms, alarms


def test_a_float8_gemm_cuda_cannot_run_after_the_tp_split_is_refused_at_start():
    """CUDA's _scaled_mm needs both weight dimensions, as each rank multiplies them, divisible by 16.
    The output projection (2000 x 256, converted when filter_fqns is emptied) split by TP 2 is 1000 x 256:
    refused in the dry run (the same check runs at a real start) instead of dying at step 1 on the GPU."""
    from torchtitan_like.dry_run import dry_run

    root = Path(__file__).resolve().parents[2]
    base = ["--job.config_file", str(root / "train_configs/debug_model.toml"), "--training.dataset", "synthetic",
            "--model.converters", "float8", "--parallelism.tensor_parallel_degree", "2"]
    logging.disable(logging.CRITICAL)
    try:
        dry_run(base, world_size=2, rank=0, device="cuda", files=False)  # output kept in high precision: fine
        with pytest.raises(ConfigError, match=r"float8: linear 'output' multiplies a 1000x256 weight on each rank "
                                              r"with tensor parallel's split; CUDA's float8 matmul needs both"):
            dry_run(base + ["--quantize.linear.float8.filter_fqns", ""], world_size=2, rank=0, device="cuda",
                    files=False)
        # One rank holds the whole 2000 x 256: runs.
        dry_run(base[:-2] + ["--quantize.linear.float8.filter_fqns", ""], world_size=1, rank=0, device="cuda",
                files=False)
    finally:
        logging.disable(logging.NOTSET)


def test_a_dry_run_of_a_cuda_job_applies_the_float8_tp_styles_without_a_gpu(caplog):
    """The dry run's mesh is on the CPU on a machine without GPUs; the TP styles are still the ones the
    CUDA job will run (they once fell back to the plain styles, as on a gloo job, for any dry run)."""
    from torchtitan_like.dry_run import dry_run

    root = Path(__file__).resolve().parents[2]
    argv = ["--job.config_file", str(root / "train_configs/debug_model.toml"), "--training.dataset", "synthetic",
            "--model.converters", "float8", "--parallelism.tensor_parallel_degree", "2",
            "--compile.enable", "--activation_checkpoint.mode", "full"]
    lines = {}
    for device in ("cuda", "cpu"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="torchtitan_like.distributed.tensor_parallel"):
            dry_run(argv, world_size=4, rank=1, device=device, files=False)
        (lines[device],) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("applied tensor")]
    from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS

    n = LLAMA3_FLAVORS["debugmodel"].n_layers
    assert lines["cuda"].endswith(f"float8 styles in {n} of {n} blocks)"), lines
    assert lines["cpu"].endswith("float8 styles off on cpu (gloo cannot all-gather float8))"), lines
