"""[validation] in one process: held-out data, the metrics it adds, and that training does not notice it."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch

from torchtitan_like.components.loss import cross_entropy_sum
from torchtitan_like.components.validation import HeldOutEmbeddedSource
from torchtitan_like.config.loader import load_config
from torchtitan_like.data.sources import EmbeddedSource
from torchtitan_like.errors import ConfigError
from torchtitan_like.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
VALIDATION = (
    "--validation.enable", "--validation.freq", "2", "--validation.steps", "2",
    "--validation.seq_len", "32", "--validation.local_batch_size", "2",
)


def argv(dump: Path, *overrides: str) -> list[str]:
    return [
        "--job.config_file", str(ROOT / "train_configs/debug_model.toml"),
        "--job.dump_folder", str(dump),
        "--training.seq_len", "32",
        "--training.local_batch_size", "2",
        "--training.steps", "4",
        "--metrics.log_freq", "3",
        "--metrics.no_enable_tensorboard",
        "--debug.deterministic",
        *overrides,
    ]


@pytest.fixture(autouse=True)
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def run(dump: Path, *overrides: str) -> Trainer:
    trainer = Trainer(load_config(argv(dump, *overrides)))
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer


def test_embedded_validation_data_is_held_out_from_training():
    held_out = set(HeldOutEmbeddedSource(seed=0).files)
    assert held_out and held_out.isdisjoint(EmbeddedSource(seed=0).files)


def test_validation_adds_val_loss_and_leaves_training_alone(tmp_path):
    plain = run(tmp_path / "plain")
    validated = run(tmp_path / "validated", *VALIDATION)
    # The training stream, its position and the weights are untouched: the same losses, the same
    # loader state to checkpoint.
    assert [h["loss"] for h in validated.history] == [h["loss"] for h in plain.history]
    assert validated.dataloader.state_dict() == plain.dataloader.state_dict()
    assert all(m.training for m in validated.model_parts)  # train mode is back after each validation

    rows = [json.loads(line) for line in (tmp_path / "validated" / "metrics.jsonl").read_text().splitlines()]
    # log_freq 3 logs step 3 and the last step; validation adds its own rows at steps 2 and 4.
    assert [r["step"] for r in rows] == [2, 3, 4]
    with_val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in with_val] == [2, 4]
    for r in with_val:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert 0 < r["val_loss"] < 10  # ln(vocab 2000) = 7.6 at init
    assert "val_loss" not in rows[1]


def test_the_last_step_validates_whatever_the_freq(tmp_path):
    """validation.freq=3 in a run of 4 steps validated at step 3 only: the final weights had no val_loss."""
    overrides = [a if a != "2" or VALIDATION[i - 1] != "--validation.freq" else "3" for i, a in enumerate(VALIDATION)]
    run(tmp_path, *overrides)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 4]


def test_validation_loss_is_the_mean_token_loss_of_the_held_out_batches(tmp_path):
    trainer = Trainer(load_config(argv(tmp_path, *VALIDATION)))
    try:
        got = trainer.validator.validate(trainer.model_parts)
        model = trainer.model_parts[0]
        total, tokens = 0.0, 0
        with torch.no_grad():
            for i, (inputs, labels) in enumerate(trainer.validator.dataset):
                if i == 2:
                    break
                total += float(cross_entropy_sum(model(inputs), labels))
                tokens += labels.numel()
    finally:
        trainer.close()
    assert got["val_loss"] == pytest.approx(total / tokens, rel=1e-6)
    assert got["val_ppl"] == pytest.approx(math.exp(total / tokens), rel=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("--validation.dataset", "local"), "validation.dataset='local' needs validation.dataset_path"),
        (("--validation.dataset", "synthetic"), "validation.steps=-1 (the whole dataset) would never finish"),
        (("--validation.seq_len", "64"), "validation.seq_len=64 exceeds training.seq_len (the model's RoPE length)=32"),
        (("--validation.steps", "0"), "validation.steps=0 is out of range: must be -1 (the whole dataset) or >= 1"),
        (("--validation.freq", "0"), "validation.freq=0 is out of range: must be >= 1"),
        (("--validation.local_batch_size", "0"), "validation.local_batch_size=0 is out of range: must be >= 1"),
    ],
)
def test_validation_config_errors(tmp_path, overrides, message):
    base = ("--validation.enable", "--validation.seq_len", "32")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(argv(tmp_path, *base, *overrides))


def test_with_a_loss_chunk_size_validation_never_builds_whole_logits(tmp_path):
    trainer = Trainer(load_config(argv(tmp_path, *VALIDATION, "--training.loss_chunk_size", "8")))
    model = trainer.model_parts[0]
    projected: list[int] = []  # positions per call of the output projection
    hook = model.output.register_forward_hook(lambda _, inputs, out: projected.append(out.shape[1]))
    try:
        got = trainer.validator.validate(trainer.model_parts)
        hook.remove()
        total, tokens = 0.0, 0
        with torch.no_grad():
            for i, (inputs, labels) in enumerate(trainer.validator.dataset):
                if i == 2:
                    break
                total += float(cross_entropy_sum(model(inputs), labels))  # whole logits: the reference
                tokens += labels.numel()
    finally:
        trainer.close()
    # 2 batches of 32 positions, 8 at a time, as training.loss_chunk_size asks of training.
    assert projected == [8] * 8
    assert got["val_loss"] == pytest.approx(total / tokens, rel=1e-6)


def test_validation_seq_len_follows_the_sequence_parallel_rule():
    from torchtitan_like.components.validation import check_layout
    from torchtitan_like.config.schema import Validation

    check_layout(Validation(seq_len=32), tp=2, cp=1)
    with pytest.raises(ConfigError, match=r"validation.seq_len=30 must be divisible by tensor_parallel_degree\(2\) x 2"):
        check_layout(Validation(seq_len=30), tp=2, cp=1)


def test_validation_under_context_parallel_takes_training_sequences():
    from torchtitan_like.components.validation import check_layout
    from torchtitan_like.config.schema import Training, Validation

    check_layout(Validation(seq_len=64), tp=1, cp=2, training=Training(seq_len=64))
    # 32 would split into 2 x cp chunks, but the RoPE table CP shards with it is 64 positions long.
    with pytest.raises(ConfigError, match=re.escape(
        "validation.seq_len=32 must equal training.seq_len=64 with parallelism.context_parallel_degree=2"
    )) as e:
        check_layout(Validation(seq_len=32), tp=1, cp=2, training=Training(seq_len=64))
    assert "set validation.seq_len=64" in str(e.value)


def test_a_validation_set_smaller_than_one_batch_is_a_data_error_at_start_up(tmp_path):
    from torchtitan_like.errors import DataError

    data = tmp_path / "tiny.jsonl"
    data.write_text(json.dumps({"text": "def f():\n    return 1\n"}) + "\n")
    # Before the first step, not validation.freq steps into the run.
    with pytest.raises(DataError, match="validation: the local dataset holds less than one global batch"):
        Trainer(load_config(argv(
            tmp_path, *VALIDATION, "--validation.dataset", "local", "--validation.dataset_path", str(data),
            "--validation.steps", "-1",
        )))


def test_validation_steps_beyond_the_data_warn_once(tmp_path, caplog):
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 40}) + "\n"
                            for i in range(8)))
    trainer = Trainer(load_config(argv(
        tmp_path, *VALIDATION, "--validation.dataset", "local", "--validation.dataset_path", str(data),
        "--validation.steps", "1000",
    )))
    try:
        caplog.set_level(logging.WARNING, logger="torchtitan_like")
        first = trainer.validator.validate(trainer.model_parts)
        assert trainer.validator.validate(trainer.model_parts) == first
    finally:
        trainer.close()
    warnings = [r.getMessage() for r in caplog.records if "validation.steps=1000" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "holds only" in warnings[0] and "global batches" in warnings[0]


def test_validation_seq_len_defaults_to_the_training_one(tmp_path, caplog):
    # It defaulted to 2048, which the debug config (seq_len 256) refused as longer than its RoPE table.
    on = ("--validation.enable", "--validation.dataset", "synthetic", "--validation.steps", "1")
    assert load_config(argv(tmp_path, *on)).validation.seq_len == 32
    assert load_config(argv(tmp_path, *on, "--training.seq_len", "64")).validation.seq_len == 64
    assert load_config(argv(tmp_path, *on, "--validation.seq_len", "16")).validation.seq_len == 16
    off = load_config(argv(tmp_path))
    assert off.validation.seq_len is None
    from torchtitan_like.config.validate import ignored_settings

    assert not [s for s in ignored_settings(off, pp=1) if "validation" in s]
    assert [s for s in ignored_settings(load_config(argv(tmp_path, "--validation.seq_len", "16")), pp=1)
            if "validation.seq_len" in s]


def test_a_validation_global_batch_is_read_as_microbatches(tmp_path, caplog):
    """validation.global_batch_size fixes the sequences validated whatever the data-parallel degree; each
    rank reads its share as microbatches of local_batch_size, and validation.steps counts global batches."""
    def val(dump: Path, *overrides: str) -> tuple[float, str]:
        trainer = Trainer(load_config(argv(dump, *VALIDATION, "--validation.steps", "2", *overrides)))
        try:
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="torchtitan_like.components.validation"):
                loss = trainer.validator.validate(trainer.model_parts)["val_loss"]
            return loss, caplog.text
        finally:
            trainer.close()

    whole, whole_log = val(tmp_path / "a", "--validation.local_batch_size", "4")
    micro, micro_log = val(tmp_path / "b", "--validation.local_batch_size", "2", "--validation.global_batch_size", "4")
    half, _ = val(tmp_path / "c", "--validation.local_batch_size", "2")  # global 2: other (fewer) sequences
    assert micro == pytest.approx(whole, rel=1e-6) and half != pytest.approx(whole, rel=1e-6)
    # 2 global batches of 4 sequences of 33 tokens, read as 4 microbatches of 2.
    assert "over 2 batches (256 tokens)" in whole_log and "over 2 batches (256 tokens)" in micro_log


def test_a_validation_global_batch_that_does_not_divide_is_refused(tmp_path):
    from torchtitan_like.trainer import check_job

    cfg = load_config(argv(tmp_path, *VALIDATION, "--validation.local_batch_size", "4", "--validation.global_batch_size", "6"))
    with pytest.raises(ConfigError, match=re.escape(
        "validation.global_batch_size=6 must be a positive multiple of validation.local_batch_size=4 x data-parallel "
        "degree 1 = 4 (try validation.global_batch_size=4 or 8, or validation.local_batch_size in [1, 2, 3, 6]; -1 means 4)"
    )):
        check_job(cfg, 1)


def test_validating_the_whole_embedded_set_is_flagged_at_start(tmp_path, caplog):
    # ./run_train.sh --validation.enable: steps -1 on the embedded set is ~3,000 global batches of the
    # debug config, minutes on a CPU at every validation.
    def warned(*overrides: str) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="torchtitan_like.trainer"):
            Trainer(load_config(argv(tmp_path, "--validation.enable", *overrides))).close()
        return [r.getMessage() for r in caplog.records if "embedded held-out set" in r.getMessage()]

    (line,) = warned()
    assert re.search(r"validation.steps=-1 validates the whole embedded held-out set \(\d+ MB of Python source, "
                     r"about \d+ global batches\) every 10 steps: set validation.steps to a number", line), line
    assert int(re.search(r"about (\d+) global", line).group(1)) > 1000  # 8 x 33 tokens a batch
    assert warned("--validation.steps", "10") == []


def test_the_run_summary_leaves_validation_time_out_of_the_training_rate(tmp_path, caplog, monkeypatch):
    # The summary's tokens/s and its time-to-train projections counted validation as training time (a long
    # validation made a 2,800 tokens/s run report 283).
    import time as time_module

    from torchtitan_like.components.validation import Validator

    def slow_validate(self, model_parts, **kwargs):
        time_module.sleep(1.5)
        return {"val_loss": 1.0, "val_ppl": math.e}

    monkeypatch.setattr(Validator, "validate", slow_validate)
    t0 = time_module.perf_counter()
    with caplog.at_level(logging.INFO, logger="torchtitan_like.components.metrics"):
        run(tmp_path, *VALIDATION)  # 4 steps, validating at 2 and 4
    wall = time_module.perf_counter() - t0
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("summary:")]
    m = re.search(r"tokens in ([\d.]+) s \(plus ([\d.]+) s validating\)", line)
    assert m, line
    training, validating = float(m.group(1)), float(m.group(2))
    assert validating >= 3.0 and training + validating <= wall and training < wall - 3.0


def test_the_validation_batch_hint_under_pipeline_parallel_offers_no_local_batch():
    from torchtitan_like.components.validation import check_layout, validation_global_batch
    from torchtitan_like.config.schema import Training, Validation

    val = Validation(enable=True, seq_len=64, local_batch_size=4, global_batch_size=12)
    with pytest.raises(ConfigError) as e:
        # (check_layout's own PP rules come first, some of them torch-version dependent: called directly.)
        validation_global_batch(val, 2, pp=2)  # PP fixes local_batch_size to training's
    assert "try validation.global_batch_size=8 or 16; -1 means 8" in str(e.value) and "local_batch_size in" not in str(e.value)
    with pytest.raises(ConfigError, match=r"or validation.local_batch_size in \[1, 2, 3, 6\]"):
        check_layout(val, tp=1, cp=1, pp=1, dp=2, training=Training(seq_len=64, local_batch_size=4))
