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


def test_over_indexed_data_another_tokenizer_is_a_warning_not_a_refusal(tmp_path: Path, caplog) -> None:
    """Indexed data's ids were fixed when it was pretokenized: a resume with another model.tokenizer_path reads the
    same tokens, so "resuming would train on other tokens" was untrue there. It is said as a warning."""
    from torchtitan_like.data.indexed import write_indexed

    records = [[(7 * i + j) % 1900 + 50 for j in range(40 + i)] for i in range(200)]
    (tmp_path / "data").mkdir()
    write_indexed(tmp_path / "data" / "corpus", records, vocab_size=2000)
    dump = tmp_path / "run"
    args = ["--checkpoint.enable", "--checkpoint.interval", "2", "--training.dataset", "indexed",
            "--training.dataset_path", str(tmp_path / "data" / "corpus")]
    train(dump, "--training.steps", "2", *args)
    caplog.set_level(logging.WARNING, logger="torchtitan_like.components.checkpoint")
    other = _swapped_tokenizer(tmp_path / "other")
    assert train(dump, "--training.steps", "3", *args, "--model.tokenizer_path", str(other)).step == 3
    assert "was trained with the tokenizer" in caplog.text and "the same ids mean other text" in caplog.text


def test_every_rank_raises_when_one_rank_reads_another_tokenizer() -> None:
    """Each rank reads its own tokenizer file (one node's copy may differ): the check is agreed over the ranks, so
    a rank whose own copy matches raises the same error instead of going on into a load its peers left."""
    from types import SimpleNamespace

    from torchtitan_like.components.checkpoint import CheckpointManager

    identity = build_tokenizer("").identity()
    mgr = object.__new__(CheckpointManager)
    mgr.tokenizer, mgr.tokenizer_key, mgr.tokenizer_mismatch = identity, "model.tokenizer_path", "error"
    mgr.cfg = SimpleNamespace(initial_load_model_only=True)
    mgr._dist = True
    mgr._all_gather = lambda own: [own, "step-2 was trained with the tokenizer ... (rank 1)"]
    with pytest.raises(CheckpointError, match=r"\(rank 1\)"):
        mgr._check_tokenizer(Path("step-2"), {"tokenizer": identity}, initial=False)
