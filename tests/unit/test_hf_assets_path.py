"""torchtitan's model.hf_assets_path: the folder of a model's Hugging Face assets. Where model.tokenizer_path
is unset the tokenizer is read from it, and with checkpoint.initial_load_in_hf and no initial_load_path the
weights too, so a torchtitan TOML that names it needs no edit for either."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from feature_runs import argv, train
from torchtitan_like.config.loader import load_config, to_toml
from torchtitan_like.errors import DataError
from torchtitan_like.trainer import Trainer

pytestmark = pytest.mark.usefixtures("restore_root_logger")  # (train.main reconfigures logging: tests/conftest.py)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A run's final Hugging Face export (safetensors, config.json, tokenizer files), and its weights."""
    dump = tmp_path_factory.mktemp("assets") / "run"
    trainer = train(dump, "--training.steps", "3", "--checkpoint.enable", "--checkpoint.last_save_in_hf")
    weights = {k: v.detach().clone() for k, v in trainer.model_parts[0].state_dict().items()}
    return dump / "checkpoint" / "step-3" / "hf", weights


def test_the_tokenizer_and_the_weights_come_from_the_assets_folder(hf_folder, tmp_path) -> None:
    folder, weights = hf_folder
    cfg = load_config(argv(tmp_path / "new", "--model.hf_assets_path", str(folder), "--checkpoint.initial_load_in_hf"))
    assert cfg.model.tokenizer_path == cfg.checkpoint.initial_load_path == str(folder)
    # The resolved config reads back the same (config.toml of the run).
    toml = tmp_path / "resolved.toml"
    toml.write_text(to_toml(cfg))
    again = load_config(["--job.config_file", str(toml)])
    assert (again.model, again.checkpoint) == (cfg.model, cfg.checkpoint)
    trainer = Trainer(cfg)
    try:
        loaded = trainer.model_parts[0].state_dict()
        for name, want in weights.items():
            assert torch.equal(loaded[name], want), name  # the export's weights, not a fresh init
        assert trainer.dataloader is not None
    finally:
        trainer.close()


def test_keys_given_apart_win(hf_folder, tmp_path) -> None:
    folder, _ = hf_folder
    cfg = load_config(argv(tmp_path, "--model.hf_assets_path", str(folder), "--model.tokenizer_path", "tok.model",
                           "--checkpoint.initial_load_in_hf", "--checkpoint.initial_load_path", "other/"))
    assert (cfg.model.tokenizer_path, cfg.checkpoint.initial_load_path) == ("tok.model", "other/")
    # Without initial_load_in_hf the weights are not read from it (torchtitan's rule too).
    assert load_config(argv(tmp_path, "--model.hf_assets_path", str(folder))).checkpoint.initial_load_path is None


def test_a_missing_assets_folder_is_named(tmp_path) -> None:
    cfg = load_config(argv(tmp_path, "--model.hf_assets_path", str(tmp_path / "assets/hf/Llama-3.1-8B"),
                           "--training.dataset", "embedded"))
    with pytest.raises(DataError, match=r"model.hf_assets_path: tokenizer file '.*Llama-3.1-8B' not found \(download "
                                        r"the model's assets there, or set model.tokenizer_path\)"):
        Trainer(cfg)


def test_hugging_face_weights_are_evaluated_with_training_steps_0(tmp_path) -> None:
    """training.steps = 0 with load_only and [validation]: the weights of model.hf_assets_path (initial_load_in_hf)
    are validated once, nothing trained; val_loss equals what the run that made them logged at its last step."""
    import json

    from torchtitan_like import train as train_main

    val = ("--validation.enable", "--validation.freq", "3", "--validation.steps", "2", "--validation.local_batch_size", "2")
    src = tmp_path / "src"
    assert train_main.main(argv(src, "--training.steps", "3", "--checkpoint.enable", "--checkpoint.last_save_in_hf",
                                *val)) == 0
    logged = [json.loads(line) for line in (src / "metrics.jsonl").read_text().splitlines()][-1]
    job = argv(tmp_path / "eval", "--model.hf_assets_path", str(src / "checkpoint/step-3/hf"),
               "--checkpoint.initial_load_in_hf", "--checkpoint.enable", "--checkpoint.load_only",
               "--training.steps", "0", *val)
    assert train_main.main(job) == 0
    (row,) = [json.loads(line) for line in (tmp_path / "eval/load_only/metrics.jsonl").read_text().splitlines()]
    assert row["step"] == 0 and "loss" not in row
    assert row["val_loss"] == pytest.approx(logged["val_loss"], rel=1e-6)  # (the export is float32)
