"""The checkpoint manager: publishing over an existing step keeps the old one when it fails, a late
background purge never deletes a newer save of the run, the checkpoint process group keeps the start-up
timeout, and [checkpoint] settings that would be silently ignored are refused."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from test_checkpoint import _one_thread  # noqa: F401 (its module-wide one-thread fixture)
from tests.distributed.harness import run_on_ranks
from tests.distributed.trainer_runs import trainer_argv
from torchtitan_like.components import checkpoint as ckpt_mod
from torchtitan_like.components.checkpoint import CheckpointError, CheckpointManager, TrainState
from torchtitan_like.components.manifest import complete_steps, verify
from torchtitan_like.config.schema import Checkpoint
from torchtitan_like.errors import ConfigError
from torchtitan_like.models.llama3 import Transformer, TransformerArgs

ARGS = TransformerArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16)

# Saves without a process group: DCP says it assumes a single process.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


class _Model:
    """A tiny model + AdamW + train state, stepped on random tokens."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        random.seed(seed)
        self.model = Transformer(ARGS)
        self.model.init_weights(seed)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.state = TrainState()

    def step(self) -> None:
        tokens = torch.randint(0, ARGS.vocab_size, (2, 9))
        logits = self.model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1

    def manager(self, dump: Path, **cfg: Any) -> CheckpointManager:
        cfg.setdefault("interval", 1000)
        return CheckpointManager(
            Checkpoint(enable=True, **cfg),
            dump_folder=str(dump),
            model_parts=[self.model],
            optimizer=self.optimizer,
            lr_scheduler=None,
            dataloader=None,
            train_state=self.state,
            fingerprint={"config_hash": "h", "layout": {}, "world_size": 1},
        )

    def save_at(self, mgr: CheckpointManager, step: int) -> None:
        """One training step, then a (full-state) save labelled `step`."""
        self.step()
        self.state.step = step
        mgr.maybe_save(step, force=True)


def _folder(dump: Path) -> Path:
    return dump / "checkpoint"


# --- publishing over an existing step ---------------------------------------------------------------


def test_a_failed_publish_over_an_existing_step_keeps_the_old_one(tmp_path, monkeypatch):
    """Saving a step that already exists (going back with load_step, the documented flow) replaces it.
    When the rename of the new folder into place fails (EBUSY/EACCES on a network file system), the old
    complete step-N, already moved to `step-N.old-*`, goes back: it was once queued for deletion, leaving
    no step-N, and a restart found no checkpoint and started again from step 0 without a word. (A kill
    between the two renames is the next test's.)"""
    run = _Model()
    mgr = run.manager(tmp_path)
    run.save_at(mgr, 2)
    mgr.wait()
    old_weights = {k: v.clone() for k, v in run.model.state_dict().items()}

    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in Path(src).name and Path(dst).name == "step-2":
            raise OSError(16, "Device or resource busy")
        return real_rename(src, dst)

    run.step()  # different weights, saved again as step 2
    monkeypatch.setattr(ckpt_mod.os, "rename", rename)
    with pytest.raises(CheckpointError, match="Device or resource busy"):
        mgr.maybe_save(2, force=True)
    monkeypatch.undo()
    mgr.close()  # lets the background deletions finish

    assert 2 in complete_steps(_folder(tmp_path)), (
        f"no complete step-2 left: {sorted(p.name for p in _folder(tmp_path).iterdir())}"
    )
    verify(_folder(tmp_path) / "step-2")
    other = _Model(seed=1)
    assert other.manager(tmp_path).load() == 2
    for k, v in other.model.state_dict().items():
        assert torch.equal(v, old_weights[k]), k


def _interrupted_replace(dump: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """Saves at steps 2 and 4, then leaves what a kill between the two renames of replacing step-4 leaves:
    only `step-4.old-*`. Returns the checkpoint folder and the step-4 weights."""
    run = _Model()
    mgr = run.manager(dump)
    run.save_at(mgr, 2)
    run.save_at(mgr, 4)
    mgr.close()
    folder = _folder(dump)
    os.rename(folder / "step-4", folder / "step-4.old-0badc0de-7")
    return folder, {k: v.clone() for k, v in run.model.state_dict().items()}


def _load_and_compare(dump: Path, weights: dict[str, torch.Tensor], **cfg: Any) -> None:
    """A fresh model loads step 4 from `dump` and ends with `weights`."""
    other = _Model(seed=1)
    manager = other.manager(dump, **cfg)
    try:
        assert manager.load() == 4
    finally:
        manager.close()
    for k, v in other.model.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_a_replace_killed_between_its_renames_is_restored_at_load(tmp_path):
    """A kill after step-N was moved aside and before the new one was renamed into place leaves only
    `step-N.old-*`: the next start puts it back (when it verifies) instead of finding no checkpoint."""
    folder, weights = _interrupted_replace(tmp_path)
    (folder / "step-2" / "extra").write_text("")  # and a damaged aside copy is never restored:
    os.rename(folder / "step-2", folder / "step-2.old-0badc0de-6")
    _load_and_compare(tmp_path, weights)
    assert sorted(complete_steps(folder)) == [4]


def test_load_only_reads_an_interrupted_replace_in_place_and_renames_nothing(tmp_path):
    """Evaluating a run (load_only) whose last replace was interrupted: its storage may be read-only or
    still in use, so the aside `step-N.old-*` is loaded where it lies; the folder is left as it was."""
    folder, weights = _interrupted_replace(tmp_path)
    before = sorted(p.name for p in folder.iterdir())
    _load_and_compare(tmp_path, weights, load_only=True)  # the newest step, read from its aside folder
    assert sorted(p.name for p in folder.iterdir()) == before
    _load_and_compare(tmp_path, weights)  # a run that saves puts it back, as before
    assert sorted(complete_steps(folder)) == [2, 4]


# --- the background purge ---------------------------------------------------------------------------


def test_a_delayed_purge_never_deletes_a_checkpoint_published_after_it(tmp_path, monkeypatch):
    """Going back with load_step=10 over an old trajectory 5..40, keep_latest_k=1. Saving step 20
    replaces the old step-20 and queues, on the one purge thread: the deletion of the old step-20, then
    the purge for step 20. When that deletion is slow (a big checkpoint on a network file system), the
    run saves step 30 (replacing the old step-30) before the purge for step 20 runs; that purge then
    lists step-30, keeps only {newest=40, just_saved=20, load_step=10}, and deletes the step-30 this
    run has just published. The purge for step 30 then deletes step-20: the trajectory since step 10
    is gone, and the same command restarted goes back to step 10 once more."""
    old = _Model()
    mgr = old.manager(tmp_path, keep_latest_k=0)
    for step in (5, 10, 20, 30, 40):
        old.save_at(mgr, step)
    mgr.close()

    run = _Model(seed=1)
    mgr = run.manager(tmp_path, keep_latest_k=1, load_step=10)
    assert mgr.load() == 10

    gate, entered = threading.Event(), threading.Event()
    real_rmtree = ckpt_mod._rmtree_quietly

    def slow_rmtree(path):
        entered.set()
        assert gate.wait(timeout=60)
        real_rmtree(path)

    monkeypatch.setattr(ckpt_mod, "_rmtree_quietly", slow_rmtree)
    run.save_at(mgr, 20)  # replaces step-20; the deletion of the old one is slow
    assert entered.wait(timeout=60)
    run.save_at(mgr, 30)  # replaces step-30 while the purge thread is still busy
    assert (_folder(tmp_path) / "step-30").is_dir()
    gate.set()
    mgr.close()  # the queued deletions and purges run

    assert 30 in complete_steps(_folder(tmp_path)), (
        f"the step-30 this run just saved was purged: {sorted(complete_steps(_folder(tmp_path)))}"
    )
    restarted = _Model(seed=2)
    assert restarted.manager(tmp_path, keep_latest_k=1, load_step=10).load() == 30


# --- the checkpoint process group's timeout ---------------------------------------------------------


def _group_timeouts(argv: list[str]) -> dict[str, float]:
    """Rank function: build the Trainer; return every process group's collective timeout (s)."""
    import torch.distributed as dist

    from torchtitan_like.config.loader import load_config
    from torchtitan_like.trainer import Trainer

    trainer = Trainer(load_config(argv))
    try:
        out = {}
        for pg in list(dist.distributed_c10d._world.pg_map):
            timeout = pg._get_backend(torch.device("cpu")).options._timeout
            name = "checkpoint" if pg is getattr(trainer.checkpointer, "_pg", None) else str(pg.group_name)
            out[name] = timeout.total_seconds()
        return out
    finally:
        trainer.close()


def test_the_checkpoint_group_keeps_the_start_up_timeout(tmp_path):
    """README, Timeouts: init_timeout_seconds is the collective timeout of every process group until the
    first step ends, and "the checkpoint manager's own group keeps the start-up timeout" (else a stuck
    save would hang 30 minutes instead of 97 s here; a config with a longer start-up timeout, for
    a slow first compile or slow storage, gets a shorter one for its saves). It once was
    `dist.new_group(backend="gloo")` with no timeout: 1800 s whatever the config said."""
    seconds = 97  # the harness's default group gets the same timeout as the config asks for
    argv = trainer_argv(
        tmp_path / "run", "fsdp2", "--checkpoint.enable", "--comm.init_timeout_seconds", str(seconds), steps=2
    )
    ranks = run_on_ranks(_group_timeouts, world_size=2, tmp_path=tmp_path, args=(argv,), timeout_s=seconds)
    for rank, timeouts in enumerate(ranks):
        assert len(timeouts) >= 2, f"rank {rank}: expected the default group and the checkpoint group: {timeouts}"
        assert timeouts == {name: float(seconds) for name in timeouts}, f"rank {rank}: {timeouts}"


# --- [checkpoint] keys silently ignored --------------------------------------------------------------


def test_initial_load_in_hf_without_a_path_is_a_config_error(tmp_path):
    """`initial_load_in_hf` only says what initial_load_path is; without a path, load() never reads
    anything (nor model.hf_assets_path, torchtitan's other place for them, is set), and the job would
    train the freshly initialised model as if nothing was asked."""
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.trainer import check_job

    argv = trainer_argv(tmp_path / "run", "one", "--checkpoint.enable", "--checkpoint.initial_load_in_hf", steps=2)
    with pytest.raises(ConfigError, match=r"checkpoint\.initial_load_in_hf=true needs checkpoint\.initial_load_path"):
        check_job(load_config(argv), world_size=1)
    argv = trainer_argv(tmp_path / "run", "one", "--checkpoint.enable", "--checkpoint.no_initial_load_model_only", steps=2)
    with pytest.raises(ConfigError, match=r"checkpoint\.initial_load_model_only=false needs checkpoint\.initial_load_path"):
        load_config(argv)


def test_an_initial_load_with_the_model_excluded_is_refused(tmp_path):
    for hf in (True, False):
        with pytest.raises(ConfigError, match=r'exclude_from_loading lists "model", so its weights would not be loaded'):
            _Model().manager(tmp_path, initial_load_path=str(tmp_path / "init"), initial_load_in_hf=hf,
                             exclude_from_loading=["model"])


def test_dry_run_of_a_cpu_job_refuses_async_with_pinned_mem(tmp_path):
    """README: the dry run "exits 2 with the same error: line the cluster run would print"; for a CPU
    job it does check the CPU-dependent keys (optimizer.implementation='fused'). The pinned-memory
    check once lived only in CheckpointManager.__init__, which the dry run skips."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: pinned-memory staging is possible")
    from torchtitan_like.dry_run import dry_run

    argv = trainer_argv(
        tmp_path / "run", "one", "--checkpoint.enable", "--checkpoint.async_mode", "async_with_pinned_mem", steps=2
    )
    with pytest.raises(ConfigError, match="async_with_pinned_mem"):
        dry_run(argv, world_size=1, device="cpu")


def test_rerunning_a_finished_run_says_there_is_nothing_to_train(tmp_path, caplog):
    import logging

    from torchtitan_like.config.loader import load_config
    from torchtitan_like.trainer import Trainer

    argv = trainer_argv(tmp_path / "run", "one", "--checkpoint.enable", "--checkpoint.interval", "2",
                        "--checkpoint.no_last_save_model_only", "--training.dataset", "synthetic", steps=2)
    try:
        for _ in range(2):
            trainer = Trainer(load_config(argv))
            try:
                with caplog.at_level(logging.WARNING, logger="torchtitan_like.trainer"):
                    trainer.train()
            finally:
                trainer.close()
            assert trainer.step == 2
    finally:
        torch.use_deterministic_algorithms(False)  # (debug.deterministic is process-wide)
    assert [r.getMessage() for r in caplog.records if "nothing to train" in r.getMessage()] == [
        "the checkpoint resumed is at step 2 and training.steps=2: nothing to train (raise training.steps to continue "
        "the run; a final export is written by the run that reaches training.steps)"
    ]


def test_a_stray_file_named_like_a_step_is_replaced_without_leftovers(tmp_path):
    run = _Model()
    mgr = run.manager(tmp_path)
    run.save_at(mgr, 2)
    (_folder(tmp_path) / "step-4").write_text("not a checkpoint")
    run.save_at(mgr, 4)
    mgr.close()
    assert sorted(p.name for p in _folder(tmp_path).iterdir()) == ["step-2", "step-4"]
    verify(_folder(tmp_path) / "step-4")
