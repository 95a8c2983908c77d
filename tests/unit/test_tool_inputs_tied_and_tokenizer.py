"""tools/checkpoint.py and tools/train_tokenizer.py on inputs that once passed silently or with a traceback
(in-process main(argv), debugmodel weights, CPU): a tied flavor dropping a trained output head (and the
mirror case), a file of random bytes named .pt, a negative --step, config.json values of the wrong JSON
type, tokenizer arguments out of range and outputs that cannot be written. Each an exit-2 error line."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from torchtitan_like.components.manifest import CheckpointError
from torchtitan_like.models.llama3 import LLAMA3_FLAVORS, Transformer
from torchtitan_like.models.llama3.state_dict_adapter import read_hf_config, save_hf_safetensors, to_hf

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"inputs_tied_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _weights(flavor: str) -> dict[str, torch.Tensor]:
    """Random weights of the flavor's names and shapes (no init: only names, shapes and tying matter)."""
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(LLAMA3_FLAVORS[flavor]).state_dict().items()}
    sd = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    if LLAMA3_FLAVORS[flavor].tie_word_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]  # as a tied model's state dict lists it
    return sd


@pytest.fixture(scope="module")
def ckpt():
    return _load("checkpoint").main


@pytest.fixture(scope="module")
def steps(ckpt, tmp_path_factory) -> dict[str, Path]:
    """A DCP step folder per flavor, written by the tool from a .pt."""
    root = tmp_path_factory.mktemp("tied_inputs")
    out = {}
    for flavor in ("debugmodel", "debugmodel_tied"):
        torch.save(_weights(flavor), root / f"{flavor}.pt")
        assert ckpt(["convert", str(root / f"{flavor}.pt"), str(root / flavor)]) == 0
        out[flavor] = root / flavor
    return out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0] and "file an issue" not in err[0], err
    return err[0]


# --- tied embeddings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trained", "flavor", "names", "fix"),
    [
        ("debugmodel", "debugmodel_tied", ["output.weight", "tok_embeddings.weight"], "--flavor debugmodel"),
        ("debugmodel_tied", "debugmodel", ["output.weight equal to tok_embeddings.weight"], "--flavor debugmodel_tied"),
    ],
)
def test_hf_export_refuses_a_flavor_that_ties_otherwise(ckpt, steps, tmp_path, capsys, trained, flavor, names, fix):
    dst = tmp_path / "hf"
    assert ckpt(["convert", str(steps[trained]), str(dst), "--hf", "--flavor", flavor]) == 2
    line = _one_error_line(capsys)
    assert all(n in line for n in names) and f"--flavor {flavor}" in line and line.endswith(fix), line
    assert not dst.exists() and not list(tmp_path.iterdir())  # no HF folder without the trained head


@pytest.mark.parametrize("flavor", ["debugmodel", "debugmodel_tied"])
def test_hf_export_and_import_with_the_matching_flavor(ckpt, steps, tmp_path, flavor):
    assert ckpt(["convert", str(steps[flavor]), str(tmp_path / "hf"), "--hf", "--flavor", flavor]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is LLAMA3_FLAVORS[flavor].tie_word_embeddings
    assert ckpt(["convert", str(tmp_path / "hf"), str(tmp_path / "dcp"), "--hf", "--flavor", flavor]) == 0


def test_tied_hf_folder_without_config_into_an_untied_flavor_is_refused(tmp_path, ckpt, capsys):
    args = LLAMA3_FLAVORS["debugmodel_tied"]
    save_hf_safetensors(to_hf(_weights("debugmodel_tied"), args), tmp_path / "hf", args=None)  # no config.json
    assert ckpt(["convert", str(tmp_path / "hf"), str(tmp_path / "dcp"), "--hf", "--flavor", "debugmodel"]) == 2
    line = _one_error_line(capsys)
    assert "has no lm_head.weight" in line and line.endswith("--flavor debugmodel_tied"), line
    assert not (tmp_path / "dcp").exists()


def test_a_missing_tokenizer_names_the_tokenizer_option_and_its_fix(tmp_path, ckpt, steps, capsys):
    # (It named model.tokenizer_path, a key this tool has not, and said to leave that empty.)
    missing = tmp_path / "nope" / "tokenizer.model"
    argv = ["convert", str(steps["debugmodel"]), str(tmp_path / "hf"), "--hf", "--flavor", "debugmodel"]
    assert ckpt([*argv, "--tokenizer", str(missing)]) == 2
    assert _one_error_line(capsys) == (
        f"error: --tokenizer: tokenizer file {str(missing)!r} not found (leave --tokenizer out for the embedded "
        "tokenizer)"
    )
    assert ckpt([*argv, "--tokenizer", str(tmp_path)]) == 2
    assert _one_error_line(capsys).startswith(f"error: --tokenizer={str(tmp_path)!r} is a folder with no tokenizer.model")
    assert not (tmp_path / "hf").exists()


# --- .pt sources and --step ----------------------------------------------------------------------------


def test_pt_files_torch_cannot_read_are_one_line(tmp_path, ckpt, capsys):
    (tmp_path / "garbage.pt").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    assert ckpt(["convert", str(tmp_path / "garbage.pt"), str(tmp_path / "out")]) == 2
    assert _one_error_line(capsys) == (
        f"error: not a torch checkpoint: {tmp_path / 'garbage.pt'} (not a zip archive written by torch.save): "
        "pass a .pt state dict saved with torch.save"
    )
    torch.save({"w": torch.ones(2)}, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert ckpt(["convert", str(tmp_path / "cut.pt"), str(tmp_path / "out")]) == 2
    assert "damaged or truncated torch checkpoint" in _one_error_line(capsys)
    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=1e-3)}, tmp_path / "objects.pt")
    assert ckpt(["convert", str(tmp_path / "objects.pt"), str(tmp_path / "out")]) == 2
    assert "holds a pickled argparse.Namespace" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_negative_step_and_step_for_a_dcp_source_are_refused(tmp_path, ckpt, steps, capsys):
    torch.save({"w": torch.ones(2)}, tmp_path / "w.pt")
    assert ckpt(["convert", str(tmp_path / "w.pt"), str(tmp_path / "dcp"), "--step", "-3"]) == 2
    assert "--step -3 is negative" in _one_error_line(capsys)
    assert not (tmp_path / "dcp").exists()
    assert ckpt(["convert", str(steps["debugmodel"]), str(tmp_path / "w2.pt"), "--step", "3"]) == 2
    assert "--step applies to a DCP destination" in _one_error_line(capsys)


# --- config.json types ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [
        ("hidden_size", "256", '"hidden_size" is "256" (a string), expected an integer'),
        ("num_hidden_layers", True, '"num_hidden_layers" is true (a boolean), expected an integer'),
        ("tie_word_embeddings", "false", '"tie_word_embeddings" is "false" (a string), expected true or false'),
        ("rope_theta", "5e5", '"rope_theta" is "5e5" (a string), expected a number'),
    ],
)
def test_config_json_values_of_the_wrong_type_name_file_and_key(tmp_path, key, value, said):
    config = {"hidden_size": 256, "num_hidden_layers": 6, key: value}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        read_hf_config(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'config.json'}: {said}"), info.value


def test_config_json_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[256]")
    with pytest.raises(CheckpointError, match="holds an array, not a JSON object"):
        read_hf_config(tmp_path)


def test_hf_import_with_a_string_dimension_names_config_json(tmp_path, ckpt, capsys):
    args = LLAMA3_FLAVORS["debugmodel"]
    save_hf_safetensors(to_hf(_weights("debugmodel"), args), tmp_path / "hf", args=args)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "hidden_size": "256"}))
    assert ckpt(["convert", str(tmp_path / "hf"), str(tmp_path / "dcp"), "--hf", "--flavor", "debugmodel"]) == 2
    line = _one_error_line(capsys)
    assert "config.json" in line and '"hidden_size" is "256" (a string), expected an integer' in line, line


# --- tools/train_tokenizer.py --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return _load("train_tokenizer")


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--base-tokens", "10"], "--base-tokens 10 is below 256"),
        (["--base-tokens", "-5"], "--base-tokens -5 is below 256"),
        (["--max-mb", "-1"], "--max-mb -1.0 must be a positive number"),
        (["--max-mb", "nan"], "--max-mb nan must be a positive number"),
        (["--output", "{file}/tokenizer.model"], "is a file, not a folder"),
        (["--output", "{dir}"], "is a folder: name the file to write"),
        (["--max-mb", "0.005", "--base-tokens", "100000"], "corpus too small"),
    ],
)
def test_train_tokenizer_bad_arguments_exit_2(tok, tmp_path, capsys, argv, said):
    (tmp_path / "file").write_text("x")
    argv = [a.format(file=tmp_path / "file", dir=tmp_path) for a in argv]
    if "--output" not in argv:
        argv += ["--output", str(tmp_path / "out" / "tokenizer.model")]
    with pytest.raises(SystemExit) as info:
        tok.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tools/train_tokenizer.py: error: ") and said in err[-1], err
    assert not (tmp_path / "out").exists()


def test_train_tokenizer_writes_whole_files_only(tok, tmp_path, capsys, monkeypatch):
    out = tmp_path / "tokenizer.model"
    assert tok.main(["--max-mb", "0.005", "--base-tokens", "300", "--output", str(out)]) == 0
    good = out.read_bytes()
    assert len(good.splitlines()) == 300
    calls = {"n": 0}
    real = tok.base64.b64encode

    def disk_full_after_ten(data):
        calls["n"] += 1
        if calls["n"] > 10:
            raise OSError(28, "No space left on device")
        return real(data)

    monkeypatch.setattr(tok.base64, "b64encode", disk_full_after_ten)
    assert tok.main(["--max-mb", "0.005", "--base-tokens", "300", "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"error: cannot write --output {out}: No space left on device"
    assert out.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["tokenizer.model"]
