"""train.main(argv): `--help` prints the reference; a user-facing error is one `error:` line and exit 2.

The error cases fail inside load_config, before the Trainer is imported.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from torchtitan_like import train
from torchtitan_like.config import loader
from torchtitan_like.config.fields import keys
from torchtitan_like.errors import ConfigError, DataError, TrainingError


pytestmark = pytest.mark.usefixtures("restore_root_logger")  # (tests/conftest.py)


def expected_default(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_key_with_its_default_and_doc(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert train.main([flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:")
    lines = out.splitlines()
    for k in keys().values():
        line = next((i for i, text in enumerate(lines) if text.strip().startswith(f"--{k.dotted} ")), None)
        assert line is not None, f"--help does not list --{k.dotted}"
        assert f"default {expected_default(k.default)})" in lines[line], lines[line]
        assert lines[line + 1].strip() == k.doc


def test_help_wins_over_a_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert train.main(["--job.config_file", "/nonexistent.toml", "--help"]) == 0
    assert capsys.readouterr().err == ""


def one_error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_unknown_cli_key(capsys: pytest.CaptureFixture[str]) -> None:
    line = one_error_line(["--training.stpes", "5"], capsys)
    assert "unknown key 'training.stpes'" in line and "did you mean 'training.steps'" in line


def test_unknown_toml_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "job.toml"
    path.write_text("[training]\nstpes = 5\n")
    line = one_error_line(["--job.config_file", str(path)], capsys)
    assert str(path.resolve()) in line and "did you mean 'training.steps'" in line


def test_malformed_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[training]\nsteps = [1,\n")
    line = one_error_line(["--job.config_file", str(path)], capsys)
    assert "malformed TOML" in line and str(path.resolve()) in line and "line 2" in line


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.toml"
    line = one_error_line(["--job.config_file", str(path)], capsys)
    assert f"config file not found: {path}" in line


@pytest.mark.parametrize(
    "error, code", [(ConfigError("bad key"), 2), (DataError("bad file"), 2), (TrainingError("loss is NaN at step 3"), 3)]
)
def test_exit_code_by_error_kind(error: Exception, code: int, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    def fail(argv: list[str]) -> None:
        raise error

    monkeypatch.setattr(loader, "load_config", fail)
    assert train.main([]) == code
    assert capsys.readouterr().err == f"error: {error}\n"


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(argv: list[str]) -> None:
        raise RuntimeError("internal")

    monkeypatch.setattr(loader, "load_config", fail)
    with pytest.raises(RuntimeError, match="internal"):
        train.main([])


def test_an_error_of_the_final_save_is_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # Trainer.close() waits for the last (async) save and raises if it failed: that error takes the same
    # path as any other (one line, exit 2), not a traceback out of main's `finally`.
    from torchtitan_like.components.manifest import CheckpointError
    from torchtitan_like.trainer import Trainer

    real_close = Trainer.close
    closed: list[bool] = []

    def close(self: Trainer, **kwargs) -> None:
        real_close(self, **kwargs)
        closed.append(True)
        raise CheckpointError("async save of step 1 into .../step-1.tmp failed: disk full")

    monkeypatch.setattr(Trainer, "close", close)
    argv = ["--job.config_file", "train_configs/debug_model.toml", "--job.dump_folder", str(tmp_path),
            "--training.steps", "1", "--training.seq_len", "32", "--metrics.no_enable_tensorboard"]
    assert train.main(argv) == 2
    assert capsys.readouterr().err == "error: async save of step 1 into .../step-1.tmp failed: disk full\n"
    assert closed == [True]  # closed once, not again after the error
