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

SEED_RANGE: tuple[str, Callable[[Any], bool]] = (
    "in [-2**63, 2**64) (what torch.manual_seed takes)", lambda v: -(2**63) <= v < 2**64)
"""The rule of a seed (debug.seed, tools/generate.py --seed) and its check."""

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
    "lr_scheduler.total_steps": (">= 1 (unset = training.steps)", lambda v: v >= 1),
    "training.local_batch_size": (">= 1", lambda v: v >= 1),
    "training.global_batch_size": ("-1 or >= 1", lambda v: v == -1 or v >= 1),
    "training.seq_len": (">= 2", lambda v: v >= 2),
    "training.max_norm": (">= 0", lambda v: v >= 0),
    "training.loss_chunk_size": (">= 0 (0 = no chunking)", lambda v: v >= 0),
    "training.steps": (">= 1 (or 0 to evaluate loaded weights, with checkpoint.load_only)", lambda v: v >= 0),
    "training.gc_freq": (">= 0", lambda v: v >= 0),
    "training.prefetch_batches": (">= 0", lambda v: v >= 0),
    "metrics.log_freq": (">= 1", lambda v: v >= 1),
    "metrics.peak_tflops": ("> 0", lambda v: v > 0),
    "model.max_seq_len": (">= 2", lambda v: v >= 2),
    "model.n_layers": (">= 1", lambda v: v >= 1),
    "checkpoint.interval": (">= 1", lambda v: v >= 1),
    "checkpoint.keep_latest_k": (">= 0 (0 keeps all)", lambda v: v >= 0),
    "checkpoint.load_step": ("-1 (latest) or >= 0", lambda v: v >= -1),
    "comm.init_timeout_seconds": (">= 1", lambda v: v >= 1),
    "comm.train_timeout_seconds": (">= 1", lambda v: v >= 1),
    "comm.trace_buf_size": (">= 0 (0 = off)", lambda v: v >= 0),
    "profiling.profile_freq": (">= 1", lambda v: v >= 1),
    "profiling.profiler_warmup": (">= 0", lambda v: v >= 0),
    "profiling.profiler_active": (">= 1", lambda v: v >= 1),
    "validation.freq": (">= 1", lambda v: v >= 1),
    "validation.steps": ("-1 (the whole dataset) or >= 1", lambda v: v == -1 or v >= 1),
    "validation.local_batch_size": (">= 1", lambda v: v >= 1),
    "validation.global_batch_size": ("-1 or >= 1", lambda v: v == -1 or v >= 1),
    "validation.seq_len": (">= 2", lambda v: v >= 2),
    "debug.seed": SEED_RANGE,
    "debug.fail_at_step": (">= 0 (0 = never)", lambda v: v >= 0),
    "debug.fail_rank": ("-1 (every rank) or >= 0", lambda v: v >= -1),
    "debug.hang_at_step": (">= 0 (0 = never)", lambda v: v >= 0),
    "debug.hang_rank": ("-1 (every rank) or >= 0", lambda v: v >= -1),
    "parallelism.data_parallel_replicate_degree": (">= 1", lambda v: v >= 1),
    "parallelism.data_parallel_shard_degree": ("-1 or >= 1", lambda v: v == -1 or v >= 1),
    "parallelism.tensor_parallel_degree": (">= 1", lambda v: v >= 1),
    "parallelism.context_parallel_degree": (">= 1", lambda v: v >= 1),
    "parallelism.pipeline_parallel_degree": (">= 1", lambda v: v >= 1),
    "parallelism.expert_parallel_degree": (">= 1", lambda v: v >= 1),
    "parallelism.pipeline_parallel_microbatch_size": (">= 1", lambda v: v >= 1),
    "parallelism.pipeline_parallel_layers_per_stage": (">= 1", lambda v: v >= 1),
    "parallelism.pipeline_parallel_first_stage_less_layers": (">= 0", lambda v: v >= 0),
    "parallelism.pipeline_parallel_last_stage_less_layers": (">= 0", lambda v: v >= 0),
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

    if not cfg.job.dump_folder.strip():
        raise ConfigError('job.dump_folder is empty: name a folder (e.g. "." for the current one)')
    spec = MODELS.get(cfg.model.name)
    if spec is None:
        raise ConfigError(f"model.name={cfg.model.name!r} is unknown; available: {', '.join(MODELS)}")
    if cfg.model.flavor not in spec.flavors:
        raise ConfigError(
            f"model.flavor={cfg.model.flavor!r} is not a {cfg.model.name} flavor; available: {', '.join(spec.flavors)}"
        )
    t = cfg.training
    if t.dataset in ("local", "hf", "indexed") and not t.dataset_path:
        raise ConfigError(
            f"training.dataset={t.dataset!r} needs training.dataset_path (a file, folder or glob for local; a hub name "
            "for hf; PREFIX of PREFIX.bin + PREFIX.idx for indexed)"
        )
    if t.dataset == "indexed" and t.dataset_path:
        _validate_blend(t.dataset_path, t.dataset_weights)
    c = cfg.checkpoint
    if c.create_seed_checkpoint and not c.enable:
        raise ConfigError("checkpoint.create_seed_checkpoint=true needs checkpoint.enable=true")
    if c.last_save_in_hf and not c.enable:
        raise ConfigError("checkpoint.last_save_in_hf=true needs checkpoint.enable=true (it is part of the final save)")
    for key in ("enable_first_step_checkpoint", "load_only"):
        if getattr(c, key) and not c.enable:
            raise ConfigError(f"checkpoint.{key}=true needs checkpoint.enable=true")
    if c.load_only:
        saving = [k for k in ("create_seed_checkpoint", "enable_first_step_checkpoint", "last_save_in_hf") if getattr(c, k)]
        if saving:
            raise ConfigError(
                f"checkpoint.load_only=true never saves, but checkpoint.{saving[0]}=true asks for a save: set one of "
                "them to false"
            )
    if cfg.training.steps == 0 and not (c.load_only and cfg.validation.enable):
        raise ConfigError(
            "training.steps=0 trains nothing: it is for evaluating loaded weights (checkpoint.load_only=true with "
            "[validation] enable=true, and a checkpoint or checkpoint.initial_load_path to load); to train, use "
            "training.steps >= 1"
        )
    # Settings of an initial load that has nothing to load would be silently ignored (a fine-tune
    # would start from random weights).
    if not c.initial_load_path and (c.initial_load_in_hf or not c.initial_load_model_only):
        which = "initial_load_in_hf=true" if c.initial_load_in_hf else "initial_load_model_only=false"
        raise ConfigError(
            f"checkpoint.{which} needs checkpoint.initial_load_path (a Hugging Face safetensors folder or file for "
            "initial_load_in_hf, else a DCP step folder){', or model.hf_assets_path' if c.initial_load_in_hf else ''}"
        )
    if c.initial_load_in_hf and not c.initial_load_model_only:
        raise ConfigError(
            "checkpoint.initial_load_model_only=false with initial_load_in_hf=true: Hugging Face safetensors hold "
            "only the weights; set initial_load_model_only=true, or load a DCP checkpoint for the whole state"
        )
    if t.dtype == "bfloat16" and t.mixed_precision_param == "float32":
        raise ConfigError(
            'training.dtype="bfloat16" stores the parameters in bf16, but training.mixed_precision_param="float32" '
            'asks to compute in float32: set mixed_precision_param to "auto" or "bfloat16", or dtype to "float32"'
        )
    max_seq = cfg.model.max_seq_len
    if max_seq is not None and t.seq_len > max_seq:
        raise ConfigError(
            f"training.seq_len={t.seq_len} exceeds model.max_seq_len={max_seq}: raise model.max_seq_len or lower training.seq_len"
        )
    _validate_profiling_and_validation(cfg)
    _validate_features(cfg)


def resolve_global_batch(section: str, local: int, global_batch: int, dp_degree: int, *, offer_local: bool = True) -> int:
    """`{section}.global_batch_size` resolved (-1 = local x dp_degree) and checked: every data-parallel
    rank reads a whole number of microbatches of `{section}.local_batch_size`. The error offers the
    nearest global sizes and, with `offer_local` (not under pipeline parallel, where the local batch is
    fixed), the local sizes that divide the requested global one."""
    if local < 1:
        raise ConfigError(f"{section}.local_batch_size={local} must be >= 1")
    per_step = local * dp_degree
    if global_batch == -1:
        return per_step
    if global_batch >= 1 and global_batch % per_step == 0:
        return global_batch
    lower = max(global_batch // per_step, 1) * per_step
    hint = f"{section}.global_batch_size={lower}" + ("" if global_batch < lower else f" or {lower + per_step}")
    if offer_local and global_batch >= 1 and global_batch % dp_degree == 0:
        per_rank = global_batch // dp_degree
        hint += f", or {section}.local_batch_size in {[d for d in range(1, per_rank + 1) if per_rank % d == 0]}"
    raise ConfigError(
        f"{section}.global_batch_size={global_batch} must be a positive multiple of {section}.local_batch_size={local} "
        f"x data-parallel degree {dp_degree} = {per_step} (try {hint}; -1 means {per_step})"
    )


def indexed_prefixes(dataset_path: str) -> list[str]:
    """The PREFIXes of an indexed dataset_path: one, or several separated by commas (a blend)."""
    return [p.strip() for p in dataset_path.split(",")]


def _validate_blend(dataset_path: str, weights: list[float]) -> None:
    prefixes = indexed_prefixes(dataset_path)
    if len(prefixes) > 1 and not all(prefixes):
        raise ConfigError(f"training.dataset_path={dataset_path!r} has an empty entry: name each PREFIX once, "
                          "separated by commas")
    if len(prefixes) > 1 and not weights:
        raise ConfigError(f"training.dataset_path names {len(prefixes)} indexed datasets (a blend): set "
                          "training.dataset_weights to their relative weights, one each "
                          f"(e.g. {[1.0] * len(prefixes)})")
    if weights and len(weights) != len(prefixes):
        raise ConfigError(f"training.dataset_weights has {len(weights)} weight(s) for the {len(prefixes)} "
                          f"prefix(es) of training.dataset_path={dataset_path!r}: give one weight per prefix")
    if any(w <= 0 for w in weights):
        raise ConfigError(f"training.dataset_weights={weights} must all be > 0 (leave a dataset out of "
                          "training.dataset_path instead of giving it weight 0)")


def _validate_profiling_and_validation(cfg: JobConfig) -> None:
    """[profiling] schedule and [validation] data rules. enable_memory_snapshot needs a GPU: checked by
    the trainer, which knows the device."""
    p = cfg.profiling
    if p.enable_profiling and p.profile_freq < p.profiler_warmup + p.profiler_active:
        raise ConfigError(
            f"profiling.profile_freq={p.profile_freq} must be >= profiler_warmup({p.profiler_warmup}) + "
            f"profiler_active({p.profiler_active}) = {p.profiler_warmup + p.profiler_active}: every capture "
            f"fits in one period; raise profile_freq or lower the others"
        )
    v = cfg.validation
    if not v.enable:
        return
    if v.dataset in ("local", "hf", "indexed") and not v.dataset_path:
        raise ConfigError(
            f"validation.dataset={v.dataset!r} needs validation.dataset_path (a file, folder or glob for local; a hub "
            "name for hf; PREFIX of PREFIX.bin + PREFIX.idx for indexed)"
        )
    if v.dataset == "indexed" and len(indexed_prefixes(v.dataset_path)) > 1:
        raise ConfigError(
            f"validation.dataset_path={v.dataset_path!r} names {len(indexed_prefixes(v.dataset_path))} indexed datasets "
            "(a blend, which training reads): validation reads one PREFIX; validate on each in its own run, or "
            "pretokenize the held-out text into one pair"
        )
    if v.dataset == "synthetic" and v.steps == -1:
        raise ConfigError(
            "validation.dataset=\"synthetic\" never ends, so validation.steps=-1 (the whole dataset) would never "
            "finish: set validation.steps to a number of batches"
        )
    par = cfg.parallelism
    if (par.context_parallel_degree > 1 or par.pipeline_parallel_degree > 1) and v.seq_len != cfg.training.seq_len:
        # (check_layout says so too, later; this rule comes first, and its other fixes do not apply here.)
        raise ConfigError(
            f"validation.seq_len={v.seq_len} must equal training.seq_len={cfg.training.seq_len} under context or "
            f"pipeline parallel (their buffers and stage shapes are the training ones): set validation.seq_len="
            f"{cfg.training.seq_len}"
        )
    rope_len = cfg.model.max_seq_len or cfg.training.seq_len
    if v.seq_len > rope_len:
        which = "model.max_seq_len" if cfg.model.max_seq_len else "training.seq_len (the model's RoPE length)"
        raise ConfigError(
            f"validation.seq_len={v.seq_len} exceeds {which}={rope_len}: lower validation.seq_len to at most "
            f"{rope_len} or raise model.max_seq_len"
        )


def _validate_features(cfg: JobConfig) -> None:
    """Model converters, activation checkpointing, torch.compile and float8: rules between their keys.

    Rules that need the world or the device (float8 all-gather needs FSDP, float8 needs an SM89+
    GPU, async TP needs CUDA) are checked where those are known: components/float8.py and
    parallelize.py.
    """
    from torchtitan_like.components.float8 import CONVERTER_NAMES
    from torchtitan_like.distributed.activation_checkpoint import check_memory_budget, parse_selective_option

    converters = cfg.model.converters
    if len(set(converters)) != len(converters):
        raise ConfigError(f"model.converters={converters!r} lists a converter twice")
    float8_names = [c for c in converters if c in CONVERTER_NAMES]
    if len(float8_names) > 1:
        raise ConfigError(
            f"model.converters={converters!r}: 'float8' and 'quantize.linear.float8' are the same converter; keep one"
        )
    parse_selective_option(cfg.activation_checkpoint.selective_ac_option)
    check_memory_budget(cfg.activation_checkpoint, cfg.compile)
    cp = cfg.parallelism.context_parallel_degree
    if cfg.model.attn_mask_type == "block_causal" and cp > 1:
        raise ConfigError(
            f'model.attn_mask_type="block_causal" with parallelism.context_parallel_degree={cp}: context parallel\'s '
            'ring attention is causal over the whole sequence and takes no document mask; use attn_mask_type="causal" '
            "or context_parallel_degree=1"
        )
    if cfg.model.attn_type == "flex" and cp > 1:
        # CP's context turns only F.scaled_dot_product_attention into ring attention: FlexAttention would
        # run on each rank's (head-tail reordered) sequence shard alone, a different model, silently.
        raise ConfigError(
            f'model.attn_type="flex" with parallelism.context_parallel_degree={cp}: context parallel\'s ring '
            "attention replaces SDPA only, so FlexAttention would attend within each rank's shard of the sequence; "
            'use attn_type="sdpa" or context_parallel_degree=1'
        )

    comp = cfg.compile
    if len(set(comp.components)) != len(comp.components):
        raise ConfigError(f"compile.components={comp.components!r} lists a component twice")
    if comp.enable and not comp.components:
        raise ConfigError("compile.enable=true with compile.components=[] compiles nothing: list model and/or loss")
    if cfg.parallelism.enable_async_tensor_parallel and not (comp.enable and "model" in comp.components):
        raise ConfigError(
            "parallelism.enable_async_tensor_parallel=true needs compile.enable=true with \"model\" in "
            "compile.components (async TP is an inductor pass), tensor_parallel_degree > 1 and CUDA; set it to "
            "false or enable compile"
        )
    if cfg.parallelism.enable_async_tensor_parallel and comp.backend != "inductor":
        # Its overlap is a rewrite among inductor's post-grad passes: aot_eager and eager never run them.
        raise ConfigError(
            f"parallelism.enable_async_tensor_parallel=true needs compile.backend=\"inductor\" (async TP is an "
            f"inductor pass, which the {comp.backend!r} backend never runs: TP would stay synchronous): set "
            "compile.backend=\"inductor\" or set enable_async_tensor_parallel=false"
        )

    f8 = cfg.quantize.linear.float8
    if float8_names:
        if f8.enable_fsdp_float8_all_gather and f8.recipe_name != "tensorwise":
            raise ConfigError(
                f"quantize.linear.float8.enable_fsdp_float8_all_gather=true works only with recipe_name=\"tensorwise\" "
                f"(torchao gathers one scale per tensor), not {f8.recipe_name!r}: use tensorwise or set it to false"
            )
        if f8.precompute_float8_dynamic_scale_for_fsdp and not (
            f8.enable_fsdp_float8_all_gather and f8.recipe_name == "tensorwise"
        ):
            raise ConfigError(
                "quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp=true needs recipe_name=\"tensorwise\" "
                f"and enable_fsdp_float8_all_gather=true (got recipe_name={f8.recipe_name!r}, "
                f"enable_fsdp_float8_all_gather={str(f8.enable_fsdp_float8_all_gather).lower()}): set those, or "
                "set it to false"
            )


def ignored_settings(cfg: JobConfig, *, pp: int, dims: Any = None) -> list[str]:
    """Keys set away from their defaults that this job does not use (for a warning at start: a base
    config's pipeline or float8 settings left behind by an override, or the keys of a section switched
    off, are not silently dropped)."""
    from dataclasses import fields

    from torchtitan_like.components.float8 import CONVERTER_NAMES
    from torchtitan_like.config.schema import Checkpoint, Float8, Parallelism, Training

    out = []
    if pp == 1:
        default = Parallelism()
        out += [f"parallelism.{f.name} (pipeline_parallel_degree=1)" for f in fields(Parallelism)
                if (f.name.startswith("pipeline_parallel_") or f.name == "module_fqns_per_model_part")
                and f.name != "pipeline_parallel_degree"
                and getattr(cfg.parallelism, f.name) != getattr(default, f.name)]
    else:
        # Pipeline keys that another one overrides (plan_pipeline never reads them then).
        p, default = cfg.parallelism, Parallelism()
        overridden = []
        if p.pipeline_parallel_schedule_csv is not None:
            overridden.append(("pipeline_parallel_schedule", "pipeline_parallel_schedule_csv gives the schedule"))
        if p.module_fqns_per_model_part is not None:
            overridden += [(key, "module_fqns_per_model_part gives the split") for key in
                           ("pipeline_parallel_first_stage_less_layers", "pipeline_parallel_last_stage_less_layers")]
        out += [f"parallelism.{key} ({why})" for key, why in overridden if getattr(p, key) != getattr(default, key)]
    if not any(c in CONVERTER_NAMES for c in cfg.model.converters):
        default = Float8()
        out += [f"quantize.linear.float8.{f.name} (no float8 in model.converters)" for f in fields(Float8)
                if getattr(cfg.quantize.linear.float8, f.name) != getattr(default, f.name)]
    if dims is not None:  # the job's ParallelDims: keys of parallelisms it does not use
        p, default = cfg.parallelism, Parallelism()
        unused = [
            ("disable_loss_parallel", not dims.tp_enabled, "tensor_parallel_degree=1"),
            ("context_parallel_rotate_method", not dims.cp_enabled, "context_parallel_degree=1"),
            ("fsdp_reshard_after_forward", not dims.fsdp_enabled, "no FSDP: parameters are not sharded"),
        ]
        out += [f"parallelism.{key} ({why})" for key, off, why in unused
                if off and getattr(p, key) != getattr(default, key)]
        if (not dims.fsdp_enabled and not dims.dp_replicate_enabled
                and cfg.training.mixed_precision_reduce != Training().mixed_precision_reduce):
            out.append("training.mixed_precision_reduce (no FSDP or DDP gradient reduction)")
    # Sections switched off by one key: their other keys, set, do nothing.
    switched = [
        ("compile", "enable", lambda c: c.enable, None),
        ("validation", "enable", lambda c: c.enable, None),
        ("training", "dataset", lambda c: c.dataset == "indexed", {"dataset_weights", "dataset_shuffle"}),
        ("metrics", "enable_tensorboard", lambda c: c.enable_tensorboard, {"save_tb_folder"}),
        ("profiling", "enable_profiling", lambda c: c.enable_profiling,
         {"save_traces_folder", "profiler_warmup", "profiler_active"}),
        ("profiling", "enable_profiling", lambda c: c.enable_profiling or c.enable_memory_snapshot, {"profile_freq"}),
        ("profiling", "enable_memory_snapshot", lambda c: c.enable_memory_snapshot, {"save_memory_snapshot_folder"}),
        ("activation_checkpoint", "mode", lambda c: c.mode == "selective", {"selective_ac_option"}),
        ("activation_checkpoint", "mode", lambda c: c.mode == "memory_budget", {"memory_budget"}),
        ("debug", "deterministic", lambda c: c.deterministic, {"deterministic_warn_only"}),
        # (decay_ratio = 0: warmup, then the peak learning rate to the end; there is no decay to shape.)
        ("lr_scheduler", "decay_ratio", lambda c: c.decay_ratio != 0, {"decay_type", "min_lr_factor"}),
        # (The initial_load_* keys work without checkpoint.enable: a run may start from weights and not save.)
        ("checkpoint", "enable", lambda c: c.enable, {"folder", "interval", "async_mode", "keep_latest_k",
                                                     "last_save_model_only", "last_save_in_hf", "export_dtype",
                                                     "load_step"}),
        ("checkpoint", "load_only", lambda c: not c.load_only, {"interval", "async_mode", "keep_latest_k",
                                                                 "last_save_model_only", "export_dtype"}),
    ]
    for section, switch, on, keys in switched:
        value, default = getattr(cfg, section), type(getattr(cfg, section))()
        if on(value):
            continue
        for f in fields(value):
            name = f"{section}.{f.name}"
            if (f.name != switch and (keys is None or f.name in keys)
                    and getattr(value, f.name) != getattr(default, f.name)):
                out.append(f"{name} ({section}.{switch}={_toml(getattr(value, switch))})")
    # The record field: only local and hub sources have records (validation's read training's key).
    sources = {"training": cfg.training.dataset, **({"validation": cfg.validation.dataset} if cfg.validation.enable else {})}
    if cfg.training.dataset_text_field != Training().dataset_text_field and not {"local", "hf"} & set(sources.values()):
        which = ", ".join(f"{section}.dataset={_toml(kind)}" for section, kind in sources.items())
        out.append(f"training.dataset_text_field (no local or hf dataset reads records: {which})")
    # The hub-only keys of a source that is not the hub.
    for section in ("training", "validation"):
        value, default = getattr(cfg, section), type(getattr(cfg, section))()
        if value.dataset == "hf" or (section == "validation" and not value.enable):
            continue
        out += [f"{section}.{key} ({section}.dataset={_toml(value.dataset)}, not hf)"
                for key in ("dataset_split", "dataset_config") if getattr(value, key) != getattr(default, key)]
    # A schedule that never fires in a run of training.steps steps (validation always runs at the last step).
    steps = cfg.training.steps
    if cfg.profiling.enable_profiling and cfg.profiling.profile_freq > steps:
        out.append(f"profiling.enable_profiling (profiling.profile_freq={cfg.profiling.profile_freq} > training.steps="
                   f"{steps}: no trace is captured; lower profiling.profile_freq)")
    c = cfg.checkpoint
    if c.enable and not c.last_save_model_only and not c.last_save_in_hf and c.export_dtype != Checkpoint().export_dtype:
        out.append("checkpoint.export_dtype (no model-only or Hugging Face final save to export)")
    return out


def _toml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value).replace("'", '"')
