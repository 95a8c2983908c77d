"""initial_load_in_hf refuses tensors of the HF checkpoint that the model does not have.

CheckpointManager._load_hf checks that the file has every tensor the model needs ("lacks ...
(model.flavor mismatch?)") and loads with strict=True, but first filters the HF tensors down to the
model's keys, so a checkpoint of a *bigger* model was once accepted and truncated without a word when
no config.json was there to compare (check_initial_load: "config.json, if any"), and an untied
lm_head loaded into a tied flavor was dropped.
"""

from __future__ import annotations

import pytest
import torch
from test_checkpoint import _one_thread  # noqa: F401 (autouse fixture: one thread, as the checkpoint tests run)

from torchtitan_like.components.checkpoint import CheckpointError, CheckpointManager, TrainState
from torchtitan_like.config.schema import Checkpoint
from torchtitan_like.models.llama3 import Transformer, TransformerArgs
from torchtitan_like.models.llama3.state_dict_adapter import HF_CONFIG, save_hf_safetensors, to_hf

ARGS = TransformerArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16)


def _hf_folder_without_config(tmp_path, args: TransformerArgs):
    model = Transformer(args)
    model.init_weights(0)
    folder = tmp_path / "hf"
    save_hf_safetensors(to_hf(model.state_dict(), args), folder, args=None)  # safetensors only
    assert not (folder / HF_CONFIG).exists()
    return folder


def _load_into(model: Transformer, path, tmp_path):
    mgr = CheckpointManager(
        Checkpoint(enable=True, initial_load_path=str(path), initial_load_in_hf=True),
        dump_folder=str(tmp_path / "run"),
        model_parts=[model],
        optimizer=torch.optim.AdamW(model.parameters()),
        lr_scheduler=None,
        dataloader=None,
        train_state=TrainState(),
        fingerprint={},
    )
    try:
        return mgr.load()
    finally:
        mgr.close()


def test_hf_weights_with_more_layers_than_the_flavor_are_refused(tmp_path):
    deeper = TransformerArgs(**{**ARGS.__dict__, "n_layers": 3})
    folder = _hf_folder_without_config(tmp_path, deeper)
    model = Transformer(ARGS)  # 2 layers
    model.init_weights(1)
    with pytest.raises(CheckpointError, match="layers.2"):
        _load_into(model, folder, tmp_path)


def test_untied_hf_weights_into_a_tied_flavor_are_refused(tmp_path):
    folder = _hf_folder_without_config(tmp_path, ARGS)  # untied: holds its own lm_head.weight
    tied = Transformer(TransformerArgs(**{**ARGS.__dict__, "tie_word_embeddings": True}))
    tied.init_weights(1)
    with pytest.raises(CheckpointError, match="'lm_head.weight' differs from 'model.embed_tokens.weight'"):
        _load_into(tied, folder, tmp_path)


def test_a_tied_hf_checkpoint_that_stores_a_copy_of_the_embedding_loads(tmp_path):
    tied_args = TransformerArgs(**{**ARGS.__dict__, "tie_word_embeddings": True})
    source = Transformer(tied_args)
    source.init_weights(0)
    hf = to_hf(source.state_dict(), tied_args)
    hf["lm_head.weight"] = hf["model.embed_tokens.weight"].clone()  # some tied checkpoints store it anyway
    folder = tmp_path / "hf"
    save_hf_safetensors(hf, folder, args=None)
    tied = Transformer(tied_args)
    tied.init_weights(1)
    _load_into(tied, folder, tmp_path)
    assert torch.equal(tied.tok_embeddings.weight, source.tok_embeddings.weight)


def test_tied_hf_weights_without_a_config_into_an_untied_flavor_name_the_tying(tmp_path):
    folder = _hf_folder_without_config(tmp_path, TransformerArgs(**{**ARGS.__dict__, "tie_word_embeddings": True}))
    untied = Transformer(ARGS)
    untied.init_weights(1)
    with pytest.raises(CheckpointError, match=r"has no lm_head\.weight \(tied embeddings\), but this model\.flavor "
                       r"has an output head of its own"):
        _load_into(untied, folder, tmp_path)


def test_hf_weights_of_another_shape_without_a_config_are_refused_naming_the_tensor(tmp_path):
    # Same names, other shapes (a vocabulary of 80, not 64): only the shapes tell, and they were found by
    # set_model_state_dict's multi-line RuntimeError (a traceback, exit 1, from the trainer and generate.py).
    folder = _hf_folder_without_config(tmp_path, TransformerArgs(**{**ARGS.__dict__, "vocab_size": 80}))
    model = Transformer(ARGS)
    model.init_weights(1)
    with pytest.raises(CheckpointError, match=r"output\.weight has shape \(80, 32\), this model\.flavor has \(64, 32\) "
                       r"\(1 more differ\): choose the model\.flavor"):
        _load_into(model, folder, tmp_path)
