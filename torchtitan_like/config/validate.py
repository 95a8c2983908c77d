"""Range and cross-key rules that need no model and no process group.

Rules that need the model (head counts, vocabulary) or the world size live where those are known:
`ParallelDims.validate` and the tokenizer check. Nothing here changes a value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torchtitan_like.config.schema import JobConfig
from torchtitan_like.errors import ConfigError
from torchtitan_like.models import MODELS

# dotted key -> (rule text, predicate). Optional keys are checked only when set.
_RANGES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "optimizer.lr": ("> 0", lambda v: v > 0),
    "optimizer.beta1": ("in [0, 1)", lambda v: 0 <= v < 1),
    "optimizer.beta2": ("in [0, 1)", lambda v: 0 <= v < 1),
    "optimizer.eps": ("> 0", lambda v: v > 0),
    "optimizer.weight_decay": (">= 0", lambda v: v >= 0),
    "lr_scheduler.warmup_steps": (">= 0", lambda v: v >= 0),
    "lr_scheduler.decay_ratio": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "lr_scheduler.min_lr_factor": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "training.local_batch_size": (">= 1", lambda v: v >= 1),
    "training.global_batch_size": ("-1 or >= 1", lambda v: v == -1 or v >= 1),
    "training.seq_len": (">= 2", lambda v: v >= 2),
    "training.max_norm": (">= 0", lambda v: v >= 0),
    "training.steps": (">= 1", lambda v: v >= 1),
    "training.gc_freq": (">= 0", lambda v: v >= 0),
    "metrics.log_freq": (">= 1", lambda v: v >= 1),
    "metrics.peak_tflops": ("> 0", lambda v: v > 0),
    "model.max_seq_len": (">= 2", lambda v: v >= 2),
    "checkpoint.interval": (">= 1", lambda v: v >= 1),
    "checkpoint.keep_latest_k": (">= 0 (0 keeps all)", lambda v: v >= 0),
    "checkpoint.load_step": ("-1 (latest) or >= 0", lambda v: v >= -1),
    "parallelism.data_parallel_replicate_degree": (">= 1", lambda v: v >= 1),
    "parallelism.data_parallel_shard_degree": ("-1 or >= 1", lambda v: v == -1 or v >= 1),
    "parallelism.tensor_parallel_degree": (">= 1", lambda v: v >= 1),
    "parallelism.context_parallel_degree": (">= 1", lambda v: v >= 1),
    "parallelism.pipeline_parallel_degree": (">= 1", lambda v: v >= 1),
    "parallelism.expert_parallel_degree": (">= 1", lambda v: v >= 1),
}


def _get(cfg: JobConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: JobConfig) -> None:
    for dotted, (rule, ok) in _RANGES.items():
        value = _get(cfg, dotted)
        if value is not None and not ok(value):
            raise ConfigError(f"{dotted}={value!r} is out of range: must be {rule}")

    spec = MODELS.get(cfg.model.name)
    if spec is None:
        raise ConfigError(f"model.name={cfg.model.name!r} is unknown; available: {', '.join(MODELS)}")
    if cfg.model.flavor not in spec.flavors:
        raise ConfigError(
            f"model.flavor={cfg.model.flavor!r} is not a {cfg.model.name} flavor; available: {', '.join(spec.flavors)}"
        )
    t = cfg.training
    if t.dataset in ("local", "hf") and not t.dataset_path:
        raise ConfigError(f"training.dataset={t.dataset!r} needs training.dataset_path (a file, folder or glob for local; a hub name for hf)")
    c = cfg.checkpoint
    if c.create_seed_checkpoint and not c.enable:
        raise ConfigError("checkpoint.create_seed_checkpoint=true needs checkpoint.enable=true")
    if (c.initial_load_in_hf or c.last_save_in_hf) and not c.enable:
        which = "initial_load_in_hf" if c.initial_load_in_hf else "last_save_in_hf"
        raise ConfigError(f"checkpoint.{which}=true needs checkpoint.enable=true")
    max_seq = cfg.model.max_seq_len
    if max_seq is not None and t.seq_len > max_seq:
        raise ConfigError(
            f"training.seq_len={t.seq_len} exceeds model.max_seq_len={max_seq}: raise model.max_seq_len or lower training.seq_len"
        )
