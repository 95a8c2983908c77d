"""The training loop: batch -> forward/backward (accumulated) -> clip -> step -> metrics.

Build order (see STYLE.md): validate the config against the world and the model, build the model on
meta, parallelize it, materialize and initialize it, then optimizer, LR schedule and data.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from torchtitan_like.components.loss import (
    IGNORE_INDEX,
    chunked_output_loss,
    cross_entropy_sum,
    gathered,
    mask_after_eos,
    model_token_loss,
)
from torchtitan_like.components.lr_scheduler import build_lr_schedulers
from torchtitan_like.components.manifest import step_folders
from torchtitan_like.components.metrics import MetricsLogger, RemainingTime
from torchtitan_like.components.checkpoint import (
    CheckpointManager,
    TrainState,
    check_async_device,
    check_checkpoint_config,
    check_initial_load,
    check_load_only_source,
    check_load_step_source,
)
from torchtitan_like.components.float8 import build_float8_converter
from torchtitan_like.components.flops import model_flops_per_token, peak_tflops
from torchtitan_like.components.optimizer import build_optimizers, check_no_weight_decay, check_optimizer
from torchtitan_like.components.run_lock import RunLock
from torchtitan_like.components.profiling import check_memory_snapshot, maybe_enable_memory_snapshot, maybe_enable_profiling
from torchtitan_like.components.tokenizer import build_tokenizer, check_vocab, tokenizer_key
from torchtitan_like.components.validation import (
    HeldOutEmbeddedSource,
    Validator,
    build_validation_dataset,
    check_layout,
)
from torchtitan_like.config.loader import config_hash, to_toml
from torchtitan_like.config.schema import Debug, JobConfig
from torchtitan_like.config.validate import ignored_settings
from torchtitan_like.data.loader import build_dataloader, grad_accum_steps
from torchtitan_like.data.prefetch import PrefetchingLoader
from torchtitan_like.distributed.activation_checkpoint import memory_budget_context, parse_selective_option
from torchtitan_like.distributed.compile import CompileMonitor, compile_loss, separate_compile_caches
from torchtitan_like.distributed.context_parallel import context_parallel_ctx, supported_rotate_methods
from torchtitan_like.distributed.health import (
    check_collectives,
    configure_flight_recorder,
    log_ranks,
    named_meshes,
    set_pg_timeouts,
    straggler_stats,
)
from torchtitan_like.distributed.parallel_dims import ParallelDims
from torchtitan_like.distributed.pipeline import (
    Pipeline,
    PipelinePlan,
    check_schedule_backend,
    check_validation_schedule,
    log_plan,
    plan_pipeline,
    split_model,
)
from torchtitan_like.distributed.preemption import EXIT_PREEMPTED, PREEMPTION_SIGNALS, PreemptionWatcher
from torchtitan_like.distributed.stack_dump import StackDumps, stack_file
from torchtitan_like.train import EXIT_STATUS_DIR_ENV
from torchtitan_like.distributed.tensor_parallel import match_grad_placements, settle_grad_placements
from torchtitan_like.distributed.utils import clip_grad_norm_, init_distributed, local_device, param_dtype
from torchtitan_like.errors import ConfigError, TrainingError
from torchtitan_like.models import MODELS
from torchtitan_like.models.llama3.args import TransformerArgs
from torchtitan_like.models.llama3.parallelize import check_async_tp_device, check_attention_device, parallelize_llama

logger = logging.getLogger(__name__)

HISTORY_STEPS = 10_000

# The start-up collective check fails within this (or comm.init_timeout_seconds if shorter): the
# ranks have just built the mesh together, so a healthy check takes milliseconds.
COLLECTIVE_CHECK_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class CheckedJob:
    """What `check_job` resolved: the model shape, the parallel degrees and the pipeline plan."""

    model_args: TransformerArgs
    parallel_dims: ParallelDims
    pp_plan: PipelinePlan | None


def _layers_source(cfg: JobConfig) -> str:
    """The key that set the model's block count, for messages."""
    if cfg.model.n_layers is not None:
        return f"model.n_layers={cfg.model.n_layers}"
    return f"model.flavor={cfg.model.flavor!r}"


def job_model_args(cfg: JobConfig) -> TransformerArgs:
    """The model's arguments for a job: its flavor, model.n_layers, the RoPE table length (model.max_seq_len,
    else training.seq_len) and the attention settings (bos/eos ids come later, from the tokenizer)."""
    spec = MODELS[cfg.model.name]
    return replace(
        spec.args(cfg.model.flavor, n_layers=cfg.model.n_layers).with_seq_len(cfg.model.max_seq_len or cfg.training.seq_len),
        attn_type=cfg.model.attn_type, attn_mask_type=cfg.model.attn_mask_type,
    )


def check_job_device(cfg: JobConfig, device_type: str) -> None:
    """The settings a job's device type must support ("cuda" or "cpu"): raises ConfigError naming the key.
    The trainer runs it first, for its device; the planner for its hardware profile's."""
    check_memory_snapshot(cfg.profiling, torch.device(device_type))
    check_async_device(cfg.checkpoint, device_type=device_type)
    check_async_tp_device(cfg.parallelism, device_type)
    check_attention_device(cfg.model, device_type)


def check_job(cfg: JobConfig, world_size: int) -> CheckedJob:
    """Every check of a job that needs neither a process group nor a model: raises ConfigError naming
    the keys. The trainer runs it first; the planner runs it on each layout it considers."""
    model_args = job_model_args(cfg)
    if cfg.checkpoint.create_seed_checkpoint and world_size != 1:
        raise ConfigError(
            f"checkpoint.create_seed_checkpoint=true runs on one process, not {world_size}: use NGPU=1 "
            "(the seed checkpoint then loads under any layout)"
        )
    for key, at_step, rank in (("fail_rank", cfg.debug.fail_at_step, cfg.debug.fail_rank),
                               ("hang_rank", cfg.debug.hang_at_step, cfg.debug.hang_rank)):
        if at_step and rank >= world_size:
            raise ConfigError(
                f"debug.{key}={rank} is not a rank of this world of {world_size}: "
                f"use -1 (every rank) or 0..{world_size - 1}"
            )
    ac = cfg.activation_checkpoint
    every = parse_selective_option(ac.selective_ac_option) if ac.mode == "selective" else None
    if every is not None and every > model_args.n_layers:
        raise ConfigError(
            f"activation_checkpoint.selective_ac_option={ac.selective_ac_option!r} checkpoints every {every}-th block, "
            f"but the model has {model_args.n_layers} ({_layers_source(cfg)}): no block would be checkpointed; use "
            f'1..{model_args.n_layers}, "op", or mode="none"'
        )
    parallel_dims = ParallelDims.from_config(cfg.parallelism, world_size)
    parallel_dims.validate(model_args=model_args, training=cfg.training)
    check_checkpoint_config(cfg.checkpoint, pp=parallel_dims.pp)
    if parallel_dims.cp_enabled:
        rotate = cfg.parallelism.context_parallel_rotate_method
        if rotate not in supported_rotate_methods():
            raise ConfigError(
                f"parallelism.context_parallel_rotate_method={rotate!r} is not offered by torch {torch.__version__}: "
                f"use one of {', '.join(supported_rotate_methods())}"
            )
    if cfg.validation.enable:
        check_layout(
            cfg.validation, tp=parallel_dims.tp, cp=parallel_dims.cp, pp=parallel_dims.pp, dp=parallel_dims.dp_degree,
            training=cfg.training,
        )
    pp_plan = None
    if parallel_dims.pp_enabled:
        pp_plan = plan_pipeline(
            cfg.parallelism,
            n_layers=model_args.n_layers,
            local_batch_size=cfg.training.local_batch_size,
            tie_word_embeddings=model_args.tie_word_embeddings,
            compile_model=cfg.compile.enable and "model" in cfg.compile.components,
            compile_loss=cfg.compile.enable and "loss" in cfg.compile.components,
            op_ac=cfg.activation_checkpoint.mode == "selective"
            and parse_selective_option(cfg.activation_checkpoint.selective_ac_option) is None,
        )
        if cfg.validation.enable:
            check_validation_schedule(pp_plan)
    return CheckedJob(model_args=model_args, parallel_dims=parallel_dims, pp_plan=pp_plan)


def _check_held_out(train_source: Any, val_source: Any) -> None:
    """Local validation files that training reads too (data/val.jsonl inside training's data/) would be
    trained on, and val_loss would not be held out."""
    train_files, val_files = getattr(train_source, "files", None), getattr(val_source, "files", None)
    if not train_files or not val_files:
        return
    reads = {os.path.realpath(f) for f in train_files}
    shared = [f for f in val_files if os.path.realpath(f) in reads]
    if shared:
        raise ConfigError(
            f"{val_source.label} and {train_source.label} share {len(shared)} file(s), e.g. {shared[0]}: the "
            "held-out data would be trained on; point validation.dataset_path at files training does not read, or "
            "narrow training.dataset_path (a folder of training files only, or a glob)"
        )


LOAD_ONLY_FOLDER = "load_only"
"""The dump folder's subfolder for the config and metrics of a checkpoint.load_only run."""


class Trainer:
    """One training job. `train()` runs it; `close()` releases files and the process group."""

    def __init__(self, cfg: JobConfig, *, dry_run_device: str | None = None, dry_run_files: bool = True):
        """dry_run_device: build for a dry run (`torchtitan_like.dry_run`) on a fake process group that
        the caller initialized, as a job on that device type would: every config check and every model
        pass runs, on the meta device; nothing touches the hardware, and the trainer cannot train.
        `model_parts` then hold meta (D)Tensors with this rank's local shapes. dry_run_files: also open
        what the job would read first (the tokenizer, the dataset sources, checkpoint.initial_load_path's
        layout and HF config), as the real run does, without reading any weights or training data."""
        self.cfg = cfg
        self.dry_run = dry_run_device is not None
        self._run_locks: list[RunLock] = []
        self._tp_grad_hooks = False  # match_grad_placements hooked the parameters (TP without data parallel)
        recorder = None
        # Before the process groups exist. (A world of one has no peer to fall behind: its failures are not dumped.)
        if not self.dry_run and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            recorder = configure_flight_recorder(
                cfg.comm.trace_buf_size,
                self._output_folder() / cfg.comm.save_traces_folder / cfg.comm.save_traces_file_prefix,
            )
        self.rank, self.world_size = init_distributed(
            timeout_s=cfg.comm.init_timeout_seconds, cpu_backend=cfg.training.enable_cpu_offload
        )
        self.device = torch.device(dry_run_device) if dry_run_device is not None else local_device()
        if recorder and self.rank == 0:
            logger.info("%s", recorder)
        self.train_state = TrainState()
        self.history: deque[dict[str, float]] = deque(maxlen=HISTORY_STEPS)
        """The last HISTORY_STEPS steps' loss, grad norm and lr (benchmarks and tests read it; the metrics
        files keep every logged step). Bounded: a million steps would hold ~300 MB per rank."""
        self.preemption = PreemptionWatcher()
        self.stack_dumps = StackDumps(
            stack_file(self._output_folder(), self.rank, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)),
            PREEMPTION_SIGNALS,
            status_dir=os.environ.get(EXIT_STATUS_DIR_ENV),
        )
        """Every thread's Python stack at SIGTERM/SIGUSR1, to a file kept unless the run then ends cleanly."""
        self._run_ended = False
        """train() returned (finished or stopped at a step boundary): close() then drops the stack dump."""
        self.stopped_by: signal.Signals | None = None
        """The pre-emption signal the run stopped on (train.py then exits with EXIT_PREEMPTED)."""
        self.evaluate_only = False
        """Validate the loaded weights once and train nothing (load_only, with no step left to train)."""
        check_job_device(cfg, self.device.type)
        self._setup_determinism(cfg.debug.seed, cfg.debug.deterministic, warn_only=cfg.debug.deterministic_warn_only)

        # 1. Everything that can be checked without building the model, before building it.
        checked = check_job(cfg, self.world_size)
        self.model_args, self.parallel_dims, self.pp_plan = checked.model_args, checked.parallel_dims, checked.pp_plan
        ignored = ignored_settings(cfg, pp=self.parallel_dims.pp, dims=self.parallel_dims)
        if ignored:
            logger.warning("these settings have no effect in this job: %s", "; ".join(ignored))
        if self.pp_plan is not None:
            check_schedule_backend(self.pp_plan, self.device.type)
        # A dry run for GPUs on a machine without one keeps its (fake) mesh on CPU: FSDP asks the mesh's
        # device for the current device index; the shards' shapes do not depend on it.
        mesh_device = "cpu" if self.dry_run and not torch.cuda.is_available() else self.device.type
        self.parallel_dims.build_mesh(mesh_device)
        if not self.dry_run:
            # init_device_mesh makes its groups with torch's default timeout (gloo 1800 s, NCCL 600 s), not
            # the default group's: the start-up timeout holds for them too until the first step ends.
            set_pg_timeouts(self.parallel_dims, cfg.comm.init_timeout_seconds)
            meshes = named_meshes(self.parallel_dims)
            if cfg.compile.enable and meshes:
                # Before anything compiles: compiled code names its process groups (distributed/compile.py).
                tag = separate_compile_caches({d: m.get_group().group_name for d, m in meshes.items()})
                logger.info("torch.compile caches keyed by this rank's process groups (cache_key_tag %r)", tag)
        self.grad_accum = grad_accum_steps(cfg.training, self.parallel_dims.dp_degree)
        if self.dry_run:
            check_optimizer(cfg.optimizer, device_type=self.device.type)
            if dry_run_files:
                self._build_data()
                own = Path(cfg.job.dump_folder) / cfg.checkpoint.folder
                if not (cfg.checkpoint.enable and step_folders(own)):  # a resuming job never reads it
                    check_initial_load(cfg.checkpoint, self.model_args)
                check_load_only_source(cfg.checkpoint, own)
                check_load_step_source(cfg.checkpoint, own)
            self._build_model_parts()
            return
        # Before anything is written there: one run per output folder (run_lock.py).
        self._run_locks = self._lock_run_folders()
        self._build_data()
        log_ranks(self.device)
        check_collectives(
            named_meshes(self.parallel_dims), self.device,
            timeout_s=min(cfg.comm.init_timeout_seconds, COLLECTIVE_CHECK_TIMEOUT_S),
        )

        self._build_model_parts()
        self._log_model()

        # 3. Optimizer, LR schedule, loss, pipeline schedule, metrics.
        self.optimizers = build_optimizers(self.model_parts, cfg.optimizer, device_type=self.device.type)
        self.lr_scheduler = build_lr_schedulers(self.optimizers, cfg.lr_scheduler, steps=cfg.training.steps)
        self.param_dtype = param_dtype(cfg.training, self.device.type)
        self.loss_parallel = self.parallel_dims.loss_parallel_enabled
        self.loss_fn = cross_entropy_sum
        self.loss_chunk_size = cfg.training.loss_chunk_size
        if cfg.compile.enable and "loss" in cfg.compile.components:
            self.loss_fn = compile_loss(cross_entropy_sum, backend=cfg.compile.backend)
        self.pipeline: Pipeline | None = None
        self._pp_time_s = self._pp_compute_s = 0.0
        self._step_t0: float | None = None
        self._host_s = 0.0  # since the last metrics line (health.straggler_stats)
        if self.pp_plan is not None:
            pp_group = self.parallel_dims.pp_group
            assert pp_group is not None
            self.pipeline = Pipeline(
                self.pp_plan, pp_rank=self.parallel_dims.pp_rank, parts=self.model_parts, pp_group=pp_group,
                # The same global token denominator as without PP (step(denominator=...)), so the
                # summed gradients are the same.
                device=self.device, loss_fn=self._pipeline_loss_fn(),
                doc_ids=self._doc_ids_fn(),
            )
            log_plan(self.pp_plan, self.parallel_dims.pp_rank)
            if self.validator is not None:
                self.validator.use_pipeline(self.pipeline, pp_group)
        tokens_per_step = self._global_batch_size() * cfg.training.seq_len
        self.metrics = MetricsLogger(
            cfg.metrics,
            str(self._output_folder()),
            enabled=self.rank == 0,
            flops_per_token=model_flops_per_token(self.model_args, cfg.training.seq_len),
            peak_flops_per_s=_peak_flops(self.device, cfg.metrics.peak_tflops),
            device=self.device,
            world_size=self.world_size,
        )
        self.tokens_per_step = tokens_per_step
        if self.rank == 0:
            self._write_config()
            if cfg.checkpoint.load_only:
                logger.info(
                    "checkpoint.load_only: this run's config.toml, metrics, traces and snapshots go to %s (the loaded "
                    "run's own stay as they are)", self._output_folder(),
                )

        # 4. Checkpoints: resume from the run's own latest complete step, else initial_load_path.
        self.checkpointer = CheckpointManager(
            cfg.checkpoint,
            dump_folder=cfg.job.dump_folder,
            model_parts=self.model_parts,
            optimizer=self.optimizers,
            lr_scheduler=self.lr_scheduler,
            dataloader=self.dataloader,
            train_state=self.train_state,
            fingerprint=self._fingerprint(),
            # The model as published for the HF export's config.json: its context length is the flavor's,
            # not the training sequence length (vLLM reads max_position_embeddings as the limit).
            model_args=replace(
                self.model_args,
                max_seq_len=max(self.model_args.max_seq_len, MODELS[cfg.model.name].flavors[cfg.model.flavor].max_seq_len),
            ),
            special_tokens=self._special_tokens,
            tokenizer_path=cfg.model.tokenizer_path if self._special_tokens is not None else None,
            # Recorded in every manifest; a resume with a tokenizer of other ids is refused, except over indexed data,
            # whose token ids were fixed when it was pretokenized (the data reads the same; a warning says so).
            tokenizer=self._tokenizer_identity,
            tokenizer_key=tokenizer_key(cfg.model),
            tokenizer_mismatch="warn" if cfg.training.dataset == "indexed" else "error",
            timeout_s=cfg.comm.init_timeout_seconds,  # the start-up timeout: a save may be slow
        )
        if cfg.checkpoint.create_seed_checkpoint:
            return
        configured = [[{k: v for k, v in g.items() if k not in ("params", "lr")} for g in opt.param_groups]
                      for opt in self.optimizers]
        self.checkpointer.load()
        self._apply_optimizer_config(configured)
        self.evaluate_only = cfg.checkpoint.load_only and self.validator is not None and self.step >= cfg.training.steps
        if self.evaluate_only:
            return  # (train() says what it evaluates; evaluations of several checkpoints each keep their row)
        # Rows of an attempt that died after its last checkpoint; without checkpoints every start is
        # step 0, so a rerun or a torchrun restart starts the file again instead of listing steps twice.
        self.metrics.drop_after(self.step)
        logger.info(
            "training %s %s for %d steps: global batch %d x seq %d (%d tokens/step), local batch %d, "
            "grad accumulation %d, world %d, device %s, params %s",
            cfg.model.name, cfg.model.flavor, cfg.training.steps, self._global_batch_size(), cfg.training.seq_len,
            tokens_per_step, cfg.training.local_batch_size, self.grad_accum, self.world_size, self.device,
            str(self.param_dtype).removeprefix("torch."),
        )

    def _build_data(self) -> None:
        """The tokenizer (when a dataset needs one), the training loader and the validation data. Every
        path, format and vocab problem raises here, before any model is built."""
        cfg, validating = self.cfg, self.cfg.validation.enable
        for section in ("training", "validation"):
            data = getattr(cfg, section)
            if data.dataset_path and data.dataset in ("embedded", "synthetic") and (section == "training" or validating):
                logger.warning(
                    "%s.dataset_path=%r is not read: %s.dataset=%r has its own data (set %s.dataset to \"local\" "
                    "or \"hf\" to train on that path)",
                    section, data.dataset_path, section, data.dataset, section,
                )
        tokenizer = None
        self._special_tokens: tuple[int, int] | None = None
        self._tokenizer_identity: dict[str, Any] | None = None
        block_causal = cfg.model.attn_mask_type == "block_causal"
        # The eos id that training.eod_mask_loss masks the label after (None: no masking).
        self._loss_mask_eos: int | None = None
        if (cfg.training.dataset != "synthetic" or (validating and cfg.validation.dataset != "synthetic")
                or block_causal or cfg.training.eod_mask_loss):
            tokenizer = build_tokenizer(cfg.model.tokenizer_path, key=tokenizer_key(cfg.model))
            check_vocab(tokenizer, self.model_args.vocab_size, cfg.model.flavor)
            self._special_tokens = (tokenizer.bos_id, tokenizer.eos_id)
            self._tokenizer_identity = tokenizer.identity()  # (its hash, once: ~0.1 s for a 128K vocabulary)
            if cfg.training.eod_mask_loss:
                self._loss_mask_eos = tokenizer.eos_id
            if block_causal:
                # Documents start at its bos or after its eos (models/llama3/model.py: document_ids).
                self.model_args = replace(self.model_args, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
        loader = build_dataloader(
            training=cfg.training,
            tokenizer=tokenizer,
            vocab_size=self.model_args.vocab_size,
            dp_rank=self.parallel_dims.dp_rank,
            dp_degree=self.parallel_dims.dp_degree,
            seed=cfg.debug.seed,
        )
        if not self.dry_run and cfg.training.dataset != "synthetic":
            # One global batch from a throwaway iterator (the state lives in the loader's own): a format
            # problem at the start of the data (a missing text field, invalid JSON, no text at all) raises
            # now, not after the model is built and a checkpoint loaded.
            next(iter(loader.dataset), None)
        depth = cfg.training.prefetch_batches
        self.dataloader = PrefetchingLoader(loader, depth) if depth > 0 else loader
        self.validator: Validator | None = None
        if validating:
            # Its own dataset and iterator: validating never moves the training stream.
            val_data = build_validation_dataset(
                cfg.validation,
                tokenizer=tokenizer,
                vocab_size=self.model_args.vocab_size,
                text_field=cfg.training.dataset_text_field,
                dp_rank=self.parallel_dims.dp_rank,
                dp_degree=self.parallel_dims.dp_degree,
                seed=cfg.debug.seed,
            )
            self.validator = Validator(
                cfg.validation, val_data, device=self.device, loss_group=self.parallel_dims.loss_group,
                loss_context=self._loss_ctx, amp_context=self._amp, cp_context=self._cp_ctx,
                loss_chunk_size=cfg.training.loss_chunk_size,
                loss_mask_eos=self._loss_mask_eos,
                # The step boundary's pre-emption check, after every held-out batch too: a SIGTERM during a
                # long validation stops it there, and the step's checkpoint is saved in the grace period.
                stop_requested=lambda: self.preemption.agreed_signal(self.device) is not None,
            )
            _check_held_out(getattr(loader.dataset, "source", None), getattr(val_data, "source", None))
            held_out = getattr(val_data, "source", None)
            if cfg.validation.steps == -1 and isinstance(held_out, HeldOutEmbeddedSource):
                # The whole held-out standard library, at every validation: minutes on a CPU.
                size = held_out.total_bytes()
                megabytes = size / 1e6
                batches = size / HeldOutEmbeddedSource.BYTES_PER_TOKEN / (
                    self.validator.global_batch_size * (cfg.validation.seq_len + 1))
                logger.warning(
                    "validation.steps=-1 validates the whole embedded held-out set (%.0f MB of Python source, about "
                    "%.0f global batches) every %d steps: set validation.steps to a number (e.g. 10) for a quick "
                    "check", megabytes, batches, cfg.validation.freq,
                )
            if not self.dry_run:
                self.validator.check_data()

    def _build_model_parts(self) -> None:
        """2. Model: meta -> converters (float8) -> pipeline split -> parallelize -> materialize -> init
        (a dry run stops before materializing: the parts stay on meta)."""
        cfg, spec = self.cfg, MODELS[self.cfg.model.name]
        self.float8 = build_float8_converter(
            cfg.model.converters,
            cfg.quantize.linear.float8,
            parallel_dims=self.parallel_dims,
            device=self.device,
            param_dtype=param_dtype(cfg.training, self.device.type),
            check_device=not self.dry_run,
        )
        compiling = cfg.compile.enable
        # Created before anything compiles, so it sees every compile (and recompile) of the run.
        self.compile_monitor = CompileMonitor() if compiling and not self.dry_run else None
        with torch.device("meta"):
            whole = spec.build(self.model_args)
        # Against the whole model: a pipeline stage may hold no parameter that a pattern names.
        check_no_weight_decay(cfg.optimizer, whole)
        if self.float8 is not None:
            self.float8.convert(whole)
        if cfg.training.dtype == "bfloat16":
            # Parameters (so gradients and optimizer states) stored in bf16; init_weights draws each in
            # float32 and rounds it, and makes the RoPE table in float32 again.
            whole.to(dtype=torch.bfloat16)
        pp_rank = self.parallel_dims.pp_rank
        if self.pp_plan is not None:
            # One model part per stage this rank runs; every other module is deleted from it.
            parts = [split_model(whole, self.pp_plan.fqns_per_stage[s]) for s in self.pp_plan.stage_ids(pp_rank)]
            del whole
        else:
            parts = [whole]
        self.model_parts: list[nn.Module] = []
        for part in parts:
            part = parallelize_llama(
                part,
                self.parallel_dims,
                parallelism=cfg.parallelism,
                training=cfg.training,
                device_type=self.device.type,
                activation_checkpoint=cfg.activation_checkpoint,
                compile_config=cfg.compile,
                float8_tensorwise=self.float8 is not None and self.float8.tensorwise,
            )
            if self.float8 is not None:
                self.float8.check_gemm_dims(part, self.device)
            if not self.dry_run:
                # FSDP's CPU offload keeps the sharded parameters (and the optimizer) on the CPU and moves
                # them to the device per block; the buffers (the RoPE table) stay on the device.
                part.to_empty(device="cpu" if cfg.training.enable_cpu_offload else self.device)
                with torch.no_grad():
                    part.init_weights(cfg.debug.seed, buffer_device=self.device)
                if self.parallel_dims.tp_enabled and not (
                    self.parallel_dims.fsdp_enabled or self.parallel_dims.dp_replicate_enabled
                ):
                    match_grad_placements(part)
                    self._tp_grad_hooks = True
            part.train()
            self.model_parts.append(part)

    @property
    def step(self) -> int:
        return self.train_state.step

    @property
    def tokens_seen(self) -> int:
        return self.train_state.tokens_seen

    def _output_folder(self) -> Path:
        """Where this run's own files go (config.toml, metrics.jsonl, TensorBoard events, profiler traces,
        memory snapshots, flight-recorder dumps): the dump folder, or under checkpoint.load_only its
        `load_only` subfolder, so a run that evaluates a checkpoint leaves the loaded run's files (and
        their steps after the one loaded) as they were."""
        dump = Path(self.cfg.job.dump_folder)
        return dump / LOAD_ONLY_FOLDER if self.cfg.checkpoint.load_only else dump  # (load_only needs checkpoint.enable)

    def _lock_run_folders(self) -> list[RunLock]:
        """Rank 0 locks the output folder, and the checkpoint folder where it lies outside it (an absolute
        checkpoint.folder two runs with their own dump folders could share), and makes the subfolders the
        enabled features write to; every rank raises the same ConfigError if it cannot."""
        locks, error = [], None
        if self.rank == 0:
            output = self._output_folder()
            folders = [(output, "job.dump_folder")]
            ckpt = self.cfg.checkpoint
            if ckpt.enable and not ckpt.load_only:  # (load_only only reads the checkpoints: it may share them)
                folder = Path(self.cfg.job.dump_folder) / ckpt.folder
                if not folder.resolve().is_relative_to(output.resolve()):
                    folders.append((folder, "checkpoint.folder"))
            try:
                for folder, key in folders:
                    locks.append(RunLock.acquire(folder, key=key))
                # The folders written later, made now: one that cannot be (a file of that name, no permission)
                # is a start-up error naming its key, not a failure steps into the run (inside the profiler's
                # trace handler, a crash).
                for folder, key in self._output_subfolders():
                    try:
                        folder.mkdir(parents=True, exist_ok=True)
                    except OSError as e:
                        raise ConfigError(f"cannot create {folder} ({key}): {e.strerror or e}; choose a writable "
                                          "folder") from None
            except ConfigError as e:
                error = str(e)
                for lock in locks:
                    lock.release()
                locks = []
        if self.world_size > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise ConfigError(error)
        return locks

    def _output_subfolders(self) -> list[tuple[Path, str]]:
        """The folders under the output folder that this job's enabled features write to, with their keys."""
        out, cfg = self._output_folder(), self.cfg
        wanted = [
            (cfg.metrics.enable_tensorboard, cfg.metrics.save_tb_folder, "metrics.save_tb_folder"),
            (cfg.profiling.enable_profiling, cfg.profiling.save_traces_folder, "profiling.save_traces_folder"),
            (cfg.profiling.enable_memory_snapshot, cfg.profiling.save_memory_snapshot_folder,
             "profiling.save_memory_snapshot_folder"),
        ]
        return [(out / folder, key) for on, folder, key in wanted if on]

    def _fingerprint(self) -> dict[str, Any]:
        pd = self.parallel_dims
        return {
            "config_hash": config_hash(self.cfg),
            "layout": {"dp_replicate": pd.dp_replicate, "dp_shard": pd.dp_shard, "cp": pd.cp, "tp": pd.tp, "pp": pd.pp},
            "world_size": self.world_size,
        }

    # ------------------------------------------------------------------------------------------

    def _global_batch_size(self) -> int:
        t = self.cfg.training
        return t.global_batch_size if t.global_batch_size > 0 else t.local_batch_size * self.parallel_dims.dp_degree

    def _setup_determinism(self, seed: int, deterministic: bool, *, warn_only: bool = False) -> None:
        torch.manual_seed(seed)
        if deterministic:
            # cuBLAS needs this before its first use to be deterministic.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=warn_only)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False

    def _log_model(self) -> None:
        n = self.model_args.num_params()
        logger.info(
            "model %s: %.3fM parameters (%.3fM without embeddings), %d layers, dim %d",
            self.cfg.model.flavor, n / 1e6, self.model_args.num_params(exclude_embedding=True) / 1e6,
            self.model_args.n_layers, self.model_args.dim,
        )
        if self.cfg.training.dtype == "bfloat16":
            logger.info("parameters, gradients and optimizer states in bfloat16, with no float32 copy (training.dtype)")
        a = self.model_args
        if a.attn_mask_type == "block_causal" or a.attn_type != "sdpa":
            where = (f": documents start at token {a.bos_id} (bos) and after {a.eos_id} (eos)"
                     if a.attn_mask_type == "block_causal" else "")
            logger.info("attention: %s, %s mask%s", a.attn_type, a.attn_mask_type, where)
        if self._loss_mask_eos is not None:
            logger.info(
                "loss: positions whose input is eos (token %d) are left out, in training and validation "
                "(training.eod_mask_loss)", self._loss_mask_eos,
            )

    def _write_config(self) -> None:
        folder = self._output_folder()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "config.toml.tmp"
        tmp.write_text(to_toml(self.cfg), encoding="utf-8")
        os.replace(tmp, folder / "config.toml")  # never leave a half-written config.toml

    def _amp(self) -> contextlib.AbstractContextManager:
        # FSDP / replicate apply a MixedPrecisionPolicy that casts parameters; otherwise autocast does.
        pd = self.parallel_dims
        if self.param_dtype == torch.float32 or pd.fsdp_enabled or pd.dp_replicate_enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.param_dtype)

    def _loss_ctx(self) -> contextlib.AbstractContextManager:
        if self.loss_parallel:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------

    def _next_batches(self, data_iter) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batches = [next(data_iter) for _ in range(self.grad_accum)]
        if self._loss_mask_eos is not None:
            # Before any sharding (CP's sequence shards, PP's microbatches): every layout masks the same labels.
            batches = [(inputs, mask_after_eos(inputs, labels, self._loss_mask_eos)) for inputs, labels in batches]
        return batches

    def train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
        """One optimizer step over the accumulated micro-batches; returns (global mean loss, grad norm)."""
        loss_group = self.parallel_dims.loss_group
        if self._step_t0 is not None:  # this rank's host time: the step so far, before its first collective
            self._host_s += time.perf_counter() - self._step_t0
            self._step_t0 = None
        # The loss is the mean over every token of the global batch: count them first, so each
        # micro-batch's token-sum loss can be scaled by the same global denominator. Counted over
        # the batch group (dp), not the loss group: context-parallel ranks hold the same sequences.
        local_tokens = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in batches)  # (labels are on the host)
        batch_group = self.parallel_dims.batch_group
        if batch_group is None:
            # No device round trip: on a GPU, reading back a device tensor here would wait for the previous
            # step's kernels to finish, leaving the GPU idle while this step's first ones are launched.
            total_tokens = float(local_tokens)
        else:
            n_tokens = torch.tensor([local_tokens], dtype=torch.float64, device=self.device)
            dist.all_reduce(n_tokens, group=batch_group)
            total_tokens = n_tokens.item()
        if total_tokens == 0:
            # Only masking can leave no label: the loss would be 0/0.
            raise TrainingError(
                f"step {self.step}: every label of the global batch is masked (training.eod_mask_loss=true "
                f"leaves out the position after each eos, and this batch has nothing else): check the data"
            )

        if self.pipeline is not None:
            loss_sum = self._pipeline_forward_backward(batches, total_tokens)
        else:
            loss_sum = self._forward_backward(batches, total_tokens)

        params = [p for m in self.model_parts for p in m.parameters()]
        grad_norm = clip_grad_norm_(params, self.cfg.training.max_norm, pp_group=self.parallel_dims.pp_group)
        if loss_group is not None:
            dist.all_reduce(loss_sum, group=loss_group)
        loss_value, norm_value = loss_sum.item(), float(grad_norm)
        if not (torch.isfinite(torch.tensor(loss_value)) and torch.isfinite(torch.tensor(norm_value))):
            # Raise before optimizer.step(): the weights (and any checkpoint) stay as they were.
            raise TrainingError(
                f"loss is {loss_value} (grad_norm {norm_value}) at step {self.step}: training diverged; "
                f"lower optimizer.lr, raise lr_scheduler.warmup_steps or check the data"
            )
        for opt in self.optimizers:
            opt.step()
        if self.float8 is not None:
            self.float8.post_optimizer_step(self.model_parts)  # precomputed float8 scales, if enabled
        self.lr_scheduler.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return loss_value, norm_value

    def _forward_backward(self, batches: list[tuple[torch.Tensor, torch.Tensor]], total_tokens: float) -> torch.Tensor:
        """Forward and backward of each micro-batch; returns this rank's loss sum (float64 scalar)."""
        model = self.model_parts[0]
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for inputs, labels in batches:
            inputs = inputs.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            # Under CP, inputs and labels become this rank's sequence shards inside the context.
            with self._cp_ctx(inputs, labels), self._loss_ctx():
                with self._amp():
                    loss = model_token_loss(model, inputs, labels, loss_fn=self.loss_fn, chunk_size=self.loss_chunk_size)
                loss = loss / total_tokens
                loss.backward()
            loss_sum += _plain(loss.detach()).to(torch.float64)
            del loss
        return loss_sum

    def _cp_ctx(self, inputs: torch.Tensor, labels: torch.Tensor) -> contextlib.AbstractContextManager:
        """Context parallel for one forward + backward: shards inputs, labels (kept sharded) and every
        model part's RoPE table (restored after) along the sequence; SDPA runs as ring attention."""
        cp_mesh = self.parallel_dims.get_mesh("cp")
        if cp_mesh is None:
            return contextlib.nullcontext()
        freqs = [part.freqs_cis for part in self.model_parts]
        return context_parallel_ctx(
            cp_mesh,
            buffers=[inputs, labels, *freqs],
            seq_dims=[1, 1, *[0] * len(freqs)],
            no_restore_buffers={inputs, labels},
            rotate_method=self.cfg.parallelism.context_parallel_rotate_method,
        )

    def _doc_ids_fn(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """For a pipeline with block_causal attention: the document ids of a batch of token ids (every
        pipeline rank has the batch; only the first stage sees its tokens)."""
        if self.model_args.attn_mask_type != "block_causal":
            return None
        return self.model_parts[0].document_ids

    def _pipeline_loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The last stage's loss: on its logits, or with training.loss_chunk_size on its final-norm hidden
        states, through its `output` chunk by chunk (the stage's forward then stops before `output`)."""
        last = [part for part in self.model_parts if part.output is not None]
        if not self.loss_chunk_size or not last:  # no chunking, or not the last stage's rank
            return self.loss_fn
        (part,) = last
        part.output_in_loss = True

        def chunked(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return chunked_output_loss(hidden, gathered(part.output), labels, chunk_size=self.loss_chunk_size,
                                       loss_fn=self.loss_fn)

        return chunked

    def _pipeline_forward_backward(
        self, batches: list[tuple[torch.Tensor, torch.Tensor]], total_tokens: float
    ) -> torch.Tensor:
        """One schedule step per accumulation batch; returns the loss sum, whole on every pp rank."""
        assert self.pipeline is not None
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        t0 = time.perf_counter()
        for inputs, labels in batches:
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            losses: list[torch.Tensor] = []
            # loss parallel must cover the last stage's loss and its backward, both inside the schedule.
            with self._cp_ctx(inputs, labels), self._loss_ctx(), self._amp():
                self.pipeline.step(inputs, labels, losses, denominator=total_tokens)
            for loss in losses:
                loss_sum += _plain(loss.detach()).to(torch.float64)
        if self._tp_grad_hooks and self.pipeline.plan.splits_backward:  # (the schedule wrote weight gradients itself)
            settle_grad_placements(self.model_parts)
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # the compute clock reads CUDA events
        self._pp_time_s += time.perf_counter() - t0
        self._pp_compute_s += self.pipeline.compute_s()
        # Only the rank with the last stage has the loss: make it whole across the pipeline.
        pp_group = self.parallel_dims.pp_group
        assert pp_group is not None
        dist.all_reduce(loss_sum, group=pp_group)
        return loss_sum

    def _pipeline_wait_stats(self) -> dict[str, float]:
        """Share of the pipeline's time each pp rank spent waiting (not computing) since the last call;
        collective over the pp group. Logged per rank by rank 0."""
        if self.pipeline is None:
            return {}
        assert self.pp_plan is not None
        share = 0.0 if self._pp_time_s <= 0 else max(0.0, 1.0 - self._pp_compute_s / self._pp_time_s)
        self._pp_time_s = self._pp_compute_s = 0.0
        pp = self.pp_plan.pp
        shares = torch.zeros(pp, dtype=torch.float64, device=self.device)
        shares[self.parallel_dims.pp_rank] = share
        dist.all_reduce(shares, group=self.parallel_dims.pp_group)
        values = shares.tolist()
        theory = self.pp_plan.bubble_fraction()
        # bubble_fraction() is idle time over compute time; as a share of the step it is b / (1 + b).
        logger.info(
            "pipeline: share of step time spent waiting per pp rank %s (schedule %s; theoretical %s)",
            "[" + ", ".join(f"{v:.1%}" for v in values) + "]",
            self.pp_plan.schedule,
            "n/a for a CSV schedule" if theory is None else f"{theory / (1 + theory):.1%}",
        )
        return {"pp_wait_share_max": max(values), "pp_wait_share_mean": sum(values) / len(values)}

    def _apply_optimizer_config(self, configured: list[list[dict[str, Any]]]) -> None:
        """After a resume, train with this config's optimizer settings, not the checkpoint's: loading
        restored the saved param groups (initial_lr, weight_decay, betas, eps, ...) and the schedule's
        base lr, so `--optimizer.lr` lowered after a divergence would otherwise do nothing. The schedule
        keeps its position; the lr of the next step is the configured lr times its factor there."""
        changed: dict[str, tuple[Any, Any]] = {}
        for opt, groups in zip(self.optimizers, configured):
            for group, want in zip(opt.param_groups, groups):
                for k, v in want.items():
                    if group.get(k) != v:
                        changed.setdefault("optimizer.lr" if k == "initial_lr" else k, (group.get(k), v))
                        group[k] = v
        for sched in self.lr_scheduler.schedulers:
            sched.base_lrs = [g["initial_lr"] for g in sched.optimizer.param_groups]
            for g, base, factor in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                g["lr"] = base * factor(sched.last_epoch)
            sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
        if changed:
            logger.warning(
                "resumed with this config's optimizer settings, not the checkpoint's: %s",
                ", ".join(f"{k} {old} -> {new}" for k, (old, new) in sorted(changed.items())),
            )

    def train(self) -> None:
        # Every graph torch.compile makes is made in here (the first steps, validation's forward-only ones).
        with memory_budget_context(self.cfg.activation_checkpoint):
            self._train()

    def _train(self) -> None:
        cfg = self.cfg
        if cfg.checkpoint.create_seed_checkpoint:
            # The initialized weights as step-0, for a later run to start from (initial_load_path).
            self.checkpointer.maybe_save(0, seed=True)
            logger.info("seed checkpoint written; exiting without training")
            return
        if self.evaluate_only:
            self._evaluate_loaded()
            return
        if self.step >= cfg.training.steps:
            logger.warning(
                "the checkpoint resumed is at step %d and training.steps=%d: nothing to train (raise training.steps "
                "to continue the run; a final export is written by the run that reaches training.steps%s)",
                self.step, cfg.training.steps,
                "; with [validation] enabled, a load_only run validates the loaded weights" if cfg.checkpoint.load_only
                else "",
            )
        gc_freq = cfg.training.gc_freq
        if gc_freq > 0:
            gc.disable()  # collect on a schedule instead, so every rank pauses at the same step
            gc.collect(1)
        data_iter = iter(self.dataloader)
        window_start = time.perf_counter()
        train_start, tokens_at_start = window_start, self.tokens_seen
        window_validation_s = total_validation_s = 0.0  # validating is not training time
        window_saving_s = total_saving_s = 0.0  # nor is saving a checkpoint (the blocking part of it)
        window_steps = window_tokens = 0
        data_wait = 0.0
        first_step = self.step + 1
        eta = RemainingTime(cfg.training.steps)
        prof_kwargs = {
            "dump_folder": str(self._output_folder()), "rank": self.rank, "device": self.device, "global_step": self.step,
        }
        self.preemption.install()
        if not self.dry_run:
            self.stack_dumps.arm()  # after install(): signal.signal would replace faulthandler's C-level handler
        try:
            with contextlib.ExitStack() as stack:
                profiler = stack.enter_context(maybe_enable_profiling(cfg.profiling, **prof_kwargs))
                snapshotter = stack.enter_context(maybe_enable_memory_snapshot(cfg.profiling, **prof_kwargs))
                while self.step < cfg.training.steps:
                    self._step_t0 = time.perf_counter()
                    self.train_state.step += 1
                    maybe_inject_fault(cfg.debug, step=self.step, rank=self.rank)
                    maybe_inject_hang(cfg.debug, step=self.step, rank=self.rank)
                    if gc_freq > 0 and self.step % gc_freq == 0:
                        gc.collect(1)
                    t0 = time.perf_counter()
                    batches = self._next_batches(data_iter)
                    data_wait += time.perf_counter() - t0
                    lr = self.lr_scheduler.get_last_lr()[0]
                    try:
                        loss, grad_norm = self.train_step(batches)
                    except torch.OutOfMemoryError:
                        if snapshotter is not None:
                            snapshotter.step(on_oom=True)
                        raise
                    if self.step == first_step:
                        self._apply_train_timeout()  # the first step (and its compile) is over
                    self.train_state.tokens_seen += self.tokens_per_step
                    window_steps += 1
                    window_tokens += self.tokens_per_step
                    self.history.append({"step": self.step, "loss": loss, "grad_norm": grad_norm, "lr": lr})
                    validation, validation_s = self._maybe_validate()
                    window_validation_s += validation_s
                    total_validation_s += validation_s
                    # (A validation cut short by a pre-emption signal still gets its row: the run stops next.)
                    if validation_s or self.step % cfg.metrics.log_freq == 0 or self.step == cfg.training.steps:
                        if self.device.type == "cuda":
                            torch.cuda.synchronize()
                        now = time.perf_counter()
                        elapsed = now - window_start - window_validation_s - window_saving_s
                        extra: dict[str, float] = {}
                        if self.compile_monitor is not None:
                            extra.update(self.compile_monitor.metrics(self._max_over_ranks if self.world_size > 1 else None))
                        extra.update(straggler_stats(self._host_s / window_steps, self.device))  # collective
                        self._host_s = 0.0
                        extra.update(self._pipeline_wait_stats())  # collective over the pp group
                        extra.update(validation)
                        self.metrics.log(
                            self.step,
                            loss=loss,
                            grad_norm=grad_norm,
                            lr=lr,
                            tokens=window_tokens // self.world_size,
                            elapsed_s=elapsed,
                            data_wait_s=data_wait,
                            steps=window_steps,
                            extra=extra or None,
                            eta_s=eta.at(now, self.step),
                        )
                        window_start, window_steps, window_tokens, data_wait = now, 0, 0, 0.0
                        window_validation_s = window_saving_s = 0.0
                    t0 = time.perf_counter()
                    self.checkpointer.maybe_save(
                        self.step, last=self.step == cfg.training.steps, first=self.step == first_step
                    )
                    if self.checkpointer.saved_step == self.step:  # (a save happened: the time is its own)
                        # (On a GPU, a save at a step without a metrics line also waits for that step's last
                        # kernels: at most that tail is counted as saving.)
                        spent = time.perf_counter() - t0
                        window_saving_s += spent
                        total_saving_s += spent
                    if profiler is not None:
                        profiler.step()
                    if snapshotter is not None:
                        snapshotter.step()
                    if self._stop_if_preempted():
                        break
            self.metrics.summary(
                self.tokens_seen - tokens_at_start,
                time.perf_counter() - train_start - total_validation_s - total_saving_s,
                validation_s=total_validation_s, saving_s=total_saving_s,
            )
            self._run_ended = True
        finally:
            # The handlers stay until close(), which restores them: after an error, torchrun SIGTERMs this
            # rank as soon as a peer dies, and the default handler would kill it before it reports its own
            # error; after success, close() waits for the final (async) save, which a pre-emption signal
            # must not cut short.
            if gc_freq > 0:
                gc.enable()

    def _max_over_ranks(self, value: int) -> int:
        """The largest `value` over every rank (a collective over the world)."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _evaluate_loaded(self) -> None:
        """The loaded checkpoint's validation, as its own metrics row (load_only's metrics.jsonl)."""
        logger.info(
            "checkpoint.load_only: step %d loaded and training.steps=%d, so nothing to train: validating the loaded "
            "weights once", self.step, self.cfg.training.steps,
        )
        result, seconds = self._maybe_validate(always=True)
        self.metrics.log_validation(self.step, result, seconds=seconds)

    def _maybe_validate(self, *, always: bool = False) -> tuple[dict[str, float], float]:
        """({"val_loss", "val_ppl"} or {}, seconds spent) for this step: every validation.freq steps and the last step
        (`always`: whatever the step)."""
        # The last step validates whatever validation.freq: the final weights' val_loss is the one a run is for.
        last = self.step == self.cfg.training.steps
        if self.validator is None or not (always or last or self.validator.should_run(self.step)):
            return {}, 0.0
        t0 = time.perf_counter()
        # Its forward-only graphs (eval, no grad) compile once per block: not a training recompile.
        expected = self.compile_monitor.expected_recompiles() if self.compile_monitor else contextlib.nullcontext()
        with expected:
            # The last step's validation is never cut short: the run ends with it anyway (a pre-emption
            # signal does not stop a last step), and its val_loss could not be had again by a resume.
            result = self.validator.validate(self.model_parts, interruptible=self.step < self.cfg.training.steps)
        return result, time.perf_counter() - t0

    def _apply_train_timeout(self) -> None:
        seconds = self.cfg.comm.train_timeout_seconds
        n = set_pg_timeouts(self.parallel_dims, seconds)
        if n:
            logger.info(
                "collective timeout now %d s on %d process group(s) (comm.train_timeout_seconds; it was %d s until "
                "the first step ended)", seconds, n, self.cfg.comm.init_timeout_seconds,
            )

    def _stop_if_preempted(self) -> bool:
        """Collective, every step: True when some rank got SIGTERM/SIGUSR1; then the full state is saved."""
        sig = self.preemption.agreed_signal(self.device)
        if sig is None or self.step >= self.cfg.training.steps:
            return False  # no signal, or the run ends at this step anyway (with its usual final save)
        ckpt = self.cfg.checkpoint
        if ckpt.enable and not ckpt.load_only:
            if self.checkpointer.saved_step != self.step:  # else this step's save (interval, first) holds it
                self.checkpointer.maybe_save(self.step, force=True)
            self.checkpointer.wait()
            saved = f"checkpoint step-{self.step} saved (full state)"
            again = "run the same command again to resume"
        else:
            saved = ("checkpoint.load_only=true" if ckpt.enable else "checkpoint.enable=false") + ", so nothing was saved"
            again = "the same command, run again, starts over" + (" from the checkpoint it loaded" if ckpt.enable else "")
        logger.warning(
            "pre-empted by %s: every rank stopped after step %d; %s; exiting with status %d (%s)",
            sig.name, self.step, saved, EXIT_PREEMPTED, again,
        )
        self.stopped_by = sig
        return True

    def close(self, *, exiting: bool = False) -> None:
        """Wait for the last save and release what the run holds. `exiting`: the process ends next (train.py
        after a finished or pre-empted run), so SIGTERM/SIGUSR1 are ignored from here on, not restored to
        their default (which kills: torchrun's launcher would then report the finished job as pre-empted)."""
        # The end of the run is not a training step: rank 0 may wait here for the last save and the purge
        # of old checkpoints (minutes on a network file system) while the others wait in the exit barrier;
        # the start-up timeout holds again for that.
        if not self.dry_run:
            set_pg_timeouts(self.parallel_dims, self.cfg.comm.init_timeout_seconds)
        # Never leave with a save in flight: close() waits for it (and raises if it failed).
        clean = False
        try:
            self.checkpointer.close()
            clean = self._run_ended
        finally:
            # A stack dumped by a signal says nothing once the run ended cleanly (a pre-emption's stop); after an
            # error it shows where this rank was when told to stop. Before restore(): see stack_dump.py.
            self.stack_dumps.disarm(keep=not clean)
            self.preemption.restore(ignore=exiting)
            self.metrics.close()
            if self.compile_monitor is not None:
                self.compile_monitor.close()
            if isinstance(self.dataloader, PrefetchingLoader):
                self.dataloader.close()
            for lock in self._run_locks:
                lock.release()


class InjectedFault(RuntimeError):
    """The error debug.fail_at_step raises: for testing how the job handles a failing rank."""


def maybe_inject_fault(debug: Debug, *, step: int, rank: int) -> None:
    if debug.fail_at_step and step == debug.fail_at_step and debug.fail_rank in (-1, rank):
        raise InjectedFault(
            f"debug.fail_at_step={step}: injected failure on rank {rank} (debug.fail_rank={debug.fail_rank}; "
            f"for testing fault handling)"
        )


def maybe_inject_hang(debug: Debug, *, step: int, rank: int) -> None:
    """debug.hang_at_step: block this rank forever (signals are still handled: they only record a stop that
    never comes), as a rank stuck in a collective or a blocking call would, until it is killed."""
    if debug.hang_at_step and step == debug.hang_at_step and debug.hang_rank in (-1, rank):
        logger.warning(
            "debug.hang_at_step=%d: rank %d blocks here until it is killed (debug.hang_rank=%d; for testing fault "
            "handling)", step, rank, debug.hang_rank,
        )
        threading.Event().wait()


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A loss computed under loss parallel is a replicated DTensor: take the local copy."""
    return t.to_local() if isinstance(t, DTensor) else t


def _peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    tflops = peak_tflops(device, "bf16", override=override_tflops)
    return None if tflops is None else tflops * 1e12
