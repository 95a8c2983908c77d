"""training.eod_mask_loss: the loss leaves out each position whose input token is the tokenizer's eos, in
training and validation, and nothing else changes. The layouts' parity with one process is in
tests/distributed/test_document_mask_parity.py."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from feature_runs import argv

from torchtitan_like.components.loss import IGNORE_INDEX, mask_after_eos
from torchtitan_like.config.loader import load_config
from torchtitan_like.errors import TrainingError
from torchtitan_like.trainer import Trainer


def _short_docs(path: Path, n: int, seed: int) -> Path:
    """Documents of 1 to 8 words: every 32-token sequence holds several eos tokens."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta model layer mask batch shard stage rank loss".split()
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))}) + "\n"
                            for _ in range(n)))
    return path


def test_mask_after_eos_marks_the_label_after_each_eos() -> None:
    inputs = torch.tensor([[5, 2, 7, 2], [2, 3, 4, 6]])
    labels = torch.tensor([[2, 7, 2, 9], [3, 4, 6, 8]])
    masked = mask_after_eos(inputs, labels, eos_id=2)
    assert masked.tolist() == [[2, IGNORE_INDEX, 2, IGNORE_INDEX], [IGNORE_INDEX, 4, 6, 8]]
    assert labels.tolist() == [[2, 7, 2, 9], [3, 4, 6, 8]], "the loader's labels must not change in place"


def _per_token_loss(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(inputs)  # (bs, seqlen, vocab)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none").view_as(labels)


@pytest.mark.parametrize("masked, chunk", [(True, 0), (True, 8), (False, 0)])
def test_train_and_validation_loss_leave_out_the_positions_after_eos(masked: bool, chunk: int, tmp_path: Path) -> None:
    """Step 1's loss and a validation before it, against the mean of per-token losses computed here over the
    positions whose input is not eos (masked) or over all of them (the default); also with the loss computed
    8 positions at a time (training.loss_chunk_size)."""
    train, val = _short_docs(tmp_path / "train.jsonl", 200, seed=1), _short_docs(tmp_path / "val.jsonl", 60, seed=2)
    args = argv(
        tmp_path / "run",
        "--training.dataset", "local", "--training.dataset_path", str(train), "--training.prefetch_batches", "0",
        "--training.steps", "1", "--training.local_batch_size", "4",
        "--validation.enable", "--validation.dataset", "local", "--validation.dataset_path", str(val),
        "--validation.seq_len", "32", "--validation.local_batch_size", "4", "--validation.steps", "1",
        "--training.loss_chunk_size", str(chunk), *(["--training.eod_mask_loss"] if masked else []),
    )
    trainer = Trainer(load_config(args))
    try:
        eos = trainer._special_tokens[1]
        model = trainer.model_parts[0]
        # The first batches, from throwaway iterators (neither stream moves).
        inputs, labels = next(iter(trainer.dataloader.dataset))  # (4, 32): the whole first step
        val_inputs, val_labels = next(iter(trainer.validator.dataset))
        keep, val_keep = inputs != eos, val_inputs != eos
        assert (~keep).sum() >= 8 and (~val_keep).sum() >= 8, "the data should hold several eos per batch"
        per_token = _per_token_loss(model, inputs, labels)
        val_per_token = _per_token_loss(model, val_inputs, val_labels)
        want = (per_token[keep] if masked else per_token).mean().item()
        val_want = (val_per_token[val_keep] if masked else val_per_token).mean().item()
        # The two means differ, so each assertion below tells masking from not masking.
        assert abs(per_token[keep].mean() - per_token.mean()) > 1e-3
        assert abs(val_per_token[val_keep].mean() - val_per_token.mean()) > 1e-3

        val_loss = trainer.validator.validate(trainer.model_parts)["val_loss"]
        trainer.train()
    finally:
        trainer.close()
    assert trainer.history[0]["loss"] == pytest.approx(want, rel=1e-5)
    assert val_loss == pytest.approx(val_want, rel=1e-5)


def test_synthetic_data_gets_the_tokenizer_eos_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Synthetic data needs no tokenizer, except to know which token is eos."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="torchtitan_like.trainer"):
        trainer = Trainer(load_config(argv(
            tmp_path / "run", "--training.dataset", "synthetic", "--training.eod_mask_loss", "--training.steps", "1",
        )))
        try:
            trainer.train()
        finally:
            trainer.close()
    eos = trainer._special_tokens[1]
    lines = [r.getMessage() for r in caplog.records if "eod_mask_loss" in r.getMessage()]
    assert lines == [f"loss: positions whose input is eos (token {eos}) are left out, in training and validation "
                     f"(training.eod_mask_loss)"]


def test_a_step_with_every_label_masked_stops_with_an_error(tmp_path: Path) -> None:
    """A global batch of nothing but eos tokens leaves no label: an error naming the key, not a 0/0 loss."""
    trainer = Trainer(load_config(argv(tmp_path / "run", "--training.dataset", "synthetic", "--training.eod_mask_loss")))
    try:
        eos = trainer._special_tokens[1]
        inputs = torch.full((2, 32), eos, dtype=torch.long)
        before = {n: p.detach().clone() for n, p in trainer.model_parts[0].named_parameters()}
        batches = trainer._next_batches(iter([(inputs, inputs.clone())]))
        with pytest.raises(TrainingError, match=r"every label of the global batch is masked \(training.eod_mask_loss"):
            trainer.train_step(batches)
        for n, p in trainer.model_parts[0].named_parameters():
            assert torch.equal(p, before[n]), f"{n} changed"
    finally:
        trainer.close()
