"""torchtitan's checkpoint.enable_first_step_checkpoint (a full save right after the run's first step,
to check saving on new storage at once) and checkpoint.load_only (resume or load, never save), through
train.main as `python -m torchtitan_like.train` runs them in one process."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from test_signals_and_faults import argv, signal_self_at
from torchtitan_like import train
from torchtitan_like.components.manifest import complete_steps
from torchtitan_like.config.loader import load_config
from torchtitan_like.config.validate import ignored_settings
from torchtitan_like.distributed.preemption import EXIT_PREEMPTED
from torchtitan_like.errors import ConfigError

pytestmark = pytest.mark.usefixtures("restore_root_logger")  # (tests/conftest.py)

CKPT = ("--checkpoint.enable", "--checkpoint.interval", "4")


def _manifest(dump: Path, step: int) -> dict:
    return json.loads((dump / "checkpoint" / f"step-{step}" / "manifest.json").read_text())


def _steps_logged(dump: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (dump / "metrics.jsonl").read_text().splitlines()]


def test_the_first_step_of_a_run_and_of_its_resume_is_saved_in_full(tmp_path):
    first = ("--checkpoint.enable_first_step_checkpoint", "--checkpoint.keep_latest_k", "0")
    assert train.main(argv(tmp_path, *CKPT, "--training.steps", "5", *first)) == 0
    assert sorted(complete_steps(tmp_path / "checkpoint")) == [1, 4, 5]
    assert _manifest(tmp_path, 1)["model_only"] is False and "optimizer" in _manifest(tmp_path, 1)["contents"]
    # Resumed from step 4 (the final save of 5 holds only the model): its first step is 5, saved in full.
    (tmp_path / "checkpoint" / "step-5").rename(tmp_path / "step-5.final")
    assert train.main(argv(tmp_path, *CKPT, "--training.steps", "6", *first)) == 0
    assert sorted(complete_steps(tmp_path / "checkpoint")) == [1, 4, 5, 6]
    assert _manifest(tmp_path, 5)["model_only"] is False and _manifest(tmp_path, 6)["model_only"] is True
    # Without the key, no step-1.
    assert train.main(argv(tmp_path / "plain", *CKPT, "--training.steps", "5")) == 0
    assert sorted(complete_steps(tmp_path / "plain" / "checkpoint")) == [4, 5]


def test_a_preemption_at_the_first_step_does_not_save_it_twice(tmp_path, monkeypatch, capsys):
    signal_self_at(monkeypatch, 1, signal.SIGTERM)
    code = train.main(argv(tmp_path, *CKPT, "--checkpoint.enable_first_step_checkpoint"))
    assert code == EXIT_PREEMPTED
    assert sorted(complete_steps(tmp_path / "checkpoint")) == [1]
    out = capsys.readouterr().out
    assert out.count("saved checkpoint") == 1 and "checkpoint step-1 saved (full state)" in out


@pytest.mark.filterwarnings("ignore:Warning. Profiler clears events:UserWarning")
def test_load_only_resumes_never_saves_and_leaves_the_loaded_runs_files(tmp_path, monkeypatch, capsys):
    assert train.main(argv(tmp_path, *CKPT, "--training.steps", "8", "--checkpoint.keep_latest_k", "0")) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "checkpoint").iterdir()}
    assert sorted(before) == ["step-4", "step-8"]
    metrics, config = (tmp_path / "metrics.jsonl").read_text(), (tmp_path / "config.toml").read_text()
    # From step-4 (going back past step-8) to step 9, nothing saved: not at step 8 (interval), not at the end,
    # not on pre-emption; the loaded run's metrics (steps 1-8) and config stay as they were.
    job = argv(tmp_path, *CKPT, "--checkpoint.load_only", "--checkpoint.load_step", "4", "--training.steps", "9")
    assert train.main([*job, "--profiling.enable_profiling", "--profiling.profile_freq", "4"]) == 0
    assert _steps_logged(tmp_path / "load_only") == [5, 6, 7, 8, 9]  # it did resume from step 4
    assert list((tmp_path / "load_only" / "profile_traces").glob("iteration_8/rank0_trace.json"))
    assert not (tmp_path / "profile_traces").exists()
    signal_self_at(monkeypatch, 6, signal.SIGUSR1)
    assert train.main(job) == EXIT_PREEMPTED
    out = capsys.readouterr().out
    assert ("checkpoint.load_only=true, so nothing was saved; exiting with status 75 (the same command, run again, "
            "starts over from the checkpoint it loaded)") in out
    assert "checkpoint.load_step=4 with load_only: the newer checkpoints [8] stay" in out
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "checkpoint").iterdir()} == before
    assert (tmp_path / "metrics.jsonl").read_text() == metrics and (tmp_path / "config.toml").read_text() == config
    assert _steps_logged(tmp_path / "load_only") == [5, 6]  # a rerun's rows replace the last one's
    assert "load_only = true" in (tmp_path / "load_only" / "config.toml").read_text()


def test_load_only_with_nothing_to_train_validates_the_loaded_weights(tmp_path, capsys):
    """An evaluation of saved checkpoints (Megatron-LM's --skip-train): load_only with training.steps at the
    loaded step validates once and trains nothing. The reference is the val_loss the training run itself
    logged at those steps, on the same held-out batches."""
    val = ("--validation.enable", "--validation.freq", "4", "--validation.steps", "2",
           "--validation.local_batch_size", "2")
    assert train.main(argv(tmp_path, *CKPT, *val, "--training.steps", "8")) == 0
    logged = {r["step"]: r["val_loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
              if "val_loss" in r}
    assert sorted(logged) == [4, 8] and logged[4] != logged[8]
    capsys.readouterr()  # (the training run's log)
    # Step 8 (the final, model-only save), then step 4 (a full one): each evaluation keeps its row.
    for step in (8, 4):
        job = argv(tmp_path, *CKPT, *val, "--checkpoint.load_only", "--checkpoint.load_step", str(step),
                   "--training.steps", str(step))
        assert train.main(job) == 0
    rows = [json.loads(line) for line in (tmp_path / "load_only" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [8, 4] and all("loss" not in r for r in rows)
    assert [r["val_loss"] for r in rows] == [logged[8], logged[4]]
    assert sorted(complete_steps(tmp_path / "checkpoint")) == [4, 8]  # nothing saved
    out = capsys.readouterr().out
    assert "step 4 loaded and training.steps=4, so nothing to train: validating the loaded weights once" in out
    assert "step:    4  (evaluated, not trained)  val_loss:" in out and "evaluation finished" in out
    assert "training llama3" not in out and "training finished" not in out
    # Without [validation] it is the usual "nothing to train", naming what would evaluate.
    assert train.main(argv(tmp_path, *CKPT, "--checkpoint.load_only", "--training.steps", "8")) == 0
    assert "with [validation] enabled, a load_only run validates the loaded weights" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--checkpoint.load_only"], "checkpoint.load_only=true needs checkpoint.enable=true"),
    (["--checkpoint.enable_first_step_checkpoint"], "checkpoint.enable_first_step_checkpoint=true needs checkpoint.enable=true"),
    (["--checkpoint.enable", "--checkpoint.load_only", "--checkpoint.last_save_in_hf"],
     "checkpoint.load_only=true never saves, but checkpoint.last_save_in_hf=true asks for a save: set one of them to false"),
    (["--checkpoint.enable", "--checkpoint.load_only", "--checkpoint.enable_first_step_checkpoint"],
     "checkpoint.load_only=true never saves, but checkpoint.enable_first_step_checkpoint=true asks for a save"),
])
def test_settings_that_cannot_work_together_are_refused(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(argv(tmp_path, *extra))


def test_saving_settings_under_load_only_are_named_as_unused(tmp_path):
    cfg = load_config(argv(tmp_path, "--checkpoint.enable", "--checkpoint.load_only", "--checkpoint.interval", "7"))
    assert "checkpoint.interval (checkpoint.load_only=true)" in ignored_settings(cfg, pp=1)


def test_load_only_with_nothing_to_load_is_refused(tmp_path, capsys):
    # A wrong dump folder would otherwise train from scratch and throw the result away.
    assert train.main(argv(tmp_path, "--checkpoint.enable", "--checkpoint.load_only")) == 2
    err = capsys.readouterr().err
    assert "checkpoint.load_only=true, but there is nothing to load:" in err
    assert "checkpoint.initial_load_path is unset" in err
    assert not (tmp_path / "metrics.jsonl").exists()
