"""create_seed_checkpoint writes the initialized weights exactly, whatever checkpoint.export_dtype says.

README: "`create_seed_checkpoint` writes the initialized weights as `step-0` (one process) and exits";
schema: "Only initialize the model and save it as step-0". The seed was once saved as the final
weights-only export, so export_dtype = "bfloat16" (meant for that export) rounded it, and a run
started from it was not the run it seeds.
"""

from __future__ import annotations

import pytest
import torch

from torchtitan_like.components.manifest import read_manifest
from torchtitan_like.config.loader import load_config
from torchtitan_like.models.llama3 import Transformer
from torchtitan_like.trainer import Trainer


@pytest.fixture(autouse=True)
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def _trainer(dump, *overrides: str) -> Trainer:
    return Trainer(
        load_config([
            "--job.config_file", "train_configs/debug_model.toml",
            "--job.dump_folder", str(dump),
            "--training.seq_len", "32",
            "--training.local_batch_size", "2",
            "--training.steps", "2",
            "--metrics.no_enable_tensorboard",
            "--debug.deterministic",
            "--checkpoint.enable",
            "--checkpoint.export_dtype", "bfloat16",
            *overrides,
        ])
    )


def test_seed_checkpoint_holds_the_initialized_weights_exactly(tmp_path):
    seed = _trainer(tmp_path, "--checkpoint.create_seed_checkpoint")
    initialized = {k: v.detach().clone() for k, v in seed.model_parts[0].state_dict().items()}
    seed.train()
    seed.close()
    # step-0 holds the weights only, in full precision: the manifest says so (the final export's dtype is not applied).
    manifest = read_manifest(tmp_path / "checkpoint" / "step-0")
    assert manifest["step"] == 0 and manifest["contents"] == ["model"]
    assert manifest["model_only"] is True and manifest["model_dtype"] is None

    # Load step-0 into a fresh model of the same flavor through the run's own checkpoint manager.
    run = _trainer(tmp_path)
    try:
        assert run.step == 0
        loaded = run.model_parts[0].state_dict()
        assert isinstance(run.model_parts[0], Transformer)
        for k, v in initialized.items():
            assert torch.equal(loaded[k], v), f"{k} differs from the initialized weight"
    finally:
        run.close()
