"""CheckpointManager in one process (no process group): bitwise resume, integrity, crash safety,
keep_latest_k, async saves, partial loads and the model-only final save."""

from __future__ import annotations

import copy
import logging
import os
import random
import re
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

from torchtitan_like.components import checkpoint as ckpt_mod
from torchtitan_like.components.checkpoint import COMPONENTS, CheckpointError, CheckpointManager, TrainState
from torchtitan_like.components.lr_scheduler import build_lr_scheduler
from torchtitan_like.components.manifest import MANIFEST, complete_steps, list_files, verify
from torchtitan_like.config.schema import Checkpoint, LRScheduler
from torchtitan_like.errors import ConfigError
from torchtitan_like.models.llama3 import Transformer, TransformerArgs

ARGS = TransformerArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16)
FINGERPRINT = {"config_hash": "h1", "layout": {"dp_shard": 1}, "world_size": 1}

# An async save without a process group: DCP's upload thread says it assumes a single process.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls on a 2-core machine: a second OpenMP thread only spins (100x slower under load).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class FakeLoader:
    """A Stateful dataloader whose batches depend only on its position."""

    def __init__(self):
        self.pos = 0
        self.epoch = 0

    def next_batch(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + self.pos)
        self.pos += 1
        return torch.randint(0, ARGS.vocab_size, (2, 9), generator=g)

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos, "epoch": self.epoch, "buffer": [1, 2, 3]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.pos, self.epoch = sd["pos"], sd["epoch"]


@dataclass
class Run:
    model: Transformer
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: FakeLoader
    state: TrainState

    def step(self) -> float:
        tokens = self.loader.next_batch()
        # The global RNGs stand in for dropout / sampling noise: a resume must restore them too.
        tokens = (
            tokens + torch.randint(0, ARGS.vocab_size, tokens.shape) + random.randrange(ARGS.vocab_size)
        ) % ARGS.vocab_size
        logits = self.model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.tokens_seen += tokens.numel()
        return loss.item()

    def train(self, n: int, mgr: CheckpointManager | None = None) -> list[float]:
        losses = []
        for _ in range(n):
            losses.append(self.step())
            if mgr is not None:
                mgr.maybe_save(self.state.step)
        return losses


def make_run(seed: int = 0, args: TransformerArgs = ARGS) -> Run:
    torch.manual_seed(seed)
    random.seed(seed)
    model = Transformer(args)
    model.init_weights(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = build_lr_scheduler(opt, LRScheduler(warmup_steps=3), steps=20)
    return Run(model, opt, sched, FakeLoader(), TrainState())


def manager(run: Run, dump: Path, **overrides: Any) -> CheckpointManager:
    overrides.setdefault("interval", 2)
    overrides.setdefault("keep_latest_k", 0)
    cfg = Checkpoint(enable=True, **overrides)
    return CheckpointManager(
        cfg,
        dump_folder=str(dump),
        model_parts=[run.model],
        optimizer=run.optimizer,
        lr_scheduler=run.scheduler,
        dataloader=run.loader,
        train_state=run.state,
        fingerprint=FINGERPRINT,
    )


def snapshot(run: Run) -> dict[str, Any]:
    return copy.deepcopy(
        {
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "loader": run.loader.state_dict(),
            "train_state": (run.state.step, run.state.tokens_seen),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }
    )


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Bitwise equality through nested dicts / lists / tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def ckpt_dir(dump: Path) -> Path:
    return dump / "checkpoint"


def flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# --- round trip -----------------------------------------------------------------------------------


@pytest.mark.parametrize("async_mode", ["disabled", "async"])
def test_resume_continues_bitwise_identically(tmp_path, async_mode):
    run = make_run(0)
    mgr = manager(run, tmp_path, interval=3, async_mode=async_mode)
    run.train(3, mgr)
    at_save = snapshot(run)
    later_losses = run.train(3)
    at_end = snapshot(run)
    mgr.close()
    mgr.close()  # idempotent

    other = make_run(seed=1)  # different weights, RNG and data position
    mgr2 = manager(other, tmp_path, interval=3, async_mode=async_mode)
    assert mgr2.load() == 3
    assert_same(snapshot(other), at_save)
    assert other.train(3) == later_losses
    assert_same(snapshot(other), at_end)
    mgr2.close()


def test_tied_embeddings_stay_tied_after_a_load(tmp_path):
    tied = TransformerArgs(**{**ARGS.__dict__, "tie_word_embeddings": True})
    run = make_run(0, tied)
    mgr = manager(run, tmp_path)
    run.train(2, mgr)
    mgr.close()
    other = make_run(1, tied)
    mgr2 = manager(other, tmp_path)
    assert mgr2.load() == 2
    assert other.model.output.weight is other.model.tok_embeddings.weight
    assert_same(other.model.state_dict(), run.model.state_dict())


def test_saving_at_step_0_changes_nothing_and_resumes_with_a_fresh_optimizer(tmp_path):
    a = make_run(0)
    mgr = manager(a, tmp_path, interval=5)
    mgr.maybe_save(0)
    mgr.close()
    assert "optimizer" not in verify(ckpt_dir(tmp_path) / "step-0")["contents"]
    assert not a.optimizer.state  # the save did not leave initialised optimizer state behind
    losses_a = a.train(3)
    b = make_run(0)
    assert b.train(3) == losses_a

    c = make_run(1)
    mgr_c = manager(c, tmp_path, interval=5)
    assert mgr_c.load() == 0
    assert not c.optimizer.state
    assert_same(c.model.state_dict(), make_run(0).model.state_dict())


# --- integrity ------------------------------------------------------------------------------------


def test_manifest_is_written_last_then_the_folder_is_renamed(tmp_path, monkeypatch):
    seen: dict[str, Any] = {}
    real = ckpt_mod.write_manifest

    def spy(folder, manifest):
        seen["on_disk"] = list_files(folder)
        seen["listed"] = sorted(manifest["files"])
        seen["folder"] = Path(folder).name
        seen["published_early"] = (ckpt_dir(tmp_path) / "step-2").exists()
        return real(folder, manifest)

    monkeypatch.setattr(ckpt_mod, "write_manifest", spy)
    run = make_run()
    mgr = manager(run, tmp_path)
    run.train(2, mgr)
    mgr.close()
    assert seen["on_disk"] == seen["listed"] and ".metadata" in seen["listed"]
    assert seen["folder"].startswith("step-2.tmp-")
    assert not seen["published_early"]
    manifest = verify(ckpt_dir(tmp_path) / "step-2")
    assert manifest["contents"] == sorted(COMPONENTS)
    assert manifest["step"] == 2 and manifest["config_hash"] == "h1" and manifest["layout"] == {"dp_shard": 1}
    assert [p.name for p in ckpt_dir(tmp_path).iterdir()] == ["step-2"]


def _damage(folder: Path, how: str) -> str:
    """Damage a step folder; return the file name the error must mention."""
    if how == "flip":
        flip_byte(folder / "__0_0.distcp")
        return "__0_0.distcp is corrupted"
    if how == "truncate":
        data = (folder / "__0_0.distcp").read_bytes()
        (folder / "__0_0.distcp").write_bytes(data[: len(data) // 2])
        return "__0_0.distcp is truncated"
    if how == "missing_file":
        (folder / ".metadata").unlink()
        return ".metadata is missing"
    if how == "no_manifest":
        (folder / MANIFEST).unlink()
        return "manifest.json is missing"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["flip", "truncate", "missing_file", "no_manifest"])
def test_auto_resume_skips_a_damaged_latest_checkpoint(tmp_path, caplog, how):
    run = make_run()
    mgr = manager(run, tmp_path)
    run.train(2, mgr)
    at_2 = snapshot(run)
    run.train(2, mgr)
    mgr.close()
    expected = _damage(ckpt_dir(tmp_path) / "step-4", how)

    other = make_run(1)
    mgr2 = manager(other, tmp_path)
    with caplog.at_level(logging.WARNING, logger="torchtitan_like.components.checkpoint"):
        assert mgr2.load() == 2
    assert "skipping checkpoint step-4" in caplog.text and expected in caplog.text
    assert_same(snapshot(other)["model"], at_2["model"])
    assert_same(snapshot(other)["optimizer"], at_2["optimizer"])


def test_explicit_load_step_of_a_damaged_checkpoint_raises_naming_the_file(tmp_path):
    run = make_run()
    mgr = manager(run, tmp_path)
    run.train(4, mgr)
    mgr.close()
    flip_byte(ckpt_dir(tmp_path) / "step-2" / "__0_0.distcp")
    with pytest.raises(CheckpointError, match=r"load_step=2: .*step-2/__0_0\.distcp is corrupted"):
        manager(make_run(1), tmp_path, load_step=2).load()
    with pytest.raises(
        CheckpointError, match=r"load_step=6: .*step-6 does not exist \(complete checkpoints: \[2, 4\]\)"
    ):
        manager(make_run(1), tmp_path, load_step=6).load()
    assert manager(make_run(1), tmp_path, load_step=4).load() == 4


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    run = make_run()
    mgr = manager(run, tmp_path)
    run.train(4, mgr)
    mgr.close()
    flip_byte(ckpt_dir(tmp_path) / "step-2" / "__0_0.distcp")
    (ckpt_dir(tmp_path) / "step-4" / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*step-4/manifest\.json is missing"):
        manager(make_run(1), tmp_path).load()


class _FullDiskWriter(dcp.FileSystemWriter):
    """Writes part of a file, then fails the way a full disk does."""

    def write_data(self, plan, planner):
        (Path(self.path) / "__0_0.distcp").write_bytes(b"half a tensor")
        raise OSError(28, "No space left on device")


@pytest.mark.parametrize("async_mode", ["disabled", "async"])
def test_a_failed_save_leaves_no_step_folder_and_the_older_one_intact(tmp_path, monkeypatch, async_mode):
    run = make_run()
    mgr = manager(run, tmp_path, async_mode=async_mode)
    run.train(2, mgr)
    mgr.wait()
    run.train(2)
    monkeypatch.setattr(CheckpointManager, "_make_writer", lambda self, path: _FullDiskWriter(str(path)))
    with pytest.raises(
        CheckpointError, match=r"step 4 into .*step-4\.tmp-.* failed: rank 0: OSError: .*No space left on device"
    ):
        mgr.maybe_save(4)
        mgr.wait()  # async: the failure surfaces here
    folder = ckpt_dir(tmp_path)
    assert not (folder / "step-4").exists()
    assert verify(folder / "step-2")["step"] == 2
    # Deleted at once, not at the next save: a disk that filled up is freed (a rerun found it still full).
    assert not [p.name for p in folder.iterdir() if ".tmp-" in p.name], "the failed save's partial folder stays"

    monkeypatch.undo()
    run.train(2, mgr)  # saves step 6
    mgr.close()
    assert sorted(p.name for p in folder.iterdir()) == ["step-2", "step-6"]
    assert manager(make_run(1), tmp_path).load() == 6


class _TorchSaveFullDiskWriter(dcp.FileSystemWriter):
    """Fails as a real full disk does under torch 2.13 (seen on a 40 MB tmpfs): torch.save's zip writer
    loses the ENOSPC and raises this RuntimeError instead."""

    def write_data(self, plan, planner):
        (Path(self.path) / "__0_0.distcp").write_bytes(b"half a tensor")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


@pytest.mark.parametrize("async_mode", ["disabled", "async"])
@pytest.mark.parametrize("free", [4096, 10**12])
def test_a_save_that_filled_the_disk_says_the_disk_is_full(tmp_path, monkeypatch, async_mode, free):
    """The error named only torch's "unexpected pos 704 vs 598": nothing said the disk was full, or what to do.
    The free space, measured before the partial folder is deleted, says it where the errno is lost."""

    run = make_run()
    mgr = manager(run, tmp_path, async_mode=async_mode)
    run.train(2)
    measured = []

    def free_bytes(path):
        measured.append([p.name for p in Path(path).iterdir()])  # the partial folder is still there
        return free

    monkeypatch.setattr(ckpt_mod, "_free_bytes", free_bytes)
    monkeypatch.setattr(CheckpointManager, "_make_writer", lambda self, path: _TorchSaveFullDiskWriter(str(path)))
    with pytest.raises(CheckpointError) as raised:
        mgr.maybe_save(2)
        mgr.wait()
    message = str(raised.value)
    assert "unexpected pos 704 vs 598" in message
    full = (f"; the disk holding {ckpt_dir(tmp_path)} is full (0.0 MB free when the save failed): free space there, "
            "lower checkpoint.keep_latest_k (a save needs room for one more checkpoint than it keeps) or point "
            "checkpoint.folder / job.dump_folder at another disk (complete checkpoints are intact; a rerun resumes "
            "from the newest)")
    assert message.endswith(full) == (free == 4096), message
    assert measured and all(any(".tmp-" in name for name in names) for names in measured), measured
    assert not [p.name for p in ckpt_dir(tmp_path).iterdir() if ".tmp-" in p.name]
    monkeypatch.undo()
    mgr.close()


def test_a_preemption_save_still_happens_after_a_failed_async_save(tmp_path, monkeypatch, caplog):
    """The pre-emption save (force) waits for the save in flight first; when that one failed (a full
    disk that has since been cleared, a flaky file server), the state at the signal is saved all the
    same and the failure is logged. It used to raise the old failure, so the pre-empted job exited
    without saving and lost everything since the previous checkpoint."""
    run = make_run()
    mgr = manager(run, tmp_path, async_mode="async")
    run.train(2, mgr)
    mgr.wait()
    run.train(2)
    real_writer = CheckpointManager._make_writer
    monkeypatch.setattr(CheckpointManager, "_make_writer", lambda self, path: _FullDiskWriter(str(path)))
    mgr.maybe_save(4)  # fails in the background
    monkeypatch.setattr(CheckpointManager, "_make_writer", real_writer)
    run.train(1)
    run.state.step = 5
    with caplog.at_level(logging.ERROR, logger="torchtitan_like"):
        mgr.maybe_save(5, force=True)
    mgr.close()
    assert re.search(r"step 4 into .* failed: .*No space left on device.*saving step 5 now", caplog.text)
    assert verify(ckpt_dir(tmp_path) / "step-5")["step"] == 5
    assert manager(make_run(1), tmp_path).load() == 5



def test_a_process_killed_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        import torch
        import torch.distributed.checkpoint as dcp
        from torchtitan_like.components.checkpoint import CheckpointManager, TrainState
        from torchtitan_like.config.schema import Checkpoint
        from torchtitan_like.models.llama3 import Transformer, TransformerArgs

        model = Transformer(TransformerArgs(**{ARGS.__dict__!r}))
        model.init_weights(0)
        opt = torch.optim.AdamW(model.parameters())
        mgr = CheckpointManager(
            Checkpoint(enable=True, interval=1, async_mode="async"), dump_folder=sys.argv[1], model_parts=[model],
            optimizer=opt, lr_scheduler=None, dataloader=None, train_state=TrainState(step=1), fingerprint={{}},
        )
        mgr.maybe_save(1)
        mgr.wait()

        class Dying(dcp.FileSystemWriter):
            def write_data(self, plan, planner):
                (Path(self.path) / "__0_0.distcp").write_bytes(b"half a tensor")
                os._exit(9)  # killed mid-upload: no exception handling, no cleanup

        mgr._make_writer = lambda path: Dying(str(path))
        mgr.train_state.step = 2
        mgr.maybe_save(2)
        mgr.wait()
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 9, proc.stderr
    folder = ckpt_dir(tmp_path)
    assert not (folder / "step-2").exists()
    assert any(p.name.startswith("step-2.tmp-") for p in folder.iterdir())
    verify(folder / "step-1")
    run = make_run(1)
    mgr = manager(run, tmp_path)
    assert mgr.load() == 1
    assert run.state.step == 1
    ref = Transformer(ARGS)
    ref.init_weights(0)
    assert_same(run.model.state_dict(), ref.state_dict())


# --- retention, async, partial loads ---------------------------------------------------------------


def test_keep_latest_k_purges_older_checkpoints_but_never_the_new_one(tmp_path):
    run = make_run()
    mgr = manager(run, tmp_path, interval=1, keep_latest_k=2)
    run.train(5, mgr)
    mgr.wait()
    mgr.maybe_save(3)  # an older step saved again is kept although it is not among the newest 2
    mgr.close()
    assert sorted(p.name for p in ckpt_dir(tmp_path).iterdir()) == ["step-3", "step-4", "step-5"]


def test_keep_latest_k_0_keeps_everything(tmp_path):
    run = make_run()
    mgr = manager(run, tmp_path, interval=1, keep_latest_k=0)
    run.train(4, mgr)
    mgr.close()
    assert sorted(p.name for p in ckpt_dir(tmp_path).iterdir()) == ["step-1", "step-2", "step-3", "step-4"]


class _GatedWriter(dcp.FileSystemWriter):
    """Holds the upload until the test opens the gate, so training provably runs during the save."""

    gate = threading.Event()

    def write_data(self, plan, planner):
        assert self.gate.wait(timeout=60)
        return super().write_data(plan, planner)


def test_async_save_has_the_sync_content_while_training_goes_on(tmp_path, monkeypatch):
    run = make_run()
    run.train(2)
    expected = snapshot(run)
    sync = manager(run, tmp_path / "sync")
    sync.maybe_save(2)
    sync.close()
    amgr = manager(run, tmp_path / "async", async_mode="async")
    _GatedWriter.gate.clear()
    monkeypatch.setattr(CheckpointManager, "_make_writer", lambda self, path: _GatedWriter(str(path)))
    amgr.maybe_save(2)  # returns while the upload is held
    # Training goes on while the upload waits; in-place updates must not reach the checkpoint.
    run.train(1)
    with torch.no_grad():
        for p in run.model.parameters():
            p.add_(1.0)
    assert not (ckpt_dir(tmp_path / "async") / "step-2").exists()
    _GatedWriter.gate.set()
    amgr.wait()
    assert (ckpt_dir(tmp_path / "async") / "step-2" / MANIFEST).is_file()
    amgr.close()

    def entries(dump: Path) -> dict[str, Any]:
        md = dcp.FileSystemReader(str(ckpt_dir(dump) / "step-2")).read_metadata().state_dict_metadata
        return {
            k: (getattr(v, "size", None), str(getattr(getattr(v, "properties", None), "dtype", None)))
            for k, v in md.items()
        }

    assert entries(tmp_path / "sync") == entries(tmp_path / "async")
    for kind in ("sync", "async"):
        other = make_run(1)
        assert manager(other, tmp_path / kind).load() == 2
        got = snapshot(other)
        for key in ("model", "optimizer", "scheduler", "loader", "train_state", "torch_rng", "python_rng"):
            assert_same(got[key], expected[key], f"{kind}.{key}")


def test_async_with_pinned_mem_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: pinned-memory staging is available")
    with pytest.raises(ConfigError, match=r"async_with_pinned_mem' needs CUDA.*use async_mode='async'"):
        manager(make_run(), tmp_path, async_mode="async_with_pinned_mem")


def test_the_staged_copy_waits_for_the_training_stream_first(tmp_path, monkeypatch):
    """async_with_pinned_mem copies on the stager's own CUDA stream, which does not wait for the training
    stream: the save waits for the queued optimizer step first, or the copy could read half-updated
    weights and moments. (CUDA faked: the order of the wait and the copy is what is checked.)"""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    monkeypatch.setattr(ckpt_mod, "check_async_device", lambda cfg, device_type: None)
    monkeypatch.setattr(CheckpointManager, "_make_stager", lambda self: DefaultStager(StagingOptions(False, False, True, False)))
    run = make_run()
    mgr = manager(run, tmp_path, async_mode="async_with_pinned_mem")
    run.train(1)
    calls = []

    class _Stream:
        def synchronize(self):
            calls.append("synchronize")

    def async_save(*args, **kwargs):
        calls.append("async_save")
        raise RuntimeError("stop here")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _Stream())
    monkeypatch.setattr(ckpt_mod.dcp, "async_save", async_save)
    with pytest.raises(CheckpointError, match="stop here"):
        mgr.maybe_save(1, force=True)
    assert calls == ["synchronize", "async_save"]
    monkeypatch.undo()
    mgr.close()


def test_staged_async_path_waits_for_staging_before_the_next_optimizer_step(tmp_path, monkeypatch):
    """The async_with_pinned_mem code path, on CPU: the same DefaultStager with background staging,
    minus pinned memory and CUDA streams (which need a GPU)."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    monkeypatch.setattr(ckpt_mod, "check_async_device", lambda cfg, device_type: None)  # skip only the "needs CUDA" check
    # No timing: the staging thread copies only once the training thread is waiting in optimizer.step's
    # pre-hook, so the step provably starts before the copy ends and provably waits for it.
    waiting, staged = threading.Event(), threading.Event()

    class GatedStager(DefaultStager):
        def _stage(self, state_dict, **kwargs):
            assert waiting.wait(timeout=120), "optimizer.step never waited for the staging"
            out = super()._stage(state_dict, **kwargs)
            staged.set()
            return out

    monkeypatch.setattr(
        CheckpointManager, "_make_stager", lambda self: GatedStager(StagingOptions(False, False, True, False))
    )
    run = make_run()
    mgr = manager(run, tmp_path, async_mode="async_with_pinned_mem")
    wait_for_staging = mgr.wait_for_staging

    def step_waits():  # the optimizers' pre-hook calls mgr.wait_for_staging()
        waiting.set()
        wait_for_staging()

    run.train(2)
    expected = snapshot(run)
    mgr.maybe_save(2)
    assert not staged.is_set()  # maybe_save returned while its staging waits (for the step below)
    mgr.wait_for_staging = step_waits  # (after the save: the hook runs at every step, before any save too)
    run.train(1)  # optimizer.step() blocks on the staging (pre-hook), so the copy saw the step-2 weights
    assert waiting.is_set() and staged.is_set()
    mgr.close()
    monkeypatch.undo()

    other = make_run(1)
    assert manager(other, tmp_path).load() == 2
    for key in ("model", "optimizer", "scheduler", "loader", "train_state"):
        assert_same(snapshot(other)[key], expected[key], key)


def test_staged_async_saves_again_and_again_when_each_staging_spends_the_stager(tmp_path, monkeypatch, caplog):
    """torch 2.11's DefaultStager closes its StateDictStager at the end of every staging (torch 2.13's does
    not): reused, the second save's staging raised KeyError(<class 'type'>) and the job died at its second
    checkpoint. The manager replaces a spent stager; here one that behaves as torch 2.11's does."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    class SpentAfterEachStaging(DefaultStager):  # what torch 2.11's DefaultStager._stage does last
        def _stage(self, state_dict, **kwargs):
            out = super()._stage(state_dict, **kwargs)
            self._state_dict_stager.close()
            return out

    made = []

    def make_stager(self):
        made.append(SpentAfterEachStaging(StagingOptions(False, False, True, False)))
        return made[-1]

    monkeypatch.setattr(ckpt_mod, "check_async_device", lambda cfg, device_type: None)
    monkeypatch.setattr(CheckpointManager, "_make_stager", make_stager)
    run = make_run()
    mgr = manager(run, tmp_path, async_mode="async_with_pinned_mem", keep_latest_k=0)
    with caplog.at_level(logging.INFO, logger=ckpt_mod.__name__):
        for step in (1, 2, 3):
            run.train(1)
            mgr.maybe_save(step, force=True)
        expected = snapshot(run)
        mgr.close()
    monkeypatch.undo()
    assert len(made) == 3, "one stager per save: each staging spends it"
    assert sum("stager is spent after each save" in r.getMessage() for r in caplog.records) == 1
    assert sorted(complete_steps(tmp_path / "checkpoint")) == [1, 2, 3]
    other = make_run(1)
    assert manager(other, tmp_path).load() == 3
    for key in ("model", "optimizer", "scheduler", "loader", "train_state"):
        assert_same(snapshot(other)[key], expected[key], key)


def test_this_torch_stager_keeps_the_table_that_tells_a_spent_one():
    """CheckpointManager._renew_spent_stager reads StateDictStager._deepcopy_dispatch (private): a torch
    without it would reuse a spent stager again."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    stager = DefaultStager(StagingOptions(False, False, False, False))
    table = stager._state_dict_stager._deepcopy_dispatch
    assert isinstance(table, dict) and table
    stager.stage({"x": torch.ones(2)})
    if stager._state_dict_stager._deepcopy_dispatch == {}:  # a torch whose staging spends the stager (2.11)
        with pytest.raises(KeyError):
            stager.stage({"x": torch.ones(2)})
    stager.close()


def test_a_dataloader_state_that_differs_across_ranks_is_refused(tmp_path, monkeypatch):
    run = make_run()
    mgr = manager(run, tmp_path)
    # Pretend a second rank reported a different dataloader state (DCP would keep only one copy); it
    # agrees with everything else (the start-of-save check that rank 0 created the folder).
    def all_gather(obj):
        return [obj, (obj[0], "another state")] if isinstance(obj, tuple) else [obj, obj]

    monkeypatch.setattr(mgr, "_all_gather", all_gather)
    with pytest.raises(CheckpointError, match="dataloader state differs across ranks"):
        mgr.maybe_save(2)


def test_exclude_from_loading_skips_those_states(tmp_path):
    run = make_run()
    mgr = manager(run, tmp_path)
    run.train(2, mgr)
    mgr.close()
    other = make_run(1)
    mgr2 = manager(other, tmp_path, exclude_from_loading=["optimizer", "dataloader"])
    assert mgr2.load() == 2
    assert_same(other.model.state_dict(), run.model.state_dict())
    assert not other.optimizer.state
    assert other.loader.pos == 0
    assert other.scheduler.last_epoch == 2 and other.state.step == 2


def test_exclude_from_loading_rejects_unknown_names(tmp_path):
    with pytest.raises(ConfigError, match=r"exclude_from_loading=\['optimiser'\]: \['optimiser'\] not among model"):
        manager(make_run(), tmp_path, exclude_from_loading=["optimiser"])


@pytest.mark.parametrize("key", ["last_save_in_hf", "initial_load_in_hf"])
def test_hf_import_export_under_pipeline_parallel_is_refused_before_any_build(key):
    # check_job (the trainer's first step, and the dry run's) refuses it: not the final save of a long run.
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.trainer import check_job

    cfg = load_config([
        "--job.config_file", str(Path(__file__).resolve().parents[2] / "train_configs/debug_model.toml"),
        "--parallelism.pipeline_parallel_degree", "2", "--checkpoint.enable", f"--checkpoint.{key}",
        "--checkpoint.initial_load_path", "/hf/llama",
    ])
    # An import converts the HF folder into DCP first; an export converts a saved step afterwards.
    how = r"convert the Hugging Face folder into a DCP checkpoint first \(tools/checkpoint\.py convert HF_FOLDER" if key == \
        "initial_load_in_hf" else r"export a saved DCP checkpoint afterwards \(tools/checkpoint\.py convert STEP_FOLDER"
    with pytest.raises(ConfigError, match=rf"checkpoint\.{key}=true with parallelism\.pipeline_parallel_degree=2: "
                                          rf"Hugging Face import/export is not supported.*; set checkpoint\.{key}=false and {how}"):
        check_job(cfg, world_size=2)
    cfg.checkpoint.initial_load_in_hf = cfg.checkpoint.last_save_in_hf = False
    assert check_job(cfg, world_size=2).pp_plan is not None


def test_last_save_is_model_only_in_the_export_dtype(tmp_path, caplog):
    run = make_run()
    run.train(3)
    mgr = manager(run, tmp_path, interval=10, export_dtype="bfloat16")
    mgr.maybe_save(3)  # not an interval step: nothing
    assert not ckpt_dir(tmp_path).exists() or not any(ckpt_dir(tmp_path).iterdir())
    mgr.maybe_save(3, last=True)
    mgr.close()
    folder = ckpt_dir(tmp_path) / "step-3"
    manifest = verify(folder)
    assert manifest["contents"] == ["model"] and manifest["model_only"] and manifest["model_dtype"] == "bfloat16"
    md = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    assert md and all(k.startswith("model.") and v.properties.dtype == torch.bfloat16 for k, v in md.items())

    other = make_run(1)
    mgr2 = manager(other, tmp_path)
    with caplog.at_level(logging.WARNING, logger="torchtitan_like.components.checkpoint"):
        assert mgr2.load() == 3
    assert "holds no optimizer, lr_scheduler, dataloader, train_state" in caplog.text
    assert other.state.step == 3 and not other.optimizer.state
    for k, v in run.model.state_dict().items():
        assert other.model.state_dict()[k].dtype == torch.float32
        assert torch.equal(other.model.state_dict()[k], v.bfloat16().float()), k


def test_last_save_keeps_everything_when_last_save_model_only_is_off(tmp_path):
    run = make_run()
    run.train(3)
    mgr = manager(run, tmp_path, interval=10, last_save_model_only=False)
    mgr.maybe_save(3, last=True)
    mgr.close()
    assert verify(ckpt_dir(tmp_path) / "step-3")["contents"] == sorted(COMPONENTS)


def test_saving_a_step_again_replaces_it(tmp_path, caplog):
    run = make_run()
    mgr = manager(run, tmp_path)
    run.train(2, mgr)
    with torch.no_grad():
        run.model.norm.weight.fill_(3.0)
    with caplog.at_level(logging.WARNING, logger="torchtitan_like.components.checkpoint"):
        mgr.maybe_save(2)
    mgr.close()
    assert "replacing existing checkpoint" in caplog.text
    assert sorted(p.name for p in ckpt_dir(tmp_path).iterdir()) == ["step-2"]
    other = make_run(1)
    assert manager(other, tmp_path).load() == 2
    assert torch.equal(other.model.norm.weight, torch.full((ARGS.dim,), 3.0))


# --- initial_load_path ----------------------------------------------------------------------------


def test_initial_load_path_starts_a_new_run_from_another_runs_weights(tmp_path):
    first = make_run(0)
    mgr = manager(first, tmp_path / "first")
    first.train(2, mgr)
    mgr.close()
    source = ckpt_dir(tmp_path / "first") / "step-2"

    b = make_run(1)
    mgr_b = manager(b, tmp_path / "second", initial_load_path=str(source))
    assert mgr_b.load() is None  # model only (the default): training starts at step 0
    assert_same(b.model.state_dict(), first.model.state_dict())
    assert not b.optimizer.state and b.state.step == 0 and b.loader.pos == 0

    c = make_run(1)
    assert manager(c, tmp_path / "third", initial_load_path=str(source), initial_load_model_only=False).load() == 2
    assert_same(snapshot(c)["optimizer"], snapshot(first)["optimizer"])

    # Once the run has a checkpoint of its own, that one wins.
    b.train(2, mgr_b)
    mgr_b.close()
    d = make_run(1)
    assert manager(d, tmp_path / "second", initial_load_path=str(source)).load() == 2
    assert_same(d.model.state_dict(), b.model.state_dict())


def test_initial_load_path_that_is_not_a_dcp_checkpoint(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(CheckpointError, match=r"not a DCP checkpoint .*\.metadata is missing.*initial_load_in_hf=true"):
        manager(make_run(), tmp_path / "run", initial_load_path=str(tmp_path / "weights")).load()


def test_disabled_checkpointing_neither_saves_nor_resumes(tmp_path):
    run = make_run()
    mgr = manager(run, tmp_path)
    run.train(2, mgr)
    mgr.close()
    off = CheckpointManager(
        Checkpoint(enable=False, interval=1),
        dump_folder=str(tmp_path),
        model_parts=[run.model],
        optimizer=run.optimizer,
        lr_scheduler=run.scheduler,
        dataloader=run.loader,
        train_state=run.state,
        fingerprint=FINGERPRINT,
    )
    assert off.load() is None
    off.maybe_save(3)
    off.close()
    assert sorted(p.name for p in ckpt_dir(tmp_path).iterdir()) == ["step-2"]
