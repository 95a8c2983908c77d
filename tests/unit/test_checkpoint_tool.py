"""tools/checkpoint.py, run the way users run it: a subprocess with this interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from torchtitan_like.components.checkpoint import CheckpointManager, TrainState
from torchtitan_like.components.lr_scheduler import build_lr_scheduler
from torchtitan_like.components.manifest import verify
from torchtitan_like.config.schema import Checkpoint, LRScheduler
from torchtitan_like.models.llama3 import LLAMA3_FLAVORS, Transformer

TOOL = Path(__file__).resolve().parents[2] / "tools" / "checkpoint.py"
ARGS = LLAMA3_FLAVORS["debugmodel"].with_seq_len(64)
FINGERPRINT = {"config_hash": "cafe", "layout": {"dp_shard": 2, "tp": 1}, "world_size": 2}


def tool(*argv: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, argv)], capture_output=True, text=True, timeout=300, env=env
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A debugmodel after one AdamW step, saved at step 1 with everything; (model, step folder)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    dump = tmp_path_factory.mktemp("run")
    model = Transformer(ARGS)
    model.init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = build_lr_scheduler(opt, LRScheduler(warmup_steps=2), steps=10)
    tokens = torch.randint(0, ARGS.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    model(tokens).float().logsumexp(-1).mean().backward()
    opt.step()
    sched.step()
    mgr = CheckpointManager(
        Checkpoint(enable=True, interval=1),
        dump_folder=str(dump),
        model_parts=[model],
        optimizer=opt,
        lr_scheduler=sched,
        dataloader=None,
        train_state=TrainState(step=1),
        fingerprint=FINGERPRINT,
    )
    mgr.maybe_save(1)
    mgr.close()
    torch.set_num_threads(n)
    return model, dump / "checkpoint" / "step-1"


def test_verify_says_ok_then_names_the_damaged_file(trained, tmp_path):
    _, step = trained
    ok = tool("verify", step)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok")

    import shutil

    bad = tmp_path / "step-1"
    shutil.copytree(step, bad)
    data = bytearray((bad / "__0_0.distcp").read_bytes())
    data[1000] ^= 0x40
    (bad / "__0_0.distcp").write_bytes(bytes(data))
    res = tool("verify", bad)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0
    assert f"{bad}/__0_0.distcp is corrupted" in res.stderr


def test_inspect_lists_the_manifest_and_every_entry_without_loading(trained):
    _, step = trained
    res = tool("inspect", step)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "step: 1" in out
    assert "layout: {'dp_shard': 2, 'tp': 1}  world_size: 2" in out
    assert f"versions: torch {torch.__version__}, torchtitan_like 0.1.0" in out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  ")}
    assert lines["model.layers.0.attention.wk.weight"] == ["(128,", "256)", "float32"]
    assert lines["optimizer.state.layers.5.feed_forward.w2.weight.exp_avg"] == ["(256,", "768)", "float32"]
    assert lines["lr_scheduler"] == ["(bytes)"]


def test_convert_to_pt_model_only_or_everything(trained, tmp_path):
    model, step = trained
    res = tool("convert", step, tmp_path / "model.pt", "--model-only")
    assert res.returncode == 0, res.stderr
    weights = torch.load(tmp_path / "model.pt", weights_only=True)
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())

    # (in-process: the same script, without another interpreter start-up)
    assert _tool_main()(["convert", str(step), str(tmp_path / "full.pt")]) == 0
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    assert sorted(full) == ["lr_scheduler", "model", "optimizer", "train_state"]
    assert full["train_state"]["step"] == 1

    # ... and back into a DCP folder that a run can start from, with a manifest.
    res = tool("convert", tmp_path / "model.pt", tmp_path / "dcp_from_pt")
    assert res.returncode == 0, res.stderr
    assert verify(tmp_path / "dcp_from_pt")["contents"] == ["model"]
    fresh = Transformer(ARGS)
    fresh.init_weights(1)
    mgr = CheckpointManager(
        Checkpoint(enable=True, initial_load_path=str(tmp_path / "dcp_from_pt")),
        dump_folder=str(tmp_path / "run"),
        model_parts=[fresh],
        optimizer=torch.optim.AdamW(fresh.parameters()),
        lr_scheduler=None,
        dataloader=None,
        train_state=TrainState(),
        fingerprint={},
    )
    assert mgr.load() is None
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_convert_to_safetensors_our_names_and_hf_names_and_back(trained, tmp_path):
    model, step = trained
    assert _tool_main()(["convert", str(step), str(tmp_path / "model.safetensors"), "--dtype", "bfloat16"]) == 0
    st = load_file(str(tmp_path / "model.safetensors"))
    assert st.keys() == model.state_dict().keys() and st["norm.weight"].dtype == torch.bfloat16

    res = tool("convert", step, tmp_path / "hf", "--hf", "--flavor", "debugmodel")
    assert res.returncode == 0, res.stderr
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    tokens = torch.randint(0, ARGS.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-5, rtol=0)

    res = tool("convert", tmp_path / "hf", tmp_path / "dcp_from_hf", "--hf", "--flavor", "debugmodel")
    assert res.returncode == 0, res.stderr
    back = verify(tmp_path / "dcp_from_hf")
    assert back["contents"] == ["model"] and back["step"] == 0


def _tool_main():
    """The tool's main(), imported from its file, for error cases that need no fresh interpreter."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("checkpoint_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["convert", "{step}", "{tmp}/hf", "--hf"], "--hf needs --flavor"),
        (["convert", "{step}", "{tmp}/hf", "--hf", "--flavor", "9B"], "--flavor '9B' is not a llama3 flavor"),
        (["convert", "{tmp}/nothing.pt", "{tmp}/out"], "nothing.pt does not exist"),
        (["convert", "{step}", "{tmp}/taken"], "taken already exists: pick a new destination"),
        (["convert", "{step}", "{tmp}/w.safetensors", "--no-model-only"], "safetensors hold model weights only"),
        (["inspect", "{tmp}"], ".metadata is missing or unreadable"),
        (["verify", "{tmp}/nowhere"], "nowhere does not exist"),
        # (These three said "manifest.json is missing: ... incomplete (its save never finished)", or "does not
        # exist or is not a folder" for a file.)
        (["verify", "{step}/../.."], "holds step folders (step-1), not a checkpoint: verify one of them, e.g. "),
        (["verify", "{tmp}/taken"], "taken is not a checkpoint: it has no manifest.json, no .metadata and no step"),
        (["verify", "{step}/manifest.json"], "manifest.json is a file: verify checks a step folder"),
    ],
)
def test_errors_are_one_line_with_exit_2(trained, tmp_path, capsys, argv, message):
    _, step = trained
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("precious")
    rc = _tool_main()([a.format(step=step, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message in err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "precious"
