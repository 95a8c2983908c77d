"""A manifest.json that is valid JSON but malformed (a damaged key) is damage like any other.

README: "Loading verifies the manifest; a damaged latest checkpoint is skipped with a warning and the
previous good one is used." manifest.py: `verify` "raise[s] a CheckpointError that names the first
bad file"; tools/checkpoint.py: "Exit status: 0 ok, 2 a checkpoint problem (one line on stderr)".
read_manifest checks every file entry's "size" and "sha256" (a flipped byte in a key once made
verify_errors raise KeyError, stopping auto-resume and crashing the tool).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

# The checkpoint suite's tiny run helpers, and its autouse fixture (one thread).
from test_checkpoint import _one_thread, ckpt_dir, make_run, manager  # noqa: F401
from torchtitan_like.components.checkpoint import CheckpointError
from torchtitan_like.components.manifest import MANIFEST

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

TOOL = Path(__file__).resolve().parents[2] / "tools" / "checkpoint.py"


def _two_saves_latest_manifest_damaged(tmp_path) -> Path:
    run = make_run()
    mgr = manager(run, tmp_path)
    run.train(4, mgr)  # step-2 and step-4
    mgr.close()
    manifest = ckpt_dir(tmp_path) / "step-4" / MANIFEST
    text = manifest.read_text()
    assert '"sha256"' in text
    manifest.write_text(text.replace('"sha256"', '"sha2V6"', 1))  # one damaged byte; still valid JSON
    return ckpt_dir(tmp_path) / "step-4"


def test_auto_resume_skips_a_checkpoint_whose_manifest_entries_are_malformed(tmp_path, caplog):
    _two_saves_latest_manifest_damaged(tmp_path)
    with caplog.at_level(logging.WARNING, logger="torchtitan_like.components.checkpoint"):
        assert manager(make_run(1), tmp_path).load() == 2
    assert "skipping checkpoint step-4" in caplog.text


def test_tool_verify_reports_a_malformed_manifest_with_exit_2(tmp_path, capsys):
    step = _two_saves_latest_manifest_damaged(tmp_path)
    spec = importlib.util.spec_from_file_location("checkpoint_tool_review", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["verify", str(step)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def _tool():
    spec = importlib.util.spec_from_file_location("checkpoint_tool_review", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.parametrize("contents", [None, 3, ["model", 1]])
def test_contents_that_are_not_a_list_of_names_are_damage(tmp_path, capsys, contents):
    """inspect joined them (a TypeError traceback), and verify said ok."""
    run = make_run()
    mgr = manager(run, tmp_path)
    run.train(2, mgr)
    mgr.close()
    step = ckpt_dir(tmp_path) / "step-2"
    manifest = json.loads((step / MANIFEST).read_text())
    manifest["contents"] = contents
    (step / MANIFEST).write_text(json.dumps(manifest))
    tool = _tool()
    for command in ("inspect", "verify"):
        assert tool.main([command, str(step)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "its contents are" in err and err.count("\n") == 1


def test_a_checkpoint_copied_under_another_step_number_is_not_resumed(tmp_path, caplog, capsys):
    """Checkpoints are ranked by their folders' names: a copy of step-2 named step-9 once won auto-resume,
    which then retrained from step 2 and passed over the newer step-4, without a word."""
    run = make_run()
    mgr = manager(run, tmp_path)
    run.train(4, mgr)  # step-2 and step-4
    mgr.close()
    shutil.copytree(ckpt_dir(tmp_path) / "step-2", ckpt_dir(tmp_path) / "step-9")
    with caplog.at_level(logging.WARNING, logger="torchtitan_like.components.checkpoint"):
        assert manager(make_run(1), tmp_path).load() == 4
    assert "skipping checkpoint step-9" in caplog.text and "says step 2, but its folder is named step-9" in caplog.text
    with pytest.raises(CheckpointError, match="rename it step-2"):
        manager(make_run(2), tmp_path, load_step=9).load()
    assert _tool().main(["verify", str(ckpt_dir(tmp_path) / "step-9")]) == 2
    assert "says step 2" in capsys.readouterr().err
