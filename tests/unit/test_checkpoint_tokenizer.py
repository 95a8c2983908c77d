"""A checkpoint records the tokenizer it was trained with (its fingerprint, kind, vocabulary size and file).

Resuming with another tokenizer of the same vocabulary size once went unnoticed: the data stream went on
with other ids for the same text. Now refused, naming model.tokenizer_path and the checkpoint's tokenizer;
the same vocabulary from another file (the tokenizer.json converted from the tokenizer.model) resumes, a
model-only initial load (fine-tuning with a new tokenizer) still works, with a warning, and a checkpoint
without the record loads as before.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from feature_runs import train
from torchtitan_like.components.checkpoint import CheckpointError
from torchtitan_like.components.hf_tokenizer import tokenizer_json
from torchtitan_like.components.manifest import MANIFEST
from torchtitan_like.components.tokenizer import DEFAULT_TOKENIZER_PATH, build_tokenizer

pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
              pytest.mark.usefixtures("restore_root_logger")]


def _swapped_tokenizer(folder: Path) -> Path:
    """The embedded tokenizer.model with the ranks of two tokens exchanged: the same vocabulary size, other ids."""
    lines = DEFAULT_TOKENIZER_PATH.read_text().splitlines()
    (a, ra), (b, rb) = (lines[1000].split(), lines[1001].split())
    lines[1000], lines[1001] = f"{a} {rb}", f"{b} {ra}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return folder / "tokenizer.model"


def test_resuming_with_another_tokenizer_of_the_same_size_is_refused(tmp_path: Path, caplog) -> None:
    dump = tmp_path / "run"
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "2"]
    train(dump, "--training.steps", "2", *ckpt)
    step2 = dump / "checkpoint" / "step-2"
    embedded = build_tokenizer("")
    record = json.loads((step2 / MANIFEST).read_text())["tokenizer"]
    assert record == {"fingerprint": embedded.fingerprint(), "vocab_size": 2000, "kind": "tokenizer.model",
                      "file": str(DEFAULT_TOKENIZER_PATH)}

    other = _swapped_tokenizer(tmp_path / "other")
    assert build_tokenizer(str(other)).vocab_size == embedded.vocab_size
    with pytest.raises(CheckpointError, match=rf"{step2} was trained with the tokenizer {DEFAULT_TOKENIZER_PATH}: "
                                              rf"tokenizer.model, vocab 2000, .*but model.tokenizer_path gives another: "
                                              rf"{other}.*set model.tokenizer_path to the checkpoint's tokenizer.*"
                                              rf"checkpoint.initial_load_path={step2}"):
        train(dump, "--training.steps", "4", *ckpt, "--model.tokenizer_path", str(other))
    # The same ids from a tokenizer.json: resumes.
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "tokenizer.json").write_text(json.dumps(tokenizer_json(embedded)))
    assert train(dump, "--training.steps", "3", *ckpt, "--model.tokenizer_path", str(tmp_path / "json")).step == 3

    # Fine-tuning with a new tokenizer on purpose: a new run from the weights alone, with a warning.
    caplog.set_level(logging.WARNING, logger="torchtitan_like.components.checkpoint")
    tuned = train(tmp_path / "tuned", "--training.steps", "1", "--checkpoint.initial_load_path", str(step2),
                  "--model.tokenizer_path", str(other))
    assert tuned.step == 1 and "was trained with another tokenizer" in caplog.text
    # ... not its data position (initial_load_model_only=false).
    with pytest.raises(CheckpointError, match="checkpoint.initial_load_model_only=true to start from its weights"):
        train(tmp_path / "cont", "--training.steps", "3", "--checkpoint.initial_load_path", str(step2),
              "--checkpoint.no_initial_load_model_only", "--model.tokenizer_path", str(other))

    # A checkpoint from before the record: loads as before.
    manifest = json.loads((step2 / MANIFEST).read_text())
    del manifest["tokenizer"]
    (step2 / MANIFEST).write_text(json.dumps(manifest))
    old = dump / "checkpoint" / "step-3"
    old.rename(tmp_path / "step-3")
    assert train(dump, "--training.steps", "3", *ckpt, "--model.tokenizer_path", str(other)).step == 3
