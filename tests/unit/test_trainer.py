"""The training loop in one process: accumulation semantics, divergence, determinism."""

from __future__ import annotations

import pytest
import torch

from torchtitan_like.config.loader import load_config
from torchtitan_like.errors import ConfigError, TrainingError
from torchtitan_like.trainer import Trainer


def make_trainer(tmp_path, *overrides: str) -> Trainer:
    cfg = load_config(
        [
            "--job.config_file", "train_configs/debug_model.toml",
            "--job.dump_folder", str(tmp_path),
            "--training.seq_len", "64",
            "--training.steps", "4",
            "--metrics.no_enable_tensorboard",
            "--debug.deterministic",
            *overrides,
        ]
    )
    return Trainer(cfg)


def full_params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for m in trainer.model_parts for n, p in m.named_parameters()}


@pytest.fixture(autouse=True)
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    big = make_trainer(tmp_path / "big", "--training.local_batch_size", "8", "--training.global_batch_size", "8")
    acc = make_trainer(tmp_path / "acc", "--training.local_batch_size", "2", "--training.global_batch_size", "8")
    assert big.grad_accum == 1 and acc.grad_accum == 4
    for t in (big, acc):
        t.train()
        t.close()
    for a, b in zip(big.history, acc.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    pa, pb = full_params(big), full_params(acc)
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], rtol=1e-4, atol=1e-5, msg=name)


def test_same_seed_same_run_and_loss_falls(tmp_path):
    runs = []
    for i in range(2):
        t = make_trainer(tmp_path / str(i), "--training.steps", "12", "--lr_scheduler.warmup_steps", "2")
        assert t.cfg.optimizer.lr == 3e-3
        t.train()
        t.close()
        runs.append([h["loss"] for h in t.history])
    assert runs[0] == runs[1]  # bitwise: deterministic fp32 on one process
    assert sum(runs[0][-3:]) / 3 < runs[0][0] - 0.5


def test_nan_loss_stops_with_the_step(tmp_path):
    # An absurd learning rate blows the weights up after the first update.
    t = make_trainer(tmp_path, "--optimizer.lr", "1e30", "--lr_scheduler.warmup_steps", "0", "--training.max_norm", "0")
    with pytest.raises(TrainingError, match=r"at step 2\b.*optimizer.lr"):
        t.train()
    t.close()
    assert len(t.history) == 1


def test_tokenizer_larger_than_model_vocab_is_an_error(tmp_path):
    # 2000 base tokens + 256 specials = 2256 > debugmodel's vocab_size 2000.
    import base64
    import itertools

    tokens = [bytes([b]) for b in range(256)]
    tokens += [bytes(p) for p in itertools.islice(itertools.product(range(97, 123), repeat=3), 2000 - 256)]
    path = tmp_path / "big.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    with pytest.raises(ConfigError, match=r"2256.*2000"):
        make_trainer(tmp_path, "--model.tokenizer_path", str(path))


def test_a_dataset_path_that_the_dataset_does_not_read_is_named_in_a_warning(tmp_path, caplog):
    # training.dataset is still the default "embedded": a path set next to it would be silently unused.
    with caplog.at_level("WARNING", logger="torchtitan_like.trainer"):
        trainer = make_trainer(tmp_path, "--training.dataset_path", str(tmp_path / "corpus.jsonl"))
        trainer.close()
    assert "training.dataset_path=" in caplog.text and "is not read" in caplog.text
    assert "training.dataset='embedded'" in caplog.text


def test_deterministic_warn_only_reaches_torch(tmp_path):
    trainer = make_trainer(tmp_path / "warn", "--debug.deterministic_warn_only", "--model.n_layers", "1")
    try:
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        trainer.close()
    trainer = make_trainer(tmp_path / "strict", "--model.n_layers", "1")
    try:
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        trainer.close()


def test_bf16_storage_resumes_exactly_and_starts_from_float32_weights(tmp_path):
    bf16 = ("--training.dtype", "bfloat16", "--model.n_layers", "2", "--checkpoint.enable",
            "--checkpoint.interval", "2", "--checkpoint.no_last_save_model_only")

    def train(folder, *extra):
        trainer = make_trainer(tmp_path / folder, *bf16, *extra)
        try:
            trainer.train()
        finally:
            trainer.close()
        return trainer

    whole = train("whole")
    assert {p.dtype for p in whole.model_parts[0].parameters()} == {torch.bfloat16}
    assert {t.dtype for st in whole.optimizers[0].state.values() for k, t in st.items() if k != "step"} == {torch.bfloat16}
    train("split", "--training.steps", "2")
    resumed = train("split")  # (steps 3 and 4, from the step-2 checkpoint)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history][2:]
    # A float32 run's weights start a bf16 run: each rounded to bf16.
    fp32 = make_trainer(tmp_path / "fp32", "--model.n_layers", "2", "--checkpoint.enable", "--training.steps", "1")
    try:
        fp32.train()
    finally:
        fp32.close()
    step = next((tmp_path / "fp32").rglob("step-1"))
    start = make_trainer(tmp_path / "from_fp32", *bf16, "--checkpoint.initial_load_path", str(step))
    try:
        got = dict(start.model_parts[0].named_parameters())
        for name, p in fp32.model_parts[0].named_parameters():
            assert torch.equal(got[name], p.detach().to(torch.bfloat16)), name
    finally:
        start.close()


def test_bf16_storage_computes_in_bf16():
    from torchtitan_like.config.schema import Training
    from torchtitan_like.distributed.utils import param_dtype

    assert param_dtype(Training(dtype="bfloat16"), "cpu") == torch.bfloat16  # "auto" follows the storage
    assert param_dtype(Training(), "cpu") == torch.float32
    with pytest.raises(ConfigError, match=r'training.dtype="bfloat16" stores .*mixed_precision_param="float32"'):
        load_config(["--training.dtype", "bfloat16", "--training.mixed_precision_param", "float32"])
