"""checkpoint.load_step combined with keep_latest_k and with restarts of the same command.

README (Pre-emption, restarts): a pre-empted job "Running the same command again resumes from that
checkpoint"; with MAX_RESTARTS "they resume from the latest complete checkpoint". A run that went
back with load_step=K records K in its manifests ("branch"): the same command, restarted, resumes
from that run's newest checkpoint instead of going back to K again, and keep_latest_k never purges
step K, which the command names. (Both once failed: the restart repeated every step after K, and
once K was purged the command could not start at all.)
"""

from __future__ import annotations

import pytest
import torch

# The checkpoint suite's tiny run helpers, and its autouse fixture (one thread).
from test_checkpoint import _one_thread, ckpt_dir, make_run, manager  # noqa: F401
from torchtitan_like.components.checkpoint import CheckpointError
from torchtitan_like.components.manifest import read_manifest

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _rewound_run_that_goes_on(tmp_path, keep_latest_k: int):
    """A run saved steps 1..4; the user rewinds with load_step=3 and trains on to step 6."""
    first = make_run(0)
    mgr = manager(first, tmp_path, interval=1, keep_latest_k=keep_latest_k)
    first.train(4, mgr)
    mgr.close()

    rewound = make_run(1)
    mgr = manager(rewound, tmp_path, interval=1, keep_latest_k=keep_latest_k, load_step=3)
    assert mgr.load() == 3
    rewound.train(3, mgr)  # saves 4 (replacing the old one), 5, 6
    mgr.close()


def test_keep_latest_k_does_not_purge_the_load_step_that_the_same_command_needs(tmp_path):
    _rewound_run_that_goes_on(tmp_path, keep_latest_k=2)
    # The job is pre-empted / restarted by torchrun with the same config (load_step=3 still set).
    again = make_run(2)
    try:
        step = manager(again, tmp_path, interval=1, keep_latest_k=2, load_step=3).load()
    except CheckpointError as e:
        pytest.fail(f"the same command can no longer start: {e}")
    assert step == 6  # the rewound run's newest checkpoint
    assert (ckpt_dir(tmp_path) / "step-3").is_dir()


def test_restart_of_the_same_command_with_load_step_resumes_from_the_latest(tmp_path):
    _rewound_run_that_goes_on(tmp_path, keep_latest_k=0)
    assert sorted(p.name for p in ckpt_dir(tmp_path).iterdir()) == [f"step-{i}" for i in range(1, 7)]
    again = make_run(2)
    # README: a restarted / requeued job "resume[s] from the latest complete checkpoint" (step 6).
    mgr = manager(again, tmp_path, interval=1, keep_latest_k=0, load_step=3)
    assert mgr.load() == 6
    # It is still that run: its next checkpoints record the branch too, so a second restart finds them.
    again.train(1, mgr)
    mgr.close()
    assert read_manifest(ckpt_dir(tmp_path) / "step-7")["branch"] == 3
    assert manager(make_run(3), tmp_path, interval=1, load_step=3).load() == 7
    # Without load_step (auto-resume) the same run is found as well, and it keeps its branch.
    mgr = manager(make_run(4), tmp_path, interval=1)
    assert mgr.load() == 7 and mgr._branch == 3
    mgr.close()


def test_going_back_ignores_the_newer_checkpoints_of_the_trajectory_left_behind(tmp_path):
    """A first run saved 1..8; going back to 3 must load 3, not the old run's 4..8, and a restart must
    resume the new run's checkpoints. keep_latest_k 2 keeps the new run's two newest (its fallbacks), and
    purges the old run's 6..8 first: they once pushed the new run's own checkpoints out."""
    first = make_run(0)
    mgr = manager(first, tmp_path, interval=1)
    first.train(8, mgr)
    mgr.close()
    assert all(read_manifest(ckpt_dir(tmp_path) / f"step-{i}")["branch"] is None for i in range(1, 9))

    rewound = make_run(1)
    mgr = manager(rewound, tmp_path, interval=1, keep_latest_k=2, load_step=3)
    assert mgr.load() == 3  # the old steps 4..8 were not saved from step 3: they are not continued
    rewound.train(2, mgr)  # saves 4 and 5 over the old ones
    mgr.close()
    steps = sorted(int(p.name.split("-")[1]) for p in ckpt_dir(tmp_path).iterdir())
    assert steps == [3, 4, 5]  # the new run's newest 2 and load_step
    assert [read_manifest(ckpt_dir(tmp_path) / f"step-{i}")["branch"] for i in (4, 5)] == [3, 3]
    again = make_run(2)
    mgr = manager(again, tmp_path, interval=1, keep_latest_k=2, load_step=3)
    assert mgr.load() == 5
    mgr.close()


def test_reading_a_load_step_takes_that_step_not_the_run_that_went_on_from_it(tmp_path):
    """load_only (an evaluation, tools/generate.py) with load_step=K reads step K, even where a run went
    back to K and saved more: continuing that run is what a restart of the training command does."""
    _rewound_run_that_goes_on(tmp_path, keep_latest_k=0)
    reader = make_run(2)
    mgr = manager(reader, tmp_path, load_only=True, load_step=3)
    assert mgr.load() == 3 and mgr.loaded_from == ckpt_dir(tmp_path) / "step-3"
    mgr.close()
    assert manager(make_run(3), tmp_path, load_step=3).load() == 6  # (training: the run that went on)


def test_load_step_without_checkpointing_is_refused_not_ignored():
    from torchtitan_like.components.checkpoint import check_checkpoint_config
    from torchtitan_like.config.schema import Checkpoint
    from torchtitan_like.errors import ConfigError

    with pytest.raises(ConfigError, match=r"checkpoint.load_step=3 needs checkpoint.enable=true .*initial_load_path"):
        check_checkpoint_config(Checkpoint(enable=False, load_step=3))
    check_checkpoint_config(Checkpoint(enable=True, load_step=3))
    check_checkpoint_config(Checkpoint(enable=False))  # load_step -1: nothing asked


def test_resuming_a_model_only_export_names_the_full_checkpoint_before_it(tmp_path, caplog):
    import logging

    run = make_run()
    mgr = manager(run, tmp_path, interval=2)
    run.train(3, mgr)  # step-2: the full state
    mgr.maybe_save(3, last=True)  # step-3: the final weights-only export (last_save_model_only)
    mgr.close()
    with caplog.at_level(logging.WARNING, logger="torchtitan_like.components.checkpoint"):
        assert manager(make_run(1), tmp_path).load() == 3
    assert "step-2 holds the full state: set checkpoint.load_step=2 to continue from it exactly" in caplog.text
