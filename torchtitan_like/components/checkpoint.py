"""Distributed checkpoints (DCP): save every `interval` steps, resume from the latest complete one.

One DCP checkpoint per step, in `<dump_folder>/<checkpoint.folder>/step-N`, holding:

    model         get_model_state_dict (DTensors under FSDP/TP; parts merged; FQNs survive a PP split)
    optimizer     get_optimizer_state_dict, flattened per parameter FQN, so it reshards to any layout
    lr_scheduler  the LambdaLR state, pickled
    dataloader    its state, pickled, under one key: it is the same on every rank at a step boundary,
                  so DCP keeps one copy and any data-parallel degree can load it
    train_state   step, tokens seen, and every rank's RNG states

Integrity: a save writes into `step-N.tmp-<nonce>-<k>`; when every rank has finished, the files are
hashed (split over ranks), rank 0 writes `manifest.json` last (atomically) and renames the folder to
`step-N`. A crash at any point leaves no `step-N` that looks complete and never touches older steps;
the leftover partial folder is removed by rank 0 at the next save. Saving a step that exists moves
the old one aside (`step-N.old-*`) and back if the new one cannot take its place; a kill between the
two renames is repaired at the next start (the aside copy, if it verifies, becomes step-N again).
Loading verifies the manifest first:
auto-resume skips a damaged latest step (with a warning) and takes the one before; an explicit
`load_step` that is damaged raises `CheckpointError` naming the file.

Going back with `load_step=K`: the run records K as its "branch" in every manifest it writes, so the
same command, restarted, resumes from the newest of those (not K again, nor the newer checkpoints of
the trajectory it left); the purge never deletes step K.

Async (`async_mode`): `dcp.async_save` on a gloo process group of our own (async saves on the default
group while training goes on crash gloo; see CPU_NOTES.md); the manifest and rename happen in a
background thread when the upload completes. The next save, `wait()` and `close()` wait for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import random
import secrets
import shutil
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from torchtitan_like.components.manifest import (
    ASIDE_RE,
    MANIFEST,
    CheckpointError,
    build_manifest,
    complete_steps,
    dcp_contents,
    dcp_keys,
    fsync_dir,
    hash_files,
    is_partial,
    list_files,
    read_manifest,
    step_folders,
    verify,
    verify_errors,
    write_manifest,
)
from torchtitan_like.components.tokenizer import describe_identity
from torchtitan_like.config.schema import Checkpoint
from torchtitan_like.errors import DISK_FULL_ERRNOS, ConfigError

__all__ = [
    "COMPONENTS", "CheckpointError", "CheckpointManager", "TrainState", "check_checkpoint_config", "check_initial_load",
    "verify",
]

logger = logging.getLogger(__name__)

COMPONENTS = ("model", "optimizer", "lr_scheduler", "dataloader", "train_state")
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HF_SUBFOLDER = "hf"
"""A final save with last_save_in_hf puts the Hugging Face export in step-N/hf (covered by the manifest)."""

_FLAT_OPTIM = StateDictOptions(flatten_optimizer_state_dict=True)


# --- train state ----------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's Python, torch CPU and (if initialised) CUDA RNG states; CUDA: this process's device
    only (the job may resume where a process sees fewer GPUs)."""
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):
            # Older checkpoints: one state per GPU the saving process saw; this process's device's, if any.
            i = torch.cuda.current_device()
            cuda = cuda[i] if i < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda)


@dataclass
class TrainState(Stateful):
    """The trainer's own progress: the optimizer steps taken and the tokens consumed."""

    step: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "rng": rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.tokens_seen = int(state_dict["tokens_seen"])
        if state_dict.get("rng") is not None:
            set_rng_state(state_dict["rng"])


# --- helpers ------------------------------------------------------------------------------------


FULL_DISK_BYTES = 16 * 2**20
"""Free space below which a failed save is reported as a full disk. A write that fails for want of space
fills the disk to its last block first; the partial files are still there when this is measured."""


def _free_bytes(path: Path) -> int | None:
    """Bytes free to this process on the file system holding `path` (its nearest existing folder); None when
    that file system does not say."""
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except FileNotFoundError:  # (not yet made: its parent's file system is the one it would be on)
            continue
        except OSError:
            return None
    return None


def _disk_full_errno(e: BaseException | None) -> bool:
    """Whether `e` (a DCP CheckpointException with its per-rank failures included) or its causes is an
    OSError saying the disk or the quota is full."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(x, CheckpointException):  # (rank -> (exception, traceback))
            todo.extend(f[0] if isinstance(f, tuple) else f for f in x.failures.values())
        todo.extend((x.__cause__, x.__context__))
    return False


def disk_full_note(folder: Path, error: BaseException | None) -> str:
    """'' or the advice for a save that failed because the disk is full. torch.save, which DCP writes with,
    turns the writer's ENOSPC into "RuntimeError: [enforce fail at inline_container.cc:...] unexpected pos
    N vs M" (torch 2.13), so the free space left says it where the errno is lost. Measure before the
    failed save's partial folder is deleted."""
    if _disk_full_errno(error):
        state = "is full"
    elif (free := _free_bytes(folder)) is not None and free < FULL_DISK_BYTES:
        state = f"is full ({free / 1e6:.1f} MB free when the save failed)"
    else:
        return ""
    return (f"; the disk holding {folder} {state}: free space there, lower checkpoint.keep_latest_k (a save needs "
            "room for one more checkpoint than it keeps) or point checkpoint.folder / job.dump_folder at another disk "
            "(complete checkpoints are intact; a rerun resumes from the newest)")


def _rmtree_quietly(path: Path) -> None:
    try:
        if path.is_symlink() or not path.is_dir():  # (a stray file named step-N is replaced like a folder)
            path.unlink()
            return
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        logger.warning("could not delete %s: %s", path, e)


# --- the manager ----------------------------------------------------------------------------------


class CheckpointManager:
    """Saves and loads the whole training state; the trainer calls load(), maybe_save(), wait(), close().

    `optimizer` is one optimizer over the model part, or one optimizer per model part (pipeline
    parallel), or None for a manager that only loads model weights (checkpoint.load_only, e.g. for
    tools/generate.py). `lr_scheduler` and `dataloader` may be None (not saved). `fingerprint` =
    {"config_hash", "layout", "world_size"} goes into each manifest. `model_args` (default: the first
    model part's `.args`) is needed only for the Hugging Face import/export. `tokenizer`: the run's
    Tokenizer.identity() (None: a run without one), recorded in each manifest and compared with the
    checkpoint's on load (`tokenizer_key` names it in the errors; `tokenizer_mismatch="warn"` for a reader
    such as tools/generate.py, which only warns).
    """

    def __init__(
        self,
        cfg: Checkpoint,
        *,
        dump_folder: str | os.PathLike,
        model_parts: Sequence[nn.Module],
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
        lr_scheduler: Any,
        dataloader: Stateful | None,
        train_state: TrainState,
        fingerprint: dict[str, Any],
        model_args: Any = None,
        special_tokens: tuple[int, int] | None = None,
        tokenizer_path: str | None = None,
        tokenizer: dict[str, Any] | None = None,
        tokenizer_key: str = "model.tokenizer_path",
        tokenizer_mismatch: str = "error",
        timeout_s: float | None = None,
    ):
        """timeout_s: the checkpoint process group's collective timeout (the trainer passes
        comm.init_timeout_seconds: a save may be slow); None = torch's default for a new group."""
        self.cfg = cfg
        self.special_tokens = special_tokens  # (bos, eos) of the run's tokenizer, for the HF config.json
        self.tokenizer_path = tokenizer_path  # the run's model.tokenizer_path: its files go into the HF export
        self.tokenizer = tokenizer
        self.tokenizer_key = tokenizer_key
        assert tokenizer_mismatch in ("error", "warn"), tokenizer_mismatch
        self.tokenizer_mismatch = tokenizer_mismatch
        check_checkpoint_config(cfg, pp=int(fingerprint.get("layout", {}).get("pp", 1)))
        check_async_device(cfg, device_type="cuda" if torch.cuda.is_available() else "cpu")
        self.folder = Path(dump_folder) / cfg.folder
        self.model_parts = list(model_parts)
        if optimizer is None and not cfg.load_only:
            raise ValueError("a CheckpointManager without an optimizer only loads: set load_only in its config")
        self.optimizers = [] if optimizer is None else list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        if optimizer is not None and len(self.optimizers) != len(self.model_parts):
            raise CheckpointError(
                f"{len(self.model_parts)} model parts but {len(self.optimizers)} optimizer(s): with several model "
                f"parts (pipeline parallel) pass one optimizer per part, so each part's state keeps its parameter names"
            )
        self.lr_scheduler = lr_scheduler
        self.dataloader = dataloader
        self.train_state = train_state
        self.fingerprint = dict(fingerprint)
        self.model_args = model_args if model_args is not None else getattr(self.model_parts[0], "args", None)
        self.export_dtype = EXPORT_DTYPES[cfg.export_dtype]

        self._dist = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self._dist else 0
        self.world_size = dist.get_world_size() if self._dist else 1
        # One gloo group for every checkpoint collective (async uploads run in a background thread and
        # must not share the training group). Created unconditionally: new_group is itself collective.
        timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
        self._pg = dist.new_group(backend="gloo", timeout=timeout) if self._dist else None
        self._nonce = self._broadcast(secrets.token_hex(4))  # names this run's partial folders
        self._saves = 0
        self._branch: int | None = None
        """The checkpoint.load_step this run's trajectory started from (inherited when resuming a
        checkpoint that records one), written into every manifest: a restart of the same command finds
        the checkpoints that continue it, and does not go back to load_step every time."""
        self.loaded_from: Path | None = None
        """The folder (or safetensors file) the last load() read weights from; None before one, or when
        it found nothing to load."""

        self._async = cfg.enable and not cfg.load_only and cfg.async_mode != "disabled"
        self._finisher = ThreadPoolExecutor(1, thread_name_prefix="ckpt-finish") if self._async else None
        self._purger = ThreadPoolExecutor(1, thread_name_prefix="ckpt-purge")
        self._publish_lock = threading.Lock()
        self._published: list[int] = []
        """Steps this run published, in order (a step saved again appears again)."""
        self._pending: Future | None = None
        self._staging: Future | None = None
        self._stager = None
        self._stager_renewed = False
        self.saved_step: int | None = None
        """The step of the latest save this run started (None before any)."""
        self._hook = None
        if self._async and cfg.async_mode == "async_with_pinned_mem":
            self._stager = self._make_stager()
            # The parameters must not change while they are being copied: every optimizer step first
            # waits for the staging of the previous save (a no-op when none is running).
            self._hook = [opt.register_step_pre_hook(lambda *_: self.wait_for_staging()) for opt in self.optimizers]
        self._closed = False

    # --- collectives on the checkpoint group (no-ops in a world of one) ---

    def _broadcast(self, obj: Any) -> Any:
        if not self._dist:
            return obj
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self._pg)
        return box[0]

    def _all_gather(self, obj: Any) -> list[Any]:
        if not self._dist:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._pg)
        return out

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        """Silence DCP's "assuming the intent is to save/load in a single process" (we pass no_dist on
        purpose). Main thread only: catch_warnings is not thread-safe."""
        with warnings.catch_warnings():
            if not self._dist:
                warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            yield

    def _agree(self, error: str | None) -> None:
        """Raise the same CheckpointError on every rank if any rank reports an error."""
        errors = [e for e in self._all_gather(error) if e]
        if errors:
            raise CheckpointError(errors[0])

    # --- saving -----------------------------------------------------------------------------------

    def maybe_save(
        self, step: int, *, last: bool = False, force: bool = False, seed: bool = False, first: bool = False
    ) -> None:
        """Save at every `interval`-th step and at the last one (model only if last_save_model_only).

        `force` saves the full state now, whatever the interval (a pre-empted run, to resume from).
        `seed` saves the model's weights now as they are, in full precision (create_seed_checkpoint:
        export_dtype and last_save_in_hf are for the final export, not for a run's starting point).
        `first`: `step` is the first step this run trained, saved in full with enable_first_step_checkpoint.
        Nothing is saved with load_only.
        """
        if not self.cfg.enable or self._closed or self.cfg.load_only:
            return
        interval = self.cfg.interval
        first = first and self.cfg.enable_first_step_checkpoint
        if not (last or force or seed or first) and (interval <= 0 or step % interval != 0):
            return
        try:
            self.wait()  # one save in flight at a time
        except CheckpointError as e:
            if not force:
                raise
            # A pre-empted run still saves where it stopped: the failed earlier save (every rank saw it:
            # DCP reports a write failure on all ranks) is reported, not a reason to lose this state too.
            logger.error("%s; saving step %d now all the same (pre-emption)", e, step)
        t0 = time.perf_counter()
        self.saved_step = step
        model_only = seed or (last and self.cfg.last_save_model_only)
        export_dtype = None if seed else self.export_dtype
        self._saves += 1
        tmp = self.folder / f"step-{step}.tmp-{self._nonce}-{self._saves}"
        error = None
        if self.rank == 0:
            try:
                self._remove_partials()
                tmp.mkdir(parents=True, exist_ok=False)
            except OSError as e:
                error = f"cannot create the checkpoint folder {tmp}: {e}{disk_full_note(self.folder, e)}"
        # Every rank waits for rank 0 here: rank 0 deletes partial folders (step-N.tmp-*) first, and
        # each rank's DCP writer also creates `tmp` (FileSystemWriter.prepare_local_plan). Without the
        # wait a fast rank created it first and rank 0's mkdir failed (seen on a loaded machine).
        self._agree(error)

        state, fresh_optimizers = self._state_for_save(model_only=model_only, dtype=export_dtype)
        if last and not seed and self.cfg.last_save_in_hf:
            self._export_hf(tmp / HF_SUBFOLDER)
        contents = sorted(state)
        writer = self._make_writer(tmp)
        pg_kwargs = {"process_group": self._pg} if self._dist else {"no_dist": True}
        model_dtype = self.cfg.export_dtype if model_only and export_dtype is not None else None
        finish = (step, tmp, contents, model_only, model_dtype, t0)
        if not self._async:
            try:
                with self._quiet():
                    dcp.save(state, storage_writer=writer, **pg_kwargs)
            except (Exception, CheckpointException) as e:
                note = self._discard_failed(tmp, e)
                raise CheckpointError(f"saving step {step} into {tmp} failed: {_describe(e)}{note}") from e
            self._finish(*finish)
        else:
            try:
                if self._stager is not None:  # (async_with_pinned_mem)
                    self._renew_spent_stager()
                if self._stager is not None and torch.cuda.is_available():
                    # The stager copies on its own stream, which does not wait for the training stream: without
                    # this, the copy could read weights and moments the optimizer step is still writing.
                    torch.cuda.current_stream().synchronize()
                response = dcp.async_save(state, storage_writer=writer, async_stager=self._stager, **pg_kwargs)
            except (Exception, CheckpointException) as e:
                note = self._discard_failed(tmp, e)
                raise CheckpointError(
                    f"starting the async save of step {step} into {tmp} failed: {_describe(e)}{note}"
                ) from e
            if self._stager is not None:  # AsyncSaveResponse: staging and upload complete separately
                self._staging, upload = response.staging_completion, response.upload_completion
            else:
                upload = response
            self._pending = self._finisher.submit(self._finish_async, upload, *finish)
            logger.info(
                "checkpoint step %d: training blocked %.2f s, upload continues in the background",
                step,
                time.perf_counter() - t0,
            )
        for opt in fresh_optimizers:
            # get_optimizer_state_dict initialised the state of a never-stepped optimizer (a zero-lr
            # step): drop it again so saving at step 0 does not change the training that follows.
            opt.state.clear()

    def _renew_spent_stager(self) -> None:
        """Replace a stager that cannot stage again (the previous save's staging is over: maybe_save waited).

        torch 2.11's DefaultStager closes its StateDictStager at the end of every staging, which empties
        the copy dispatch table: the next save's staging failed with KeyError(<class 'type'>), so a job
        died at its second checkpoint. torch 2.13's keeps it, and its pinned buffers, across saves. (A
        private attribute: tests/unit/test_checkpoint.py checks that this torch still has it.)
        """
        inner = getattr(self._stager, "_state_dict_stager", None)
        if inner is None or getattr(inner, "_deepcopy_dispatch", None) != {}:
            return
        self._stager.close()
        self._stager = self._make_stager()
        if not self._stager_renewed:
            self._stager_renewed = True
            logger.info(
                "checkpoint.async_mode=async_with_pinned_mem: torch %s's stager is spent after each save, so every "
                "save stages into newly pinned host buffers (torch 2.13 reuses them)", torch.__version__,
            )

    def _make_stager(self) -> Any:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        # Pinned host buffers (kept across saves where torch allows: _renew_spent_stager), filled on a side
        # CUDA stream in a background thread: the device-to-host copy overlaps the next forward/backward.
        # Shared memory only serves the process-based checkpointer, which we do not use (it needs
        # MASTER_ADDR/PORT and a re-import).
        return DefaultStager(
            StagingOptions(
                use_pinned_memory=True, use_shared_memory=False, use_async_staging=True, use_non_blocking_copy=True
            )
        )

    def _make_writer(self, path: Path) -> dcp.FileSystemWriter:
        # A method so tests can inject a failing writer (a crash mid-save).
        return dcp.FileSystemWriter(str(path), single_file_per_rank=True, sync_files=True)

    def _model_state(self, dtype: torch.dtype | None = None) -> tuple[dict[str, Any], list[list[str]]]:
        """Merged model state dict over the parts, and each part's keys."""
        merged: dict[str, Any] = {}
        keys = []
        for part in self.model_parts:
            sd = get_model_state_dict(part)
            keys.append(list(sd))
            for k, v in sd.items():
                v = _plain(v)
                merged[k] = v.to(dtype) if dtype is not None and torch.is_tensor(v) and v.is_floating_point() else v
        return merged, keys

    def _optim_state(self) -> tuple[dict[str, Any], list[list[str]]]:
        merged: dict[str, Any] = {}
        keys = []
        for part, opt in zip(self.model_parts, self.optimizers):
            sd = get_optimizer_state_dict(part, opt, options=_FLAT_OPTIM)
            keys.append(list(sd))
            merged.update({k: _plain(v) for k, v in sd.items()})
        return merged, keys

    def _state_for_save(
        self, *, model_only: bool, dtype: torch.dtype | None
    ) -> tuple[dict[str, Any], list[torch.optim.Optimizer]]:
        if model_only:
            return {"model": self._model_state(dtype)[0]}, []
        state: dict[str, Any] = {"model": self._model_state()[0]}
        fresh = [opt for opt in self.optimizers if not opt.state]
        if len(fresh) < len(self.optimizers):
            # A never-stepped optimizer has no state worth saving: leaving it out (step 0, the seed
            # checkpoint) makes a resume start with a fresh optimizer, exactly like the original run.
            state["optimizer"] = self._optim_state()[0]
        else:
            fresh = []
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = pickle.dumps(self.lr_scheduler.state_dict())
        if self.dataloader is not None:
            state["dataloader"] = pickle.dumps(self.dataloader.state_dict())
        ts = self.train_state.state_dict()
        digest = hashlib.sha256(state.get("dataloader", b"")).hexdigest()
        gathered = self._all_gather((ts.pop("rng", None), digest))
        if len({d for _, d in gathered}) > 1:
            # DCP keeps one copy of a key saved by every rank: differing states would be lost silently.
            raise CheckpointError(
                "the dataloader state differs across ranks at this step: it must be the same on every rank "
                "(the stream position, not the rank's slice) to be saved once and reloaded at any DP degree"
            )
        rng_per_rank = [rng for rng, _ in gathered]  # identical on every rank -> stored once
        state["train_state"] = {
            "step": int(ts["step"]),
            "tokens_seen": int(ts["tokens_seen"]),
            "rng": pickle.dumps(rng_per_rank),
        }
        return state, fresh

    def _finish_async(self, upload: Future, *finish: Any) -> None:
        step, tmp = finish[0], finish[1]
        try:
            upload.result()
        except (Exception, CheckpointException) as e:
            note = self._discard_failed(tmp, e)
            raise CheckpointError(f"async save of step {step} into {tmp} failed: {_describe(e)}{note}") from e
        self._finish(*finish)

    def _finish(
        self, step: int, tmp: Path, contents: list[str], model_only: bool, model_dtype: str | None, t0: float
    ) -> None:
        """After every rank wrote its files: hash them (split over ranks), manifest last, publish."""
        names = self._broadcast(list_files(tmp) if self.rank == 0 else None)
        hashes = self._all_gather(hash_files(tmp, names[self.rank :: self.world_size]))
        status = None
        if self.rank == 0:
            try:
                files = {k: v for part in hashes for k, v in part.items()}
                extra = {"model_only": model_only, "model_dtype": model_dtype, "branch": self._branch,
                         "tie_word_embeddings": getattr(self.model_args, "tie_word_embeddings", None)}
                if self.tokenizer is not None:
                    extra["tokenizer"] = self.tokenizer
                manifest = build_manifest(
                    step=step, files=files, fingerprint=self.fingerprint, contents=contents, extra=extra
                )
                write_manifest(tmp, manifest)
                self._publish(tmp, step)
            except Exception as e:  # reported on every rank below
                status = (f"finishing checkpoint step {step} in {tmp} failed: {type(e).__name__}: {e}"
                          f"{disk_full_note(self.folder, e)}")
        status = self._broadcast(status)
        if status:
            self._discard_failed(tmp)
            raise CheckpointError(status)
        if self.rank == 0 and self.cfg.keep_latest_k > 0:
            self._purger.submit(self._purge, step)
        size = sum(v["size"] for part in hashes for v in part.values())
        logger.info(
            "saved checkpoint %s (%s, %.1f MB) in %.2f s",
            self.folder / f"step-{step}",
            ", ".join(contents),
            size / 1e6,
            time.perf_counter() - t0,
        )

    def _publish(self, tmp: Path, step: int) -> None:
        final = self.folder / f"step-{step}"
        with self._publish_lock:  # (a purge lists the folder and this run's publications under it)
            aside = None
            if final.exists():
                # Saving a step again (e.g. after an explicit load_step): move the old one aside first, so
                # step-N is always either the old or the new complete checkpoint.
                aside = self.folder / f"step-{step}.old-{self._nonce}-{self._saves}"
                logger.warning("replacing existing checkpoint %s", final)
                os.rename(final, aside)
            try:
                os.rename(tmp, final)
            except OSError:
                if aside is not None:
                    os.rename(aside, final)  # the old one back: never no step-N at all
                raise
            self._published.append(step)
        if aside is not None:
            self._purger.submit(_rmtree_quietly, aside)
        fsync_dir(self.folder)

    def _discard_failed(self, tmp: Path, error: BaseException | None = None) -> str:
        """Rank 0, after a save failed on every rank (DCP gathers the failure, so no rank still writes):
        delete its partial folder now, not at the next save. A disk that filled up is freed at once, and the
        rerun does not find it still full. Returns disk_full_note for `error`, measured before the deletion
        (on the other ranks, from the error alone: rank 0 may have deleted the folder already)."""
        if self.rank != 0:
            return disk_full_note(self.folder, error) if _disk_full_errno(error) else ""
        note = disk_full_note(self.folder, error)
        if tmp.exists():
            _rmtree_quietly(tmp)
            logger.info("removed the failed save's partial folder %s", tmp)
        return note

    def _remove_partials(self) -> None:
        """Rank 0, at the start of a save (none in flight): delete leftovers of interrupted saves."""
        if not self.folder.is_dir():
            return
        for p in self.folder.iterdir():
            if is_partial(p.name):
                logger.info("removing partial checkpoint folder %s", p)
                self._purger.submit(_rmtree_quietly, p)

    def _purge(self, just_saved: int) -> None:
        """Keep the newest keep_latest_k complete checkpoints of this trajectory, up to the one just
        written (and the one checkpoint.load_step names: the same command needs it to start again, and the
        newest full-state one up to the one just written: a model-only final save is not one to continue
        training from). Checkpoints past the one just written that this run did not save belong to the
        trajectory left behind by going back (load_step): they are not counted among the newest, so they
        never push this run's own fallbacks out, and are purged."""
        with self._publish_lock:
            folders = complete_steps(self.folder)
            # What this run published from just_saved on: a purge that runs late (the purge thread was
            # busy deleting) must not delete this run's newer saves.
            order = self._published
            last = len(order) - 1 - order[::-1].index(just_saved) if just_saved in order else len(order)
            since = set(order[last:])
            published = set(order)
        steps = sorted(s for s in folders if s <= just_saved or s in published)
        keep = set(steps[-self.cfg.keep_latest_k :]) | {just_saved, self.cfg.load_step} | since
        keep.add(self._newest_full_state_before(just_saved + 1))
        steps = sorted(folders)
        for s in steps:
            if s in keep:
                continue
            path = folders[s]  # its own name: step-005 is step 5 too
            # Rename first: a crash mid-delete leaves a partial folder, never a damaged step-N.
            doomed = self.folder / f"step-{s}.del-{self._nonce}-{self._saves}"
            try:
                os.rename(path, doomed)
            except OSError as e:
                logger.warning("could not purge %s: %s", path, e)
                continue
            _rmtree_quietly(doomed)
            logger.info("purged checkpoint %s (keep_latest_k=%d%s)", path, self.cfg.keep_latest_k,
                        "; left behind by going back" if s > just_saved else "")

    def wait_for_staging(self) -> None:
        """async_with_pinned_mem: block until the last save's copy to host memory is done."""
        staging, self._staging = self._staging, None
        if staging is not None:
            staging.result()

    def wait(self) -> None:
        """Block until an in-flight async save is complete (manifest written); raise if it failed."""
        self.wait_for_staging()
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"async checkpoint save failed: {_describe(e)}") from e

    def close(self) -> None:
        """Wait for the last save, then stop the background threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            for handle in self._hook or []:
                handle.remove()
            if self._finisher is not None:
                self._finisher.shutdown(wait=True)
            self._purger.shutdown(wait=True)
            if self._stager is not None:
                self._stager.close()

    # --- Hugging Face export ----------------------------------------------------------------------

    def _check_hf_supported(self) -> Any:
        if self.model_args is None:
            return "Hugging Face import/export needs the model args: the model has no .args (pass model_args=)"
        if int(self.fingerprint.get("layout", {}).get("pp", 1)) > 1:
            return "Hugging Face import/export with pipeline parallel is not supported: use tools/checkpoint.py convert"
        return None

    def _export_hf(self, dst: Path) -> None:
        from torchtitan_like.components.hf_tokenizer import export_hf_tokenizer
        from torchtitan_like.models.llama3.state_dict_adapter import save_hf_safetensors, to_hf

        self._agree(self._check_hf_supported())
        full: dict[str, torch.Tensor] = {}
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors, on rank 0 only
        for part in self.model_parts:
            full.update(get_model_state_dict(part, options=opts))
        error = None
        if self.rank == 0:
            try:
                hf = to_hf({k: v.to(self.export_dtype) for k, v in full.items()}, self.model_args)
                save_hf_safetensors(hf, dst, args=self.model_args, special_tokens=self.special_tokens)
                if self.tokenizer_path is not None:
                    export_hf_tokenizer(self.tokenizer_path, dst, model_max_length=self.model_args.max_seq_len)
            except Exception as e:
                error = f"Hugging Face export into {dst} failed: {type(e).__name__}: {e}"
        self._agree(error)

    # --- loading ----------------------------------------------------------------------------------

    def load(self) -> int | None:
        """Resume from this run's folder, else start from initial_load_path. Returns the step resumed
        from, or None when training starts fresh (also after a model-only initial load)."""
        if self.cfg.enable:
            step = self._load_own()
            if step is not None:
                return step
        if self.cfg.initial_load_path:
            return self._load_initial(Path(self.cfg.initial_load_path))
        if self.cfg.load_only:  # (every rank reached this: the folder scan above is agreed)
            raise _nothing_to_load(self.folder)
        return None

    def _verify_everywhere(self, path: Path) -> tuple[dict[str, Any] | None, str | None]:
        """Verify a step folder with the hashing split over ranks; every rank gets the same answer."""
        manifest, errors = None, []
        try:
            manifest = read_manifest(path)
        except CheckpointError as e:
            errors = [str(e)]
        if manifest is not None:
            errors = verify_errors(path, manifest, shard=(self.rank, self.world_size))
        everyone = [e for errs in self._all_gather(errors) for e in errs]
        if not everyone:
            return manifest, None
        more = f" (and {len(everyone) - 1} more)" if len(everyone) > 1 else ""
        return None, everyone[0] + more

    def _recover_replaced(self) -> dict[int, Path]:
        """Rank 0: a run killed between the two renames of a replace left `step-N.old-*` (the old,
        complete checkpoint) and no step-N: put it back, if it verifies, before looking for checkpoints.
        load_only renames nothing (the loaded run's storage may be read-only, or still in use): such a
        folder is read where it lies. Returns the steps read in place (the same on every rank)."""
        error, in_place = None, {}
        if self.rank == 0 and self.folder.is_dir():
            try:
                present = step_folders(self.folder)
                for p in sorted(self.folder.iterdir(), key=lambda p: p.name):
                    m = ASIDE_RE.match(p.name)
                    step = int(m.group(1)) if m else None
                    if step is None or step in present or step in in_place or not (p / MANIFEST).is_file():
                        continue
                    if verify_errors(p, read_manifest(p)):
                        continue  # (half deleted: it stays a partial folder, removed at the next save)
                    if self.cfg.load_only:
                        in_place[step] = str(p)
                        logger.warning(
                            "%s holds step %d (a replace of it was interrupted); load_only reads it there and "
                            "renames nothing (the next run that saves into %s puts it back as step-%d)",
                            p, step, self.folder, step,
                        )
                        continue
                    final = self.folder / f"step-{step}"
                    os.rename(p, final)
                    fsync_dir(self.folder)
                    present[step] = final
                    logger.warning("restored %s from %s (a replace of it was interrupted)", final, p.name)
            except (OSError, CheckpointError) as e:
                error = f"restoring an interrupted replace in {self.folder} failed: {e}"
        self._agree(error)
        return {step: Path(p) for step, p in self._broadcast(in_place).items()}

    def _load_own(self) -> int | None:
        in_place = self._recover_replaced()
        folders = step_folders(self.folder) | in_place
        if self.cfg.load_step >= 0:
            step = self.cfg.load_step
            # A restart of a training command that went back to load_step continues that run; reading
            # (load_only: an evaluation, tools/generate.py) takes the step it names.
            resumed = None if self.cfg.load_only else self._continue_branch(folders, step)
            if resumed is not None:
                return resumed
            if step not in folders:
                raise _missing_load_step(self.folder, step)
            manifest, error = self._verify_everywhere(folders[step])
            if error:
                raise CheckpointError(f"checkpoint.load_step={step}: {error}")
            newer = sorted(s for s in folders if s > step)
            if newer and self.cfg.load_only:
                logger.info("checkpoint.load_step=%d with load_only: the newer checkpoints %s stay", step, newer)
            elif newer:
                logger.warning(
                    "checkpoint.load_step=%d: going back from %s; the newer checkpoints %s belong to the "
                    "trajectory left behind and are %s (keep load_step in the command: a restart then continues "
                    "this run, not the old one)",
                    step, f"step-{newer[-1]}", newer,
                    f"purged at this run's first save (keep_latest_k={self.cfg.keep_latest_k})"
                    if self.cfg.keep_latest_k > 0 else "replaced as this run saves those steps",
                )
            self._branch = step
            return self._load_step(folders[step], manifest)
        skipped = []
        for step in sorted(folders, reverse=True):
            manifest, error = self._verify_everywhere(folders[step])
            if error:
                logger.warning("skipping checkpoint step-%d: %s; falling back to the previous checkpoint", step, error)
                skipped.append(error)
                continue
            return self._load_step(folders[step], manifest)
        if skipped:
            raise CheckpointError(
                f"no usable checkpoint in {self.folder}: every step folder is damaged or incomplete "
                f"(latest: {skipped[0]}); move them out of {self.folder} to start over, or point "
                "checkpoint.initial_load_path at a good copy"
            )
        return None

    def _continue_branch(self, folders: dict[int, Path], load_step: int) -> int | None:
        """A restart of a command with load_step=K: resume from the newest complete checkpoint that a run
        started from K saved (its manifest's "branch"), if there is one; None to load K itself."""
        candidates = None
        if self.rank == 0:  # one reading of the manifests, so every rank takes the same path below
            candidates = []
            for step in sorted((s for s in folders if s > load_step), reverse=True):
                try:
                    if read_manifest(folders[step]).get("branch") == load_step:
                        candidates.append(step)
                except CheckpointError:
                    continue
        for step in self._broadcast(candidates):
            manifest, error = self._verify_everywhere(folders[step])
            if error:
                logger.warning("skipping checkpoint step-%d: %s; falling back to the previous checkpoint", step, error)
                continue
            logger.warning(
                "checkpoint.load_step=%d: this command already trained on from it; resuming from step-%d, "
                "the newest checkpoint of that run (to go back to step-%d once more, move the checkpoints "
                "after it out of %s)",
                load_step, step, load_step, self.folder,
            )
            self._branch = load_step
            return self._load_step(folders[step], manifest)
        return None

    def _newest_full_state_before(self, step: int) -> int | None:
        """The newest complete checkpoint before `step` that holds more than the model."""
        for s, path in sorted(complete_steps(self.folder).items(), reverse=True):
            try:
                if s < step and not read_manifest(path).get("model_only"):
                    return s
            except CheckpointError:
                continue
        return None

    def _check_tokenizer(self, path: Path, manifest: dict[str, Any], *, initial: bool) -> None:
        """Refuse (or, for a reader, warn about) a checkpoint trained with another tokenizer than the run's: the
        same ids would mean other text. A checkpoint that records none (older ones, synthetic data) loads as before.
        `initial`: checkpoint.initial_load_path; its model-only load is how a run changes tokenizer on purpose.
        Collective: each rank reads its own tokenizer file (one node's copy may differ), and all raise together."""
        self._agree(self._tokenizer_error(path, manifest, initial=initial))

    def _tokenizer_error(self, path: Path, manifest: dict[str, Any], *, initial: bool) -> str | None:
        """_check_tokenizer's verdict on this rank: the error, or None (after any warning)."""
        saved = manifest.get("tokenizer")
        if self.tokenizer is None or not isinstance(saved, dict):
            return None
        if saved.get("fingerprint") == self.tokenizer["fingerprint"]:
            return None
        if initial and self.cfg.initial_load_model_only:
            logger.warning(
                "checkpoint.initial_load_path=%s was trained with another tokenizer (%s) than %s gives (%s): starting "
                "from its weights alone, with this run's tokenizer", path, describe_identity(saved),
                self.tokenizer_key, describe_identity(self.tokenizer),
            )
            return None
        what = f"{path} was trained with the tokenizer {describe_identity(saved)}, but {self.tokenizer_key} gives "
        what += f"another: {describe_identity(self.tokenizer)}"
        if self.tokenizer_mismatch == "warn":
            logger.warning("%s; the same ids mean other text (set %s to the checkpoint's tokenizer)", what,
                           self.tokenizer_key)
            return None
        if initial:
            return (
                f"{what}: its data position would read other tokens; set {self.tokenizer_key} to the checkpoint's "
                "tokenizer, or checkpoint.initial_load_model_only=true to start from its weights alone with this one"
            )
        return (
            f"{what}: resuming would train on other tokens; set {self.tokenizer_key} to the checkpoint's tokenizer, or, "
            f"to change tokenizer on purpose, start a new run (another job.dump_folder) from its weights with "
            f"checkpoint.initial_load_path={path}"
        )

    def _load_step(self, path: Path, manifest: dict[str, Any]) -> int:
        step = int(manifest["step"])
        self._check_tokenizer(path, manifest, initial=False)
        self.loaded_from = path
        if self._branch is None:
            self._branch = manifest.get("branch")  # resuming a run that started from a load_step: still that run
        if manifest.get("config_hash") != self.fingerprint.get("config_hash"):
            # (Expected under load_only, which is itself a change of config: said, not warned.)
            (logger.info if self.cfg.load_only else logger.warning)(
                "%s was saved with a different config (hash %s, now %s): %s anyway",
                path,
                manifest.get("config_hash"),
                self.fingerprint.get("config_hash"),
                "loading" if self.cfg.load_only else "resuming",
            )
        if manifest.get("layout") != self.fingerprint.get("layout") or manifest.get("world_size") != self.world_size:
            logger.info(
                "resharding %s: saved with layout %s on %s ranks, loading into %s on %s",
                path,
                manifest.get("layout"),
                manifest.get("world_size"),
                self.fingerprint.get("layout"),
                self.world_size,
            )
        loaded = self._load_components(path, set(COMPONENTS))
        missing = [c for c in COMPONENTS if c not in loaded and c not in self.cfg.exclude_from_loading and self._has(c)]
        if missing and step > 0:
            hint = ""
            full = self._newest_full_state_before(step) if self.cfg.load_step < 0 else None
            if full is not None:
                # E.g. a finished run (model-only final export) continued with more training.steps: the
                # data would start again from the beginning and the optimizer from scratch.
                hint = f"; step-{full} holds the full state: set checkpoint.load_step={full} to continue from it exactly"
            logger.warning("%s holds no %s (a model-only save): those start fresh%s", path, ", ".join(missing), hint)
        if "train_state" not in loaded:
            self.train_state.step = step
        return step

    def _load_initial(self, path: Path) -> int | None:
        # (exclude_from_loading with "model" is refused with initial_load_path: check_checkpoint_config.)
        self.loaded_from = path
        if self.cfg.initial_load_in_hf:
            self._load_hf(path)
            return None
        check_initial_load(self.cfg, self.model_args)
        if is_flat_model_layout(path):
            return self._load_torchtitan(path)
        if (path / MANIFEST).is_file():
            manifest, error = self._verify_everywhere(path)
            if error:
                raise CheckpointError(f"checkpoint.initial_load_path: {error}")
            self._check_tokenizer(path, manifest, initial=True)
        else:
            logger.warning("%s has no %s: loading it without an integrity check", path, MANIFEST)
        wanted = {"model"} if self.cfg.initial_load_model_only else set(COMPONENTS)
        loaded = self._load_components(path, wanted)
        if "model" not in loaded:
            raise CheckpointError(f"checkpoint.initial_load_path={path} holds no model weights")
        missing = [c for c in sorted(wanted) if c not in loaded and c not in self.cfg.exclude_from_loading
                   and self._has(c)]
        if not self.cfg.initial_load_model_only and missing:
            # initial_load_model_only=false asked for the whole state: say what was not there.
            logger.warning("checkpoint.initial_load_path=%s holds no %s (a model-only save?): those start fresh",
                           path, ", ".join(missing))
        return self.train_state.step if "train_state" in loaded else None

    def _load_torchtitan(self, path: Path) -> int | None:
        """A checkpoint in torchtitan's layout (0.2.2's checkpoint manager): its model keys at the top level,
        as the model's own names; with initial_load_model_only=false also "optimizer" (the same flattened
        per-parameter state as ours), "lr_scheduler" (LambdaLR's state, field by field) and "train_state"
        (step, ntokens_seen). Its dataloader state is in its own format and never read. Returns the step
        it continues from (None after the weights alone)."""
        t0 = time.perf_counter()  # (check_initial_load refused what cannot load: a tied model)
        self._check_no_foreign_weights(path, prefix="")
        saved = dcp_keys(path)
        present = {k.split(".", 1)[0] for k in saved}
        wanted = set() if self.cfg.initial_load_model_only else {
            c for c in ("optimizer", "lr_scheduler", "train_state")
            if c in present and c not in self.cfg.exclude_from_loading and self._has(c)
        }
        state, keys = self._model_state()
        optim_keys: list[list[str]] = []
        if "optimizer" in wanted:
            state["optimizer"], optim_keys = self._optim_state()
        if "lr_scheduler" in wanted:  # placeholders: DCP replaces non-tensor values
            state["lr_scheduler"] = {k.split(".", 1)[1]: b"" for k in saved if k.startswith("lr_scheduler.")}
        if "train_state" in wanted:
            state["train_state"] = {"step": 0, "ntokens_seen": 0}
        loaded = ", ".join(["the model weights", *sorted(wanted)])
        logger.warning("%s: torchtitan's layout (model weights at the top level); loading %s without an integrity "
                       "check", path, loaded)
        self._dcp_load(state, path, what=loaded)
        for part, part_keys in zip(self.model_parts, keys):
            set_model_state_dict(part, {k: state[k] for k in part_keys})
        for part, opt, part_keys in zip(self.model_parts, self.optimizers, optim_keys):
            set_optimizer_state_dict(part, opt, {k: state["optimizer"][k] for k in part_keys}, options=_FLAT_OPTIM)
        if "lr_scheduler" in wanted:
            # DCP drops LambdaLR's lr_lambdas (a list of empty dicts: no leaf to save); they hold nothing here.
            self.lr_scheduler.load_state_dict({"lr_lambdas": [None], **state["lr_scheduler"]})
        if "train_state" in wanted:
            ts = state["train_state"]
            self.train_state.load_state_dict({"step": ts["step"], "tokens_seen": ts["ntokens_seen"]})
        logger.info("loaded %s of %s in %.1f s", loaded, path, time.perf_counter() - t0)
        if self.cfg.initial_load_model_only:
            return None
        missing = [c for c in ("optimizer", "lr_scheduler", "train_state")
                   if c not in present and c not in self.cfg.exclude_from_loading and self._has(c)]
        if missing:
            # initial_load_model_only=false asked for the whole state: say what was not there.
            logger.warning("checkpoint.initial_load_path=%s holds no %s (a model-only save, such as torchtitan's last "
                           "step?): those start fresh", path, ", ".join(missing))
        if "dataloader" in present and "dataloader" not in self.cfg.exclude_from_loading:
            logger.warning(
                "%s: torchtitan's dataloader state is in its own format: the data starts from its beginning, not "
                "where that run left off (set checkpoint.exclude_from_loading = [\"dataloader\"] to say so)", path,
            )
        return self.train_state.step if "train_state" in wanted else None

    def _dcp_load(self, state: dict[str, Any], path: Path, *, what: str) -> None:
        """dcp.load into `state` (in place) over the job's checkpoint group; any failure is a CheckpointError."""
        pg_kwargs = {"process_group": self._pg} if self._dist else {"no_dist": True}
        try:
            with self._quiet():
                dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)), **pg_kwargs)
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"loading {what} from {path} failed: {_describe(e)}") from e

    def _has(self, component: str) -> bool:
        if not self.optimizers:  # a manager that reads the weights alone
            return component == "model"
        return {"lr_scheduler": self.lr_scheduler, "dataloader": self.dataloader}.get(component, True) is not None

    def _load_components(self, path: Path, wanted: set[str]) -> list[str]:
        t0 = time.perf_counter()
        available = dcp_contents(path)
        comps = [
            c
            for c in COMPONENTS
            if c in wanted and c in available and c not in self.cfg.exclude_from_loading and self._has(c)
        ]
        state: dict[str, Any] = {}
        model_keys = optim_keys = []
        if "model" in comps:
            self._check_no_foreign_weights(path)
            state["model"], model_keys = self._model_state()
        if "optimizer" in comps:
            state["optimizer"], optim_keys = self._optim_state()
        for c in ("lr_scheduler", "dataloader"):
            if c in comps:
                state[c] = b""  # placeholders: DCP replaces non-tensor values
        if "train_state" in comps:
            state["train_state"] = {"step": 0, "tokens_seen": 0, "rng": b""}
        self._dcp_load(state, path, what=", ".join(comps))

        if "model" in comps:
            for part, keys in zip(self.model_parts, model_keys):
                set_model_state_dict(part, {k: state["model"][k] for k in keys})
        if "optimizer" in comps:
            for part, opt, keys in zip(self.model_parts, self.optimizers, optim_keys):
                set_optimizer_state_dict(part, opt, {k: state["optimizer"][k] for k in keys}, options=_FLAT_OPTIM)
        if "lr_scheduler" in comps:
            self.lr_scheduler.load_state_dict(pickle.loads(state["lr_scheduler"]))
        if "dataloader" in comps:
            self.dataloader.load_state_dict(pickle.loads(state["dataloader"]))
        if "train_state" in comps:
            ts = state["train_state"]
            rngs = pickle.loads(ts["rng"])
            if len(rngs) != self.world_size:
                logger.info(
                    "RNG states were saved on %d ranks, now %d: every rank takes rank 0's", len(rngs), self.world_size
                )
            rng = rngs[self.rank] if len(rngs) == self.world_size else rngs[0]
            self.train_state.load_state_dict({"step": ts["step"], "tokens_seen": ts["tokens_seen"], "rng": rng})
        logger.info("loaded %s from %s in %.2f s", ", ".join(comps) or "nothing", path, time.perf_counter() - t0)
        return comps

    def _check_no_foreign_weights(self, path: Path, prefix: str = "model.") -> None:
        """Refuse a checkpoint with model tensors this model does not have (a deeper or different
        flavor): DCP reads only the keys asked for, so they would be dropped without a word; and one
        that lacks tensors this model has (a shallower flavor), naming them. The whole
        model's names come from a meta-device build (a pipeline rank holds only its stages). `prefix`:
        where the model's keys are ("model." here; "" in torchtitan's flat layout, beside its other states
        and its RoPE table)."""
        from torchtitan_like.models.llama3.args import TransformerArgs
        from torchtitan_like.models.llama3.model import Transformer

        if not isinstance(self.model_args, TransformerArgs):
            return
        with torch.device("meta"):
            expected = set(Transformer(self.model_args).state_dict())
        keys = dcp_keys(path)
        names = [k[len(prefix):] for k in keys if k.startswith(prefix)] if prefix else flat_model_keys(keys)
        extra = sorted(k for k in names if k not in expected)
        if extra:
            raise CheckpointError(
                f"{path} holds model weights that this model.flavor does not have: {extra[:5]}"
                f"{' ...' if len(extra) > 5 else ''} (saved from a deeper or different model? choose the matching "
                "model.flavor, and model.n_layers if that run set it)"
            )
        # (DCP would stop at the first missing key with "Missing key in checkpoint state_dict".)
        missing = sorted(expected - set(names))
        if missing:
            raise CheckpointError(
                f"{path} lacks model weights that this model.flavor has: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''} (saved from a shallower or different model? choose the "
                "matching model.flavor, and model.n_layers if that run set it)"
            )
        # A tied model's state dict names its one matrix twice (tok_embeddings and output): an untied
        # checkpoint's two matrices would both load into it, the output head's last, without a word.
        try:
            saved_tied = read_manifest(path).get("tie_word_embeddings") if (path / MANIFEST).is_file() else None
        except CheckpointError:
            saved_tied = None  # (verified before loading: a damaged manifest is reported there)
        if self.model_args.tie_word_embeddings and saved_tied is False:
            raise CheckpointError(
                f"{path} was saved from a model with an output head of its own (tie_word_embeddings=false), but this "
                "model.flavor ties the output head to the token embeddings: loading would overwrite the embeddings "
                "with the output head; choose the untied flavor it was trained with"
            )

    def _load_hf(self, path: Path) -> None:
        from torchtitan_like.models.llama3.state_dict_adapter import from_hf, load_hf_safetensors

        t0 = time.perf_counter()
        self._agree(self._check_hf_supported())
        # One reader, then a broadcast: only rank 0 holds the full weights in host memory.
        broadcast = self._dist
        full: dict[str, torch.Tensor] = {}
        error = None
        targets = [get_model_state_dict(part) for part in self.model_parts]
        if self.rank == 0 or not broadcast:
            try:
                check_initial_load(self.cfg, self.model_args)  # the files and config.json, as the dry run checks
                full = from_hf(load_hf_safetensors(path), self.model_args)
                wanted = {k for t in targets for k in t}
                if wanted - set(full) == {"output.weight"} and not self.model_args.tie_word_embeddings:
                    raise CheckpointError(
                        f"{path} has no lm_head.weight (tied embeddings), but this model.flavor has an output head "
                        "of its own (tie_word_embeddings=false): choose the tied flavor it was trained with"
                    )
                if wanted - set(full):
                    raise CheckpointError(f"{path} lacks {sorted(wanted - set(full))[:5]} (model.flavor mismatch?)")
                # (HF loading is refused under PP: these parts are the whole model.) Without a config.json to
                # compare, extra tensors are the only sign of a bigger model: never drop them silently.
                extra = sorted(set(full) - wanted)
                if extra:
                    raise CheckpointError(
                        f"{path} holds tensors that this model.flavor does not have: {extra[:5]}"
                        f"{' ...' if len(extra) > 5 else ''} (a deeper or different model? choose the matching "
                        "model.flavor)"
                    )
                # Without a config.json the shapes are the only sign of another width or vocabulary: name them
                # here (set_model_state_dict would raise a multi-line RuntimeError).
                shapes = {k: tuple(v.shape) for t in targets for k, v in t.items()}
                wrong = sorted(k for k in shapes if tuple(full[k].shape) != shapes[k])
                if wrong:
                    raise CheckpointError(
                        f"{path}: {wrong[0]} has shape {tuple(full[wrong[0]].shape)}, this model.flavor has "
                        f"{shapes[wrong[0]]}{f' ({len(wrong) - 1} more differ)' if len(wrong) > 1 else ''}: choose "
                        "the model.flavor (and model.n_layers) these weights were trained as"
                    )
            except CheckpointError as e:
                error = str(e)
        self._agree(error)
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast, strict=True)
        for part, target in zip(self.model_parts, targets):
            sub = {k: full[k].to(target[k].dtype) for k in target if k in full}
            set_model_state_dict(part, sub, options=opts)
        logger.info("loaded Hugging Face weights from %s in %.2f s", path, time.perf_counter() - t0)


def _plain(value: Any) -> Any:
    """A tensor wrapped in a subclass that holds a plain `_tensor` (torchao's weight under FSDP float8
    all-gather, WeightWithDynamicFloat8CastTensor), as that plain tensor, inside its DTensor if any. DCP
    pickles a subclass's class into the files, and reading it back needs that class imported and
    allow-listed: a checkpoint of a float8 run could not be loaded without float8 (a bf16 fine-tune, the
    convert tool). Plain tensors load anywhere; loading into the subclass again copies into it."""
    if not torch.is_tensor(value):
        return value
    local = value._local_tensor if isinstance(value, DTensor) else value
    inner = getattr(local, "_tensor", None)
    if type(local) in (torch.Tensor, torch.nn.Parameter) or not isinstance(inner, torch.Tensor):
        return value
    if isinstance(value, DTensor):
        return DTensor.from_local(inner, value.device_mesh, value.placements, run_check=False, shape=value.shape,
                                  stride=value.stride())
    return inner


def _describe(e: BaseException) -> str:
    """One line for an exception; DCP's CheckpointException (a BaseException) carries one per rank."""
    if isinstance(e, CheckpointException):
        return "; ".join(f"rank {r}: {type(exc).__name__}: {exc}" for r, (exc, _) in sorted(e.failures.items()))
    return f"{type(e).__name__}: {e}"


def check_checkpoint_config(cfg: Checkpoint, *, pp: int = 1) -> None:
    """The [checkpoint] rules that need no device and no file (check_job runs them before any build;
    `pp`: parallelism.pipeline_parallel_degree)."""
    bad = [c for c in cfg.exclude_from_loading if c not in COMPONENTS]
    if bad:
        raise ConfigError(
            f"checkpoint.exclude_from_loading={cfg.exclude_from_loading}: {bad} not among {', '.join(COMPONENTS)}"
        )
    if cfg.export_dtype not in EXPORT_DTYPES:
        raise ConfigError(f"checkpoint.export_dtype={cfg.export_dtype!r} must be one of {', '.join(EXPORT_DTYPES)}")
    if cfg.initial_load_path and "model" in cfg.exclude_from_loading:
        # (Config alone decides it: the dry run refuses it as the real run does.)
        raise ConfigError(
            f"checkpoint.initial_load_path={cfg.initial_load_path}: checkpoint.exclude_from_loading lists \"model\", "
            "so its weights would not be loaded; remove \"model\" from exclude_from_loading or unset initial_load_path"
        )
    if cfg.keep_latest_k < 0:
        raise ConfigError(f"checkpoint.keep_latest_k={cfg.keep_latest_k} must be >= 0 (0 keeps every checkpoint)")
    if cfg.load_step >= 0 and not cfg.enable:
        # It would be silently ignored: without checkpointing the run never reads its checkpoint folder.
        raise ConfigError(
            f"checkpoint.load_step={cfg.load_step} needs checkpoint.enable=true (it loads step-{cfg.load_step} of "
            "this run's checkpoint folder); to start from another run's weights use checkpoint.initial_load_path"
        )
    hf = [k for k in ("initial_load_in_hf", "last_save_in_hf") if getattr(cfg, k)]
    if pp > 1 and hf:
        # Refused at start, not when the last save of a long run reaches the export.
        how = (
            "convert the Hugging Face folder into a DCP checkpoint first (tools/checkpoint.py convert HF_FOLDER "
            "DCP_FOLDER --hf --flavor F) and load that with checkpoint.initial_load_path"
            if hf[0] == "initial_load_in_hf" else
            "export a saved DCP checkpoint afterwards (tools/checkpoint.py convert STEP_FOLDER OUT_FOLDER --hf --flavor F)"
        )
        raise ConfigError(
            f"checkpoint.{hf[0]}=true with parallelism.pipeline_parallel_degree={pp}: Hugging Face import/export "
            f"is not supported under pipeline parallel; set checkpoint.{hf[0]}=false and {how}"
        )


def flat_model_keys(keys: Iterable[str]) -> list[str]:
    """The model's keys among a flat-layout checkpoint's (is_flat_model_layout): all but its other states
    and the RoPE table an older torchtitan model kept as a persistent buffer."""
    return [k for k in keys if k.split(".", 1)[0] not in (*COMPONENTS, "freqs_cis")]


def is_flat_model_layout(path: Path) -> bool:
    """A DCP checkpoint whose model keys are at the top level (tok_embeddings.weight, layers.0...), as
    torchtitan saves them, rather than under "model." as here."""
    if not (path / ".metadata").is_file() or (path / MANIFEST).is_file():
        return False
    names = dcp_contents(path)
    return "model" not in names and bool(names & {"tok_embeddings", "layers", "norm", "output"})


def check_initial_load(cfg: Checkpoint, model_args: Any) -> None:
    """What can be checked of checkpoint.initial_load_path without reading weights (the dry run runs
    it; loading runs the same checks): the folder is a DCP checkpoint, or with initial_load_in_hf the
    safetensors files are there and config.json, if any, describes `model_args`."""
    if not cfg.initial_load_path:
        return
    path = Path(cfg.initial_load_path)
    if cfg.initial_load_in_hf:
        from torchtitan_like.models.llama3.state_dict_adapter import HF_CONFIG, check_hf_config, hf_files, read_hf_config

        hf_files(path)
        config = read_hf_config(path)
        if config is not None:
            where = path / HF_CONFIG if path.is_dir() else path.parent / HF_CONFIG
            check_hf_config(config, model_args, where=str(where))
        return
    if not (path / MANIFEST).is_file() and not (path / ".metadata").is_file():
        raise CheckpointError(
            f"checkpoint.initial_load_path={path} is not a DCP checkpoint ({path / '.metadata'} is missing); "
            f"for Hugging Face safetensors set checkpoint.initial_load_in_hf=true"
        )
    if is_flat_model_layout(path):
        if getattr(model_args, "tie_word_embeddings", False):
            raise CheckpointError(
                f"checkpoint.initial_load_path={path} (torchtitan's layout) into a model.flavor with tied embeddings: "
                "torchtitan's Llama 3 models have their own output head, which would overwrite the embeddings; "
                "choose an untied flavor"
            )


def _nothing_to_load(folder: Path) -> ConfigError:
    return ConfigError(
        f"checkpoint.load_only=true, but there is nothing to load: {folder} holds no complete "
        "checkpoint and checkpoint.initial_load_path is unset (a run that never saves would start from "
        "scratch); point job.dump_folder / checkpoint.folder at the run to load, or set initial_load_path"
    )


def check_load_only_source(cfg: Checkpoint, folder: Path) -> None:
    """What the dry run can tell of a load_only run without reading a checkpoint: it has one to load (a step
    folder, or one set aside by an interrupted replace, in `folder`, else checkpoint.initial_load_path), as
    CheckpointManager.load requires."""
    if not cfg.load_only or cfg.initial_load_path:
        return
    if step_folders(folder) or (folder.is_dir() and any(ASIDE_RE.match(p.name) for p in folder.iterdir())):
        return
    raise _nothing_to_load(folder)


def _missing_load_step(folder: Path, step: int) -> CheckpointError:
    have = sorted(complete_steps(folder))
    return CheckpointError(
        f"checkpoint.load_step={step}: {folder / f'step-{step}'} does not exist "
        f"(complete checkpoints: {have or 'none'}); use load_step=-1 for the latest"
    )


def check_load_step_source(cfg: Checkpoint, folder: Path) -> None:
    """What the dry run can tell of checkpoint.load_step=K without reading a checkpoint: `folder` holds step-K
    (or one set aside by an interrupted replace), or, for a training run, a checkpoint that a run from K saved
    (a restart resumes that one), as CheckpointManager.load requires. Whether it is complete is checked when
    it is loaded."""
    if not cfg.enable or cfg.load_step < 0:
        return
    k = cfg.load_step
    if k in step_folders(folder):
        return
    if folder.is_dir() and any((m := ASIDE_RE.match(p.name)) and int(m.group(1)) == k for p in folder.iterdir()):
        return
    if not cfg.load_only:
        for step, path in step_folders(folder).items():
            try:
                if step > k and read_manifest(path).get("branch") == k:
                    return
            except CheckpointError:
                continue
    raise _missing_load_step(folder, k)


def check_async_device(cfg: Checkpoint, *, device_type: str) -> None:
    """async_with_pinned_mem needs the job to run on CUDA (checked by the dry run too, for its device)."""
    if cfg.enable and not cfg.load_only and cfg.async_mode == "async_with_pinned_mem" and device_type != "cuda":
        raise ConfigError(
            "checkpoint.async_mode='async_with_pinned_mem' needs CUDA: it stages GPU tensors into pinned host memory "
            "on a side stream, and no CUDA device is available here; use async_mode='async' (background save from a "
            "plain host copy) or 'disabled'"
        )
