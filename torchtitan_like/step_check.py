"""Step check: the job's features and layout train for real, shrunk to a few CPU processes.

    COMM_MODE=fake_backend DRY_RUN_STEP_CHECK=1 NGPU=64 CONFIG_FILE=train_configs/llama3_70b.toml ./run_train.sh
    python -m torchtitan_like.step_check --world-size 64 [--max-ranks 8] [--timeout S] --job.config_file FILE \
        [--section.key value ...]

The dry run builds the model and checks the config, but never runs a step: a combination of features
that crashes in the first forward or backward (a compile, checkpointing or pipeline schedule that does
not compose with the layout) passes it. The step check runs that first step before the cluster does.

It launches the trainer through torchrun on CPU / gloo, on a rehearsal of the job (`rehearsal`):
- the layout: every parallel degree above 1 becomes 2 (pipeline, data replicate / shard, context,
  tensor), with the job's schedule; where that needs more than `--max-ranks` processes, the
  replicate, then the shard dimension drop to 1 (FSDP stays over cp where cp > 1);
- the model: the debug flavor of the family (tied embeddings where the job ties them), so a step takes
  milliseconds whatever the job's size;
- every feature as the job sets it: float8 recipe and all-gather, activation checkpointing, compile
  (backend and components), loss parallel and chunking, gradient accumulation (at most 2 microbatches),
  mixed precision (bf16 where the job runs bf16 on GPUs), CPU offload, validation, TensorBoard,
  checkpoint saving (async mode, purge, HF export, first-step save);
- the data: 64-token sequences of the embedded dataset with the embedded tokenizer (the dry run checks
  the job's own files).

It trains 2 steps; where the job saves checkpoints it saves after each and then resumes in a second
launch and trains a third step. Everything goes to a temporary folder, removed after a pass and kept
after a failure, with the log of every rank. What the rehearsal cannot run (CUDA-only features, the
job's initial checkpoint, profiling) is listed in the result line. Exit status: 0 passed; 1 the
rehearsal failed (the job would fail the same way); 2 a config error: the job's, or a shrinking the
trainer refuses (said as such), or more ranks than allowed.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from torchtitan_like.components.float8 import float8_requested
from torchtitan_like.config.schema import JobConfig
from torchtitan_like.errors import ConfigError, TrainerError

logger = logging.getLogger("torchtitan_like")

REHEARSAL_SEQ_LEN = 64
"""Divisible by 2 x cp (context parallel's load balancing) and tp (sequence parallel) for degrees of 2."""
REHEARSAL_STEPS = 2
"""The first step (compile, first collectives) and one with optimizer state."""
MAX_ACCUMULATION = 2
DEFAULT_MAX_RANKS = 8
DEFAULT_TIMEOUT_S = 1200
STOP_GRACE_S = 10
"""Seconds the workers get to stop after a timeout or Ctrl-C before torchrun kills them."""

DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
"""Mesh dims in the order of the rehearsal's layout line."""
DROP_ORDER = ("dp_replicate", "dp_shard", "cp")
"""Dims dropped to 1 when the rehearsal would need more than max_ranks processes: HSDP's replicate dim
adds the least beside FSDP; FSDP itself stays over cp while cp > 1. TP and PP are never dropped."""


@dataclass
class Rehearsal:
    cfg: JobConfig
    """The rehearsal's config (the job's, with the changes below)."""
    layout: dict[str, int]
    """Degree of each mesh dim (DIMS)."""
    features: list[str]
    """What the job trains with, as rehearsed (for the result line)."""
    not_rehearsed: list[str] = field(default_factory=list)
    """What the rehearsal changes or leaves out, and why."""

    @property
    def ranks(self) -> int:
        return _product(self.layout)

    @property
    def resumes(self) -> bool:
        return self.cfg.checkpoint.enable


def rehearsal(cfg: JobConfig, layout: dict[str, int], *, device: str = "cuda",
              max_ranks: int = DEFAULT_MAX_RANKS) -> Rehearsal:
    """The CPU rehearsal of job `cfg` whose resolved layout is `layout` ({dim: degree} over DIMS), for a
    job on `device` ("cuda" or "cpu")."""
    if max_ranks < 1:
        raise ConfigError(f"step check: --max-ranks {max_ranks} must be >= 1")
    job = cfg
    cfg = copy.deepcopy(cfg)
    dropped: list[str] = []
    small = {d: (2 if layout.get(d, 1) > 1 else 1) for d in DIMS}
    for d in DROP_ORDER:
        if _product(small) <= max_ranks:
            break
        if small[d] > 1:
            small[d] = 1
            dropped.append(f"{d} {layout[d]}")
    if _product(small) > max_ranks:
        raise ConfigError(
            f"step check: the job's pipeline x tensor parallel degrees need {_product(small)} ranks at 2 each, "
            f"more than --max-ranks {max_ranks}: allow {_product(small)} (DRY_RUN_STEP_CHECK_RANKS={_product(small)})"
        )
    notes = [f"{', '.join(dropped)} (dropped to 1 to fit {max_ranks} ranks)"] if dropped else []

    # The model: the family's debug flavor, tied where the job ties (the dry run built the job's own).
    from torchtitan_like.models import MODELS

    spec = MODELS[cfg.model.name]
    tied = spec.flavors[cfg.model.flavor].tie_word_embeddings
    flavor = "debugmodel_tied" if tied else "debugmodel"
    if flavor not in spec.flavors:
        raise ConfigError(f"step check: model.name={cfg.model.name!r} has no {flavor!r} flavor to rehearse with")
    n_layers = spec.flavors[flavor].n_layers
    cfg.model.flavor, cfg.model.n_layers = flavor, None
    # The embedded tokenizer, also where the job reads its tokenizer from model.hf_assets_path (loading the
    # rehearsal's config would resolve an unset tokenizer_path to that folder again).
    cfg.model.tokenizer_path = cfg.model.hf_assets_path = ""
    seq = REHEARSAL_SEQ_LEN
    if job.model.max_seq_len is not None:
        # (Context parallel needs it equal to seq_len; longer RoPE tables stay longer.)
        cfg.model.max_seq_len = seq if job.model.max_seq_len == job.training.seq_len else 2 * seq

    t = cfg.training
    dp_job = layout.get("dp_replicate", 1) * layout.get("dp_shard", 1)
    dp = small["dp_replicate"] * small["dp_shard"]
    t.seq_len = seq
    if t.loss_chunk_size:
        t.loss_chunk_size = seq // 4
    t.steps = REHEARSAL_STEPS  # (run_rehearsal sets each launch's)
    t.dataset, t.dataset_path, t.dataset_split, t.dataset_config = "embedded", None, "train", None
    # (An indexed job's blend and order, a local job's record field: they would be reported as ignored.)
    t.dataset_weights, t.dataset_shuffle, t.dataset_text_field = [], False, "text"
    accum = _accumulation(job.training.global_batch_size, t.local_batch_size, dp_job)
    if accum > MAX_ACCUMULATION:
        notes.append(f"gradient accumulation {accum} (rehearsed with {MAX_ACCUMULATION} microbatches)")
    if t.global_batch_size != -1:
        t.global_batch_size = t.local_batch_size * dp * min(accum, MAX_ACCUMULATION)
    if t.mixed_precision_param == "auto" and device == "cuda":
        t.mixed_precision_param = "bfloat16"  # what "auto" means on the job's GPUs

    v = cfg.validation
    if v.enable:
        v.dataset, v.dataset_path, v.dataset_split, v.dataset_config = "embedded", None, "validation", None
        v.freq, v.steps, v.seq_len = 1, 1, seq
        if v.global_batch_size != -1:
            v_accum = _accumulation(job.validation.global_batch_size, v.local_batch_size, dp_job)
            v.global_batch_size = v.local_batch_size * dp * min(v_accum, MAX_ACCUMULATION)

    p = cfg.parallelism
    p.pipeline_parallel_degree = small["pp"]
    p.data_parallel_replicate_degree = small["dp_replicate"]
    p.data_parallel_shard_degree = small["dp_shard"]
    p.context_parallel_degree = small["cp"]
    p.tensor_parallel_degree = small["tp"]
    if p.enable_async_tensor_parallel:
        p.enable_async_tensor_parallel = False
        notes.append("async tensor parallel (needs CUDA)")
    if p.pipeline_parallel_schedule_csv is not None:
        p.pipeline_parallel_schedule_csv = None
        notes.append("the pipeline schedule CSV (written for the job's ranks; rehearsed with "
                     f"{p.pipeline_parallel_schedule})")
    if p.module_fqns_per_model_part is not None or p.pipeline_parallel_layers_per_stage is not None:
        which = ("module_fqns_per_model_part" if p.module_fqns_per_model_part is not None
                 else "pipeline_parallel_layers_per_stage")
        p.module_fqns_per_model_part = p.pipeline_parallel_layers_per_stage = None
        p.pipeline_parallel_first_stage_less_layers = p.pipeline_parallel_last_stage_less_layers = 1
        notes.append(f"parallelism.{which} (the debug model is split evenly)")

    if cfg.model.attn_type == "flex":
        cfg.model.attn_type = "sdpa"
        notes.append("FlexAttention (no backward on CPU; rehearsed with SDPA"
                     + (" and a dense document mask)" if cfg.model.attn_mask_type == "block_causal" else ")"))

    ac = cfg.activation_checkpoint
    if ac.mode == "selective" and ac.selective_ac_option.isdigit() and int(ac.selective_ac_option) > n_layers:
        notes.append(f"selective AC every {ac.selective_ac_option} blocks (every {n_layers}: the debug model has "
                     f"{n_layers})")
        ac.selective_ac_option = str(n_layers)

    # Names for the job's model may name blocks the debug model lacks (e.g. "layers.20.*"); the trainer
    # refuses a name that matches nothing, so the rehearsal leaves those out.
    o = cfg.optimizer
    f8 = cfg.quantize.linear.float8
    float8 = float8_requested(cfg.model.converters)
    if o.no_weight_decay_keywords or (float8 and f8.filter_fqns):
        import torch
        from torch import nn

        from torchtitan_like.components.float8 import AUTO_FILTER
        from torchtitan_like.components.optimizer import unmatched_patterns

        with torch.device("meta"):
            debug = spec.build(spec.flavors[flavor])
        unmatched = unmatched_patterns(o.no_weight_decay_keywords, debug)
        if unmatched:
            o.no_weight_decay_keywords = [p for p in o.no_weight_decay_keywords if p not in unmatched]
            notes.append(f"optimizer.no_weight_decay_keywords {unmatched} (they name no parameter of {flavor})")
        if float8:
            linears = [n for n, m in debug.named_modules() if isinstance(m, nn.Linear)]
            unmatched = [f for f in f8.filter_fqns if f != AUTO_FILTER and not any(f in n for n in linears)]
            if unmatched:
                f8.filter_fqns = [f for f in f8.filter_fqns if f not in unmatched]
                notes.append(f"quantize.linear.float8.filter_fqns {unmatched} (they name no linear layer of {flavor})")

    if float8 and not f8.emulate:
        f8.emulate = True
        notes.append("float8 matmuls (emulated on CPU; casts, scales and all-gathers run)")
    if small["dp_shard"] * small["cp"] == 1 and layout.get("dp_shard", 1) * layout.get("cp", 1) > 1:
        # FSDP itself was dropped to fit max_ranks: what only FSDP can run goes with it (the trainer refuses it
        # without FSDP), rather than failing the launch as if the job would.
        fsdp_only = []
        if float8 and f8.enable_fsdp_float8_all_gather:
            f8.enable_fsdp_float8_all_gather = f8.precompute_float8_dynamic_scale_for_fsdp = False
            fsdp_only.append("float8 FSDP all-gather")
        if t.enable_cpu_offload:
            t.enable_cpu_offload = False
            fsdp_only.append("CPU offload")
        if fsdp_only:
            notes.append(f"{' and '.join(fsdp_only)} (FSDP-only; FSDP was dropped to fit {max_ranks} ranks)")
    sharded_or_replicated = small["dp_shard"] * small["cp"] > 1 or small["dp_replicate"] > 1
    if (float8 and f8.recipe_name == "rowwise_with_gw_hp" and device == "cuda" and not sharded_or_replicated
            and (t.mixed_precision_param == "bfloat16" or t.dtype == "bfloat16")):
        # bf16 without FSDP or DDP trains under autocast, which this recipe cannot do on CPU (components/float8.py;
        # CUDA's autocast can): the trainer refuses it there, so the rehearsal computes in float32.
        t.mixed_precision_param, t.dtype = "float32", "float32"
        notes.append("bfloat16 (rowwise_with_gw_hp cannot train under CPU autocast: rehearsed in float32)")
    if float8 and f8.recipe_name == "tensorwise" and small["tp"] > 1:
        notes.append("float8 tensor-parallel styles (gloo cannot all-gather float8: bf16/fp32 TP collectives)")
    if float8 and "auto_filter_small_kn" in f8.filter_fqns:
        f8.filter_fqns = [f for f in f8.filter_fqns if f != "auto_filter_small_kn"]
        notes.append("float8 auto_filter_small_kn (every debug-model linear is small)")

    c = cfg.checkpoint
    c.folder, c.load_step, c.interval = "checkpoint", -1, 1
    if c.initial_load_path is not None:
        c.initial_load_path, c.initial_load_in_hf = None, False
        notes.append("checkpoint.initial_load_path (the dry run checks it)")
    if c.load_only:
        c.load_only = False
        notes.append("checkpoint.load_only (the rehearsal trains and saves)")
    if c.enable and c.async_mode == "async_with_pinned_mem":
        c.async_mode = "async"
        notes.append("pinned-memory staging (needs CUDA; rehearsed with async_mode=async)")

    cfg.job.dump_folder, cfg.job.config_file = "", None  # (set by run_rehearsal)
    cfg.metrics.log_freq, cfg.metrics.save_tb_folder = 1, "tb"
    cfg.comm.save_traces_folder = "comm_traces"
    # CPU compiles and steps are slower than the job's: its timeouts would fail the rehearsal, not the job.
    cfg.comm.init_timeout_seconds = max(cfg.comm.init_timeout_seconds, 900)
    cfg.comm.train_timeout_seconds = max(cfg.comm.train_timeout_seconds, 300)
    cfg.lr_scheduler.warmup_steps, cfg.lr_scheduler.decay_ratio = 1, None
    pr = cfg.profiling
    if pr.enable_profiling or pr.enable_memory_snapshot:
        pr.enable_profiling = pr.enable_memory_snapshot = False
        notes.append("profiling")
    pr.save_traces_folder, pr.save_memory_snapshot_folder = "profile_traces", "memory_snapshot"
    # The job's injected faults are not rehearsed: a hang would block a rank until the step check's timeout.
    cfg.debug.fail_at_step = cfg.debug.hang_at_step = 0
    return Rehearsal(cfg=cfg, layout=small, features=_features(cfg, small), not_rehearsed=notes)


def _product(layout: dict[str, int]) -> int:
    n = 1
    for d in layout.values():
        n *= d
    return n


def _accumulation(global_batch: int, local_batch: int, dp: int) -> int:
    return 1 if global_batch == -1 else max(1, global_batch // (local_batch * dp))


def _features(cfg: JobConfig, layout: dict[str, int]) -> list[str]:
    p, out = cfg.parallelism, []
    if layout["pp"] > 1:
        out.append(f"PP {p.pipeline_parallel_schedule}")
    if layout["dp_replicate"] > 1:
        out.append("HSDP" if layout["dp_shard"] * layout["cp"] > 1 else "DDP")
    elif layout["dp_shard"] * layout["cp"] > 1:
        out.append("FSDP")
    if layout["cp"] > 1:
        out.append(f"CP {p.context_parallel_rotate_method}")
    if layout["tp"] > 1:
        out.append("TP" + (" + loss parallel" if not p.disable_loss_parallel else ""))
    if float8_requested(cfg.model.converters):
        f8 = cfg.quantize.linear.float8
        out.append(f"float8 {f8.recipe_name}" + (" all-gather" if f8.enable_fsdp_float8_all_gather else ""))
    ac = cfg.activation_checkpoint
    if ac.mode != "none":
        detail = {"selective": f" {ac.selective_ac_option}", "memory_budget": f" {ac.memory_budget:g}"}.get(ac.mode, "")
        out.append(f"AC {ac.mode}{detail}")
    if cfg.compile.enable:
        out.append(f"compile {'+'.join(cfg.compile.components)} ({cfg.compile.backend})")
    t = cfg.training
    if t.mixed_precision_param != "float32" and t.mixed_precision_param != "auto":
        out.append(t.mixed_precision_param)
    if t.loss_chunk_size:
        out.append("loss chunks")
    if t.enable_cpu_offload:
        out.append("CPU offload")
    if _accumulation(t.global_batch_size, t.local_batch_size, layout["dp_replicate"] * layout["dp_shard"]) > 1:
        out.append("gradient accumulation")
    if cfg.validation.enable:
        out.append("validation")
    if cfg.checkpoint.enable:
        mode = "sync" if cfg.checkpoint.async_mode == "disabled" else cfg.checkpoint.async_mode
        out.append(f"checkpoint save ({mode}) + resume")
    return out


def _layout_text(layout: dict[str, int]) -> str:
    active = [f"{d} {n}" for d, n in layout.items() if n > 1]
    return ", ".join(active) if active else "one process"


# ---------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    ok: bool
    seconds: float
    folder: Path
    failure: str = ""
    """What failed, with the failing ranks' first error lines."""


def run_rehearsal(reh: Rehearsal, folder: Path, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Outcome:
    """Train `reh` in `folder` (its dump folder, config and log): 2 steps, then, where the job saves
    checkpoints, a second launch that resumes and trains step 3. Each launch may take `timeout_s`."""
    from torchtitan_like.components.metrics import DROPPED_JSONL
    from torchtitan_like.config.loader import to_toml

    t0 = time.monotonic()
    cfg = copy.deepcopy(reh.cfg)
    cfg.job.dump_folder = str(folder / "run")
    cfg.job.config_file = None
    config = folder / "config.toml"
    phases = [("train", REHEARSAL_STEPS)]
    if reh.resumes:
        phases.append(("resume", REHEARSAL_STEPS + 1))
    log = folder / "step_check.log"
    for phase, steps in phases:
        cfg.training.steps = steps
        # The first launch stands for a run pre-empted after step 2: its last save holds the full state
        # (the job's final-save settings apply when the resumed launch ends).
        resumed_later = phase == "train" and reh.resumes
        cfg.checkpoint.last_save_model_only = reh.cfg.checkpoint.last_save_model_only and not resumed_later
        cfg.checkpoint.last_save_in_hf = reh.cfg.checkpoint.last_save_in_hf and not resumed_later
        config.write_text(to_toml(cfg))
        # Each launch gets the whole timeout (DRY_RUN_STEP_CHECK_TIMEOUT is per launch): the resume's own
        # compile must not be cut short by the time the first launch took.
        rc, why = _launch(config, reh.ranks, log, phase=phase, timeout_s=timeout_s)
        if rc != 0:
            return Outcome(False, time.monotonic() - t0, folder, f"{phase} (steps 1..{steps}) {why}")
        missing = _missing_steps(Path(cfg.job.dump_folder) / "metrics.jsonl", steps)
        if missing:
            return Outcome(False, time.monotonic() - t0, folder,
                           f"{phase}: exited 0 but metrics.jsonl has no finite loss for step(s) {missing}")
        if phase == "resume" and (Path(cfg.job.dump_folder) / DROPPED_JSONL).exists():
            # (A run that starts before step 2 moves the later metrics rows aside: it did not resume there.)
            return Outcome(False, time.monotonic() - t0, folder,
                           f"resume: exited 0 but did not resume from step {REHEARSAL_STEPS}'s checkpoint "
                           f"(it trained from an earlier step: see {DROPPED_JSONL} and the log)")
    return Outcome(True, time.monotonic() - t0, folder)


def _launch(config: Path, ranks: int, log: Path, *, phase: str, timeout_s: float) -> tuple[int, str]:
    """One torchrun launch of the trainer on `ranks` CPU processes; (exit status, why it failed)."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env.update(
        CUDA_VISIBLE_DEVICES="",  # CPU and gloo, also on a GPU node
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1",
        PYTHONPATH=str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
    )
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)
    cmd = [
        sys.executable, "-m", "torchtitan_like.launch", "--nnodes=1", f"--nproc-per-node={ranks}",
        "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "--max-restarts=0", "--role=rank", "--tee=3",
        f"--shutdown-timeout={STOP_GRACE_S}",
        "-m", "torchtitan_like.train", "--job.config_file", str(config),
    ]
    with log.open("a") as out:
        out.write(f"\n===== step check, {phase}: {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            _stop(proc)
            return 124, (f"did not finish within {timeout_s:.0f} s (a hang, or a slow compile: "
                         "DRY_RUN_STEP_CHECK_TIMEOUT=S for run_train.sh, or --timeout S for "
                         "python -m torchtitan_like.step_check, allows S seconds per launch)")
        except BaseException:  # Ctrl-C (the launch has a session of its own: the terminal's SIGINT missed it)
            _stop(proc)
            raise
    if rc == 0:
        return 0, ""
    errors = _error_lines(log)
    return rc, f"exited {rc}" + (f": {'; '.join(errors)}" if errors else "")


def _stop(proc: subprocess.Popen) -> None:
    """Stop a launch: SIGTERM to torchrun, which stops its workers (each in a session of its own) within
    its --shutdown-timeout; SIGKILL to what is left of its process group after that. A second Ctrl-C (or
    SIGTERM, SIGHUP) meanwhile is ignored: it would leave the launch running."""
    main_thread = threading.current_thread() is threading.main_thread()
    stopping = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if main_thread else ()
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in stopping}
    try:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S + 15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _error_lines(log: Path, limit: int = 3) -> list[str]:
    """The launcher's 'rank R exited' lines and the ranks' `error:` lines of the last launch in `log`."""
    text = log.read_text(errors="replace").rsplit("===== step check", 1)[-1]
    found: list[str] = []
    for line in text.splitlines():
        body = line.split("]:", 1)[-1].strip() if line.startswith("[rank") else line.strip()
        if (body.startswith("error:") or " exited with " in body) and body not in found:
            found.append(body)
    return found[:limit]


def _missing_steps(metrics: Path, steps: int) -> list[int]:
    seen: set[int] = set()
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            loss = row.get("loss")
            if isinstance(loss, (int, float)) and loss == loss and abs(loss) != float("inf"):
                seen.add(int(row.get("step", -1)))
    return [s for s in range(1, steps + 1) if s not in seen]


class Terminated(BaseException):
    """SIGTERM or SIGHUP while the step check runs (a scheduler's limit, a closed terminal): raised like Ctrl-C's
    KeyboardInterrupt, so that the launch in flight is stopped and the folder removed, not orphaned by the
    signal's default action (the launch runs in a session of its own)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum, self.name = signum, signal.Signals(signum).name


def _raise_on_termination() -> dict[int, object]:
    """Handlers that raise Terminated for SIGTERM and SIGHUP; the previous handlers, to restore (none off the
    main thread, where Python cannot set them)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, frame: object) -> None:
        raise Terminated(signum)

    return {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGHUP)}


def step_check(cfg: JobConfig, layout: dict[str, int], *, device: str = "cuda", max_ranks: int = DEFAULT_MAX_RANKS,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> int:
    """Rehearse job `cfg` (resolved `layout`) and log the result line; the exit status (0 passed; 130 stopped by
    Ctrl-C, 143 by SIGTERM, 129 by SIGHUP: one `error:` line, its ranks stopped and its folder removed)."""
    from torchtitan_like.train import EXIT_INTERRUPTED

    if cfg.checkpoint.create_seed_checkpoint:
        logger.info("step check: nothing to rehearse: checkpoint.create_seed_checkpoint=true trains no step")
        return 0
    folder: Path | None = None
    previous = _raise_on_termination()
    try:
        reh = rehearsal(cfg, layout, device=device, max_ranks=max_ranks)
        _check_rehearsal(reh)
        plan = (f"{reh.ranks} CPU rank(s) ({_layout_text(reh.layout)}), {reh.cfg.model.flavor}, "
                f"{', '.join(reh.features) or 'no parallelism or extra features'}")
        logger.info("step check: training %d steps%s on %s ...", REHEARSAL_STEPS,
                    " (then a resume and step 3)" if reh.resumes else "", plan)
        folder = Path(tempfile.mkdtemp(prefix="torchtitan_like_step_check_"))
        outcome = run_rehearsal(reh, folder, timeout_s=timeout_s)
    except (KeyboardInterrupt, Terminated) as e:  # (a launch in flight has stopped its ranks by now: _launch)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        how = f"stopped by {e.name}" if isinstance(e, Terminated) else "interrupted by SIGINT (Ctrl-C)"
        print(f"error: step check {how}: its ranks were stopped and its files removed", file=sys.stderr, flush=True)
        return 128 + e.signum if isinstance(e, Terminated) else EXIT_INTERRUPTED
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    skipped = f"; not rehearsed: {'; '.join(reh.not_rehearsed)}" if reh.not_rehearsed else ""
    if outcome.ok:
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("step check passed in %.0f s: %s%s", outcome.seconds, plan, skipped)
        return 0
    print(
        f"error: step check FAILED after {outcome.seconds:.0f} s, {outcome.failure}. The job, with these features "
        f"and this layout, would likely fail the same way; rehearsal: {plan}{skipped}. Every rank's log: "
        f"{folder / 'step_check.log'}",
        file=sys.stderr, flush=True,
    )
    return 1


def _check_rehearsal(reh: Rehearsal) -> None:
    """The trainer's checks on the rehearsal's config, as its ranks will load it: a shrinking that the
    trainer refuses is the step check's limit, and is reported as such (the job passed the dry run)."""
    import torch

    from torchtitan_like.components.float8 import build_float8_converter
    from torchtitan_like.config.loader import load_config, to_toml
    from torchtitan_like.distributed.pipeline import check_schedule_backend
    from torchtitan_like.distributed.utils import param_dtype
    from torchtitan_like.trainer import check_job, check_job_device

    with tempfile.TemporaryDirectory() as folder:
        cfg = copy.deepcopy(reh.cfg)
        cfg.job.dump_folder = folder
        path = Path(folder) / "config.toml"
        path.write_text(to_toml(cfg))
        try:
            loaded = load_config(["--job.config_file", str(path)])
            # As the trainer checks it on the rehearsal's CPU ranks (a GPU job's schedule may need CUDA here).
            check_job_device(loaded, "cpu")
            checked = check_job(loaded, reh.ranks)
            if checked.pp_plan is not None:
                check_schedule_backend(checked.pp_plan, "cpu")
            # The float8 converter's rules between the recipe and the layout (all-gather needs FSDP; CPU autocast).
            build_float8_converter(
                loaded.model.converters, loaded.quantize.linear.float8, parallel_dims=checked.parallel_dims,
                device=torch.device("cpu"), param_dtype=param_dtype(loaded.training, "cpu"), check_device=False,
            )
        except ConfigError as e:
            raise ConfigError(
                f"step check: this job cannot be rehearsed on {reh.ranks} CPU rank(s) ({_layout_text(reh.layout)}) "
                f"of the debug model: {e} (the job's own config passed the dry run; run without DRY_RUN_STEP_CHECK)"
            ) from e


def resolved_layout(cfg: JobConfig, world_size: int) -> dict[str, int]:
    """The job's degrees at `world_size` (data_parallel_shard_degree=-1 resolved), after its checks."""
    from torchtitan_like.trainer import check_job

    pd = check_job(cfg, world_size).parallel_dims
    return {"pp": pd.pp, "dp_replicate": pd.dp_replicate, "dp_shard": pd.dp_shard, "cp": pd.cp, "tp": pd.tp}


def main(argv: list[str] | None = None) -> int:
    from torchtitan_like.train import EXIT_CONFIG_OR_DATA, _setup_logging

    parser = argparse.ArgumentParser(prog="python -m torchtitan_like.step_check")
    parser.add_argument("--world-size", type=int, required=True, help="ranks the job would have (NGPU x NNODES)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="device type of the job's ranks")
    parser.add_argument("--max-ranks", type=int, default=DEFAULT_MAX_RANKS,
                        help=f"CPU processes the rehearsal may start (default {DEFAULT_MAX_RANKS})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds for each launch")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    try:
        from torchtitan_like.config.loader import load_config

        if args.world_size < 1:
            raise ConfigError(f"step check: --world-size {args.world_size} must be >= 1 (the job's ranks, NGPU x NNODES)")
        if not args.timeout > 0:
            raise ConfigError(f"step check: --timeout {args.timeout:g} must be > 0 seconds (each launch's limit)")
        cfg = load_config(rest)
        return step_check(cfg, resolved_layout(cfg, args.world_size), device=args.device, max_ranks=args.max_ranks,
                          timeout_s=args.timeout)
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG_OR_DATA


if __name__ == "__main__":
    sys.exit(main())
