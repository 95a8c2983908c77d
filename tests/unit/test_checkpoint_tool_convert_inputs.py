"""tools/checkpoint.py convert on inputs a user will hand it (in-process, debugmodel, CPU): folder names
with dots, weights that are not the --flavor, and HF names that no run could load (each once accepted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from torchtitan_like.models.llama3 import LLAMA3_FLAVORS, Transformer
from torchtitan_like.models.llama3.state_dict_adapter import save_hf_safetensors, to_hf

TOOL = Path(__file__).resolve().parents[2] / "tools" / "checkpoint.py"
ARGS = LLAMA3_FLAVORS["debugmodel"].with_seq_len(64)


def _main():
    spec = importlib.util.spec_from_file_location("review_checkpoint_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def weights():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model = Transformer(ARGS)
    model.init_weights(0)
    torch.set_num_threads(n)
    return model.state_dict()


@pytest.fixture(scope="module")
def dcp_step(weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("review_convert")
    torch.save(weights, root / "model.pt")
    assert _main()(["convert", str(root / "model.pt"), str(root / "step-0")]) == 0
    return root / "step-0"


def _model_keys(dcp_folder: Path) -> set[str]:
    md = dcp.FileSystemReader(str(dcp_folder)).read_metadata().state_dict_metadata
    return {k.split(".", 1)[1] for k in md if k.startswith("model.")}


@pytest.mark.parametrize("name", ["Llama-3.2-1B-hf", "export_v1.0"])
def test_hf_export_into_a_folder_whose_name_has_a_dot(dcp_step, tmp_path, name):
    rc = _main()(["convert", str(dcp_step), str(tmp_path / name), "--hf", "--flavor", "debugmodel"])
    assert rc == 0
    assert (tmp_path / name / "model.safetensors").is_file() and (tmp_path / name / "config.json").is_file()


def test_hf_export_of_weights_that_are_not_the_flavor_is_refused(weights, tmp_path, capsys):
    shallow = {k: v for k, v in weights.items() if not k.startswith(("layers.3.", "layers.4.", "layers.5."))}
    torch.save(shallow, tmp_path / "shallow.pt")
    assert _main()(["convert", str(tmp_path / "shallow.pt"), str(tmp_path / "dcp")]) == 0
    rc = _main()(["convert", str(tmp_path / "dcp"), str(tmp_path / "hf"), "--hf", "--flavor", "debugmodel"])
    written = json.loads((tmp_path / "hf" / "config.json").read_text()) if rc == 0 else None
    assert rc == 2, f"exit 0; config.json num_hidden_layers={written['num_hidden_layers']} for 3 layers of weights"


@pytest.mark.parametrize("source", ["hf_folder_without_--hf", "pt_with_--hf"])
def test_hf_named_weights_never_land_in_a_dcp_under_hf_names(weights, tmp_path, source):
    hf = to_hf(weights, ARGS)
    if source == "hf_folder_without_--hf":
        save_hf_safetensors(hf, tmp_path / "hf", args=ARGS)  # a real HF folder, config.json and all
        argv = ["convert", str(tmp_path / "hf"), str(tmp_path / "dcp")]
    else:
        torch.save(hf, tmp_path / "hf.pt")
        argv = ["convert", str(tmp_path / "hf.pt"), str(tmp_path / "dcp"), "--hf", "--flavor", "debugmodel"]
    rc = _main()(argv)
    # Either refuse (exit 2) or convert the names; never exit 0 with a checkpoint no run can load.
    if rc == 0:
        assert _model_keys(tmp_path / "dcp") == set(weights), sorted(_model_keys(tmp_path / "dcp"))[:2]
    else:
        assert rc == 2


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_a_pt_of_hf_names_converts_with_the_hf_flag_its_error_names(weights, tmp_path, capsys):
    """Without --hf the tool says to add --hf --flavor; with them it once refused ("--hf applies to .safetensors
    files and HF folders, not .pt"), so no advice led anywhere. Now the weights come back bit for bit."""
    torch.save(to_hf(weights, ARGS), tmp_path / "hf.pt")
    assert _main()(["convert", str(tmp_path / "hf.pt"), str(tmp_path / "dcp")]) == 2
    assert "add --hf --flavor NAME" in capsys.readouterr().err
    assert _main()(["convert", str(tmp_path / "hf.pt"), str(tmp_path / "dcp"), "--hf", "--flavor", "debugmodel"]) == 0
    state = {"model": {k: torch.empty_like(v) for k, v in weights.items()}}
    dcp.load(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    assert all(torch.equal(state["model"][k], v) for k, v in weights.items())
