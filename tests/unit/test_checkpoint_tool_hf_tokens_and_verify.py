"""tools/checkpoint.py along the README's journeys: convert --hf writes the same bos/eos ids as the
trainer's own Hugging Face export, and verify of the checkpoint folder itself (not a step folder) says
so instead of calling a save unfinished."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from torchtitan_like.components.checkpoint import CheckpointManager, TrainState
from torchtitan_like.components.tokenizer import build_tokenizer
from torchtitan_like.config.schema import Checkpoint
from torchtitan_like.models.llama3 import LLAMA3_FLAVORS, Transformer

from test_config_and_convert_edges import _tool_main  # loads tools/checkpoint.py

ARGS = LLAMA3_FLAVORS["debugmodel"].with_seq_len(64)



def _save_debugmodel_step(dump: Path) -> Path:
    """A model-only DCP step folder of the debugmodel, as the trainer's final save writes it."""
    model = Transformer(ARGS)
    model.init_weights(0)
    mgr = CheckpointManager(
        Checkpoint(enable=True, interval=1),
        dump_folder=str(dump),
        model_parts=[model],
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        lr_scheduler=None,
        dataloader=None,
        train_state=TrainState(step=1),
        fingerprint={},
    )
    mgr.maybe_save(1)
    mgr.close()
    return dump / "checkpoint" / "step-1"


def test_offline_hf_convert_of_the_debug_model_names_the_same_special_tokens_as_the_trainers_export(tmp_path):
    # README: with pipeline parallel the HF keys are refused, "convert offline with tools/checkpoint.py convert";
    # README's own example: `convert .../step-100 hf_out/ --hf --flavor debugmodel`. The trainer's export of a
    # debugmodel run (embedded tokenizer) records the tokenizer's <|begin_of_text|> / <|end_of_text|> ids
    # (hf_config's docstring: without them transformers falls back to Llama 2's 1 / 2 and generation never stops).
    step = _save_debugmodel_step(tmp_path / "run")
    assert _tool_main()(["convert", str(step), str(tmp_path / "hf_out"), "--hf", "--flavor", "debugmodel"]) == 0
    config = json.loads((tmp_path / "hf_out" / "config.json").read_text())
    tok = build_tokenizer("")  # debug_model.toml's tokenizer_path = "": the embedded tokenizer
    assert (config.get("bos_token_id"), config.get("eos_token_id")) == (tok.bos_id, tok.eos_id)


def test_verify_of_the_checkpoint_folder_itself_does_not_claim_an_unfinished_save(tmp_path, capsys):
    # A user who types `verify outputs/debug_model/checkpoint` (README: `verify .../checkpoint/step-100`) gets told
    # a save never finished, though every step-N inside is complete: the error must point at the step folders.
    step = _save_debugmodel_step(tmp_path / "run")
    parent = step.parent
    assert _tool_main()(["verify", str(step)]) == 0
    capsys.readouterr()
    assert _tool_main()(["verify", str(parent)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "never finished" not in err and "incomplete" not in err, err
    assert "step-1" in err, err  # names the step folder(s) to verify instead
