"""Load a JobConfig: defaults < TOML file (with `extends` inheritance) < command-line overrides.

Strict by design: an unknown section or key, a wrong type or a value out of range raises ConfigError
naming the key and the closest valid name. Nothing is silently dropped or changed.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, get_args, get_origin

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from torchtitan_like.config.fields import Key, keys, literal_choices, sections, type_name, unwrap_optional
from torchtitan_like.config.schema import JobConfig
from torchtitan_like.errors import ConfigError

logger = logging.getLogger(__name__)

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _closest(name: str, candidates: list[str]) -> str:
    # The one candidate whose last dotted part is the name: torchtitan's [float8] is our
    # [quantize.linear.float8] (too short a string for a fuzzy match to find).
    tail = [c for c in candidates if c != name and c.rpartition(".")[2].lower() == name.rpartition(".")[2].lower()
            and "." not in name]
    if len(tail) == 1:
        return f" (did you mean '{tail[0]}'?)"
    # Case-insensitive, so 'adamw' suggests 'AdamW' rather than 'Adam'.
    lower = {c.lower(): c for c in candidates}
    match = difflib.get_close_matches(name.lower(), list(lower), n=1, cutoff=0.6 if "." in name else 0.5)
    return f" (did you mean '{lower[match[0]]}'?)" if match else ""


# ---------------------------------------------------------------------------------------------
# TOML files
# ---------------------------------------------------------------------------------------------


def read_toml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, dict[str, Any]]:
    """Read a config file and the files it `extends`, as {dotted section: {key: value}}.

    A child file overrides its parent key by key; `extends` is resolved relative to the child.
    """
    p = Path(path).expanduser().resolve()
    if p in _chain:
        cycle = " -> ".join(str(c) for c in (*_chain, p))
        raise ConfigError(f"config 'extends' cycle: {cycle}")
    if not p.is_file():
        via = f" (extended by {_chain[-1]})" if _chain else " (job.config_file / CONFIG_FILE)"
        what = "is a folder, not a TOML file" if p.is_dir() else "is not a regular file" if p.exists() else None
        raise ConfigError(f"config file {path} {what}{via}" if what else f"config file not found: {path}{via}")
    try:
        text = p.read_text(encoding="utf-8-sig")  # a BOM (some Windows editors write one) is not TOML
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib says "(at end of document)" for an unclosed bracket or string: name the last line.
        where = "" if "line" in str(e) else f" (line {max(1, len(text.splitlines()))}, the last line)"
        raise ConfigError(f"malformed TOML in {p}: {e}{where}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not valid UTF-8: {e}") from None

    base: dict[str, dict[str, Any]] = {}
    if not raw:
        logger.warning("config file %s sets nothing: every key takes its default", p)
    parent = raw.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{p}: 'extends' must be a path string, got {parent!r}")
        base = read_toml(p.parent / Path(parent).expanduser(), (*_chain, p))
    for section, values in _flatten_sections(raw, p).items():
        base.setdefault(section, {}).update(values)
    return base


def _array_of_tables(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _flatten_sections(raw: dict[str, Any], p: Path) -> dict[str, dict[str, Any]]:
    """{"quantize": {"linear": {"float8": {...}}}} -> {"quantize.linear.float8": {...}}; checks names."""
    known = sections()
    out: dict[str, dict[str, Any]] = {}

    def walk(table: dict[str, Any], prefix: str) -> None:
        leaf: dict[str, Any] = {}
        for k, v in table.items():
            path = f"{prefix}{k}"
            if isinstance(v, dict) and path not in keys():
                if path not in known and not any(s.startswith(path + ".") for s in known):
                    if path in _TORCHTITAN_UNSUPPORTED_SECTIONS:
                        raise ConfigError(f"{p}: unknown section [{path}]: {_TORCHTITAN_UNSUPPORTED_SECTIONS[path]}")
                    candidates = list(known) if not prefix else [s for s in known if s.startswith(prefix)]
                    raise ConfigError(f"{p}: unknown section [{path}]{_closest(path, candidates)}")
                walk(v, path + ".")
            elif (path in known or any(s.startswith(path + ".") for s in known)) and path not in keys() \
                    and not _array_of_tables(v):
                raise ConfigError(f"{p}: '{path}' is a section, not a key: write [{path}] and its keys under it (got {path} = {v!r})")
            elif not prefix:
                if _array_of_tables(v):
                    raise ConfigError(f"{p}: [[{k}]] is an array of tables; write [{k}] (single brackets)")
                owners = sorted({kk.rpartition(".")[0] for kk in keys() if kk.rpartition(".")[2] == k})
                hint = (f" (put it under [{owners[0]}])" if len(owners) == 1
                        else f" (it is a key of {', '.join(f'[{o}]' for o in owners)})" if owners
                        else _closest(k, [*known, "extends"]))
                raise ConfigError(f"{p}: unknown top-level key '{k}'; keys belong in a [section]{hint}")
            else:
                leaf[k] = v
        if leaf:
            section = prefix[:-1]
            if section not in known:
                raise ConfigError(f"{p}: [{section}] is a group of sections, not a section: keys {sorted(leaf)}")
            checked = {k: _check_toml_value(f"{section}.{k}", v, p) for k, v in leaf.items()}
            out[section] = {k: v for k, v in checked.items() if v is not _INERT}

    walk(raw, "")
    return out


def _check_toml_value(dotted: str, value: Any, p: Path) -> Any:
    # Checked per file (not after the `extends` merge) so the message names the file holding the key.
    key = keys().get(dotted)
    if key is None:
        if _inert_torchtitan_setting(dotted, value, origin=str(p)):
            return _INERT
        raise _unknown_key(dotted, origin=str(p))
    if isinstance(value, str) and (dotted, value) in _TORCHTITAN_HF_DATASETS:
        return value  # (load_config reads it as "hf")
    try:
        return coerce(key, value, from_cli=False)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_cli(argv: list[str]) -> list[tuple[str, str | None]]:
    """`--a.b v`, `--a.b=v`, `--a.b` (flag) and `--a.no_b` as [(dotted key, raw value or None)]."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"unexpected command-line argument '{arg}': overrides look like --section.key value")
        body = arg[2:]
        if "=" in body:
            name, value = body.split("=", 1)
            out.append((name, value))
            i += 1
            continue
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        key = keys().get(body)
        takes_flag = key is not None and unwrap_optional(key.type)[0] is bool
        negated = _negated(body)
        if key is None and negated is None:
            if body in _TORCHTITAN_INERT and nxt is not None and not nxt.startswith("--"):
                out.append((body, nxt))  # (load_config accepts it at a value that asks for nothing)
                i += 2
                continue
            raise _unknown_key(body, origin="command line")
        if takes_flag or negated is not None:
            if nxt is not None and nxt.lower() in _TRUE | _FALSE:
                out.append((body, nxt))
                i += 2
            elif nxt is not None and not nxt.startswith("--"):
                # (Nothing else may follow a switch: every override starts with --.)
                raise ConfigError(f"--{body} is a switch: give it alone, or with true or false, not {nxt!r}")
            else:
                out.append((body, None))
                i += 1
            continue
        if nxt is None or (nxt.startswith("--") and "." in nxt and not _is_number(nxt)):
            raise ConfigError(f"--{body} needs a value: --{body} VALUE or --{body}=VALUE")
        out.append((body, nxt))
        i += 2
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _negated(dotted: str) -> str | None:
    """'metrics.no_enable_tensorboard' -> 'metrics.enable_tensorboard' when that is a bool key."""
    section, _, name = dotted.rpartition(".")
    if name.startswith("no_"):
        target = f"{section}.{name[3:]}"
        k = keys().get(target)
        if k is not None and unwrap_optional(k.type)[0] is bool:
            return target
    return None


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


def coerce(key: Key, value: Any, *, from_cli: bool) -> Any:
    """Check (TOML) or parse (CLI string) one value against the key's declared type."""
    where = f"--{key.dotted}" if from_cli else key.dotted
    tp, optional = unwrap_optional(key.type)
    if optional and (value is None or (from_cli and isinstance(value, str) and value.lower() in ("none", "null", ""))):
        return None
    choices = literal_choices(tp)
    if choices is not None:
        if value not in choices:
            known = _TORCHTITAN_VALUES.get((key.dotted, value)) if isinstance(value, str) else None  # (a list is unhashable)
            hint = known or _closest(str(value), [str(c) for c in choices])
            raise ConfigError(f"{where}={value!r} is not one of {', '.join(map(repr, choices))}{hint}")
        return value
    if get_origin(tp) is list:
        (item,) = get_args(tp)
        if from_cli and isinstance(value, str) and value.strip().startswith("["):
            # TOML's own array syntax: --quantize.linear.float8.filter_fqns '[]', --model.converters '["float8"]'.
            try:
                value = tomllib.loads(f"v = {value.strip()}")["v"]
            except tomllib.TOMLDecodeError:
                raise ConfigError(
                    f"{where}={value!r} is not a TOML array: write it as in the TOML file (e.g. '[\"a\", \"b\"]', "
                    "'[]' for none) or as comma-separated items (a,b; an empty value for none)"
                ) from None
        elif from_cli and isinstance(value, str):
            # A list of lists on the command line: ';' separates the outer items, ',' the inner ones.
            sep = ";" if get_origin(unwrap_optional(item)[0]) is list else ","
            value = [v.strip() for v in value.split(sep) if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list of {type_name(item)}, got {value!r}")
        inner = Key(key.section, key.name, item, None, "")
        return [coerce(inner, v, from_cli=from_cli) for v in value]
    if tp is bool:
        if from_cli and isinstance(value, str):
            if value.lower() in _TRUE:
                return True
            if value.lower() in _FALSE:
                return False
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if from_cli and isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"{where} must be an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if from_cli and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            hint = f' (in TOML, quote it: "{value}")' if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
            raise ConfigError(f"{where} must be a string, got {value!r}{hint}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # e.g. a Latin-1 file name in argv: config.toml could not hold it
            raise ConfigError(f"{where}={value!r} is not valid UTF-8 (rename the file or folder)") from None
        if "\x00" in value:  # (no path can hold one: open() would raise a ValueError mid-run)
            raise ConfigError(f"{where}={value!r} contains a NUL character")
        return value
    raise AssertionError(f"config type {type_name(key.type)} of {key.dotted} has no parser")


# torchtitan's former names of keys we have (a fuzzy match finds the wrong key for these: enable_checkpoint
# came out as create_seed_checkpoint, which saves a seed checkpoint and exits).
_TORCHTITAN_FORMER = {
    "checkpoint.enable_checkpoint": "checkpoint.enable",
    "checkpoint.model_weights_only": "checkpoint.last_save_model_only",
    "training.compile": "compile.enable",
    "training.batch_size": "training.local_batch_size",
    "validation.enabled": "validation.enable",
    "job.print_args": "job.print_config",
}

# torchtitan's names of Hugging Face hub datasets: read as "hf" with these settings where the job gives none
# (its dataset_path, a local copy in the hub's format, is read as it is there).
_TORCHTITAN_HF_DATASETS = {
    ("training.dataset", "c4"): {"dataset_path": "allenai/c4", "dataset_config": "en"},
    ("validation.dataset", "c4_validation"): {"dataset_path": "allenai/c4", "dataset_config": "en",
                                              "dataset_split": "validation"},
}

# torchtitan's dataset names that we have no data for, with the settings that read it here.
_TORCHTITAN_VALUES = {
    ("training.dataset", "c4_test"): (
        ' (torchtitan\'s c4_test is a small copy of c4 in its repository: training.dataset = "local" with '
        "training.dataset_path naming those files)"
    ),
}

# torchtitan keys for what we deliberately do not have, with what to use instead.
_MOE = "mixture-of-experts models are not supported (parallelism.expert_parallel_degree is reserved for them)"
_TORCHTITAN_UNSUPPORTED = {
    "metrics.enable_wandb": (
        "Weights & Biases is not supported (not a dependency, and training nodes often have no network): the "
        "metrics go to TensorBoard (metrics.enable_tensorboard) and to metrics.jsonl in the dump folder"
    ),
    "metrics.save_for_all_ranks": "not supported: rank 0 writes the job's metrics (metrics.jsonl, TensorBoard)",
    "metrics.disable_color_printing": "not needed: the log has no colors",
    "lr_scheduler.lr_min": (
        "torchtitan's name for the final learning rate as a fraction of optimizer.lr: use lr_scheduler.min_lr_factor"
    ),
    "comm.mode": "the dry run is chosen by the environment here: COMM_MODE=fake_backend ./run_train.sh (see README)",
    "job.save_config_file": "not needed: every run writes its resolved config to <job.dump_folder>/config.toml",
    "job.custom_config_module": "not supported: models and their settings are registered in torchtitan_like/models",
    "checkpoint.enable_ft_dataloader_checkpoints": "TorchFT is not supported (see [fault_tolerance])",
    "checkpoint.initial_load_in_hf_quantized": (
        "not supported: quantized Hugging Face weights are not read; load bfloat16 or float32 safetensors"
    ),
    "parallelism.context_parallel_load_balancer": (
        "not needed: context parallel always balances causal attention (each rank holds a head and a tail "
        "chunk of every sequence)"
    ),
    "parallelism.expert_parallel_comm_backend": _MOE,
    "parallelism.pipeline_parallel_expert_parallel_overlap": _MOE,
    "activation_checkpoint.preserve_rng_state": (
        "not needed: the model draws no random numbers in forward (no dropout), so a recomputation is exact"
    ),
    "activation_checkpoint.determinism_check": "not supported: torch's default check of recomputed shapes runs",
    "activation_checkpoint.debug": "not supported: profiling.enable_profiling records what each block recomputes",
    "model.print_after_conversion": "not supported: the start-up log summarizes the model and its float8 conversion",
    "job.use_for_integration_test": "torchtitan's marker for its own test suite: remove it",
    "training.gc_debug": "not supported: training.gc_freq schedules the garbage collection",
    "optimizer.early_step_in_backward": (
        "not supported: the optimizer steps after the whole backward, which gradient clipping needs"
    ),
    "parallelism.enable_compiled_autograd": (
        "not supported: compile.enable compiles each block's forward and, through AOTAutograd, its backward"
    ),
    "parallelism.pipeline_parallel_split_points": (
        "not supported: set parallelism.pipeline_parallel_layers_per_stage, or name each stage's modules with "
        "parallelism.module_fqns_per_model_part"
    ),
    "parallelism.expert_tensor_parallel_degree": _MOE,
    "debug.moe_force_load_balance": _MOE,
    "activation_checkpoint.per_op_sac_force_recompute_mm_shapes_by_fqns": (
        "not supported: it serves the router of mixture-of-experts models, which this trainer does not have"
    ),
    "activation_checkpoint.early_stop": "not supported: use mode = \"selective\" (selective_ac_option) or \"full\"",
    "activation_checkpoint.visualize_memory_budget_pareto": (
        "not supported: it needs plotting libraries this trainer does not install; compare memory_budget values by "
        "the mem_gib of their runs"
    ),
}

# Those of the keys above whose value asks for nothing (the feature's off switch, or what this trainer does
# anyway): accepted with a note, so torchtitan's own TOMLs, which set some of them so, load unchanged; any
# other value is refused as above.
_OFF = frozenset({False})
_TORCHTITAN_INERT: dict[str, frozenset[Any]] = {
    "metrics.enable_wandb": _OFF,
    "metrics.save_for_all_ranks": _OFF,
    "metrics.disable_color_printing": frozenset({False, True}),  # (no colors here either way)
    "model.print_after_conversion": _OFF,
    "training.gc_debug": _OFF,
    "optimizer.early_step_in_backward": _OFF,
    "parallelism.enable_compiled_autograd": _OFF,
    "parallelism.expert_tensor_parallel_degree": frozenset({1}),
    "parallelism.context_parallel_load_balancer": frozenset({"headtail"}),  # (what context parallel does here)
    "checkpoint.enable_ft_dataloader_checkpoints": _OFF,
    "checkpoint.initial_load_in_hf_quantized": _OFF,
    "activation_checkpoint.preserve_rng_state": frozenset({False, True}),  # (no randomness in forward)
    "activation_checkpoint.debug": _OFF,
    "debug.moe_force_load_balance": _OFF,
    "comm.mode": frozenset({"default"}),
}
_INERT = object()
"""What _check_toml_value returns for such a setting: dropped from the file's values."""


def _inert_torchtitan_setting(dotted: str, value: Any, *, origin: str) -> bool:
    """True (and one info line) for a torchtitan key we lack set to a value that asks for nothing here."""
    inert = _TORCHTITAN_INERT.get(dotted)
    if inert is None:
        return False
    if isinstance(value, str) and origin == "command line":  # (a CLI value is a string)
        low = value.lower()
        value = True if low in _TRUE - {"1"} else False if low in _FALSE - {"0"} else int(value) if value.isdigit() else value
    if isinstance(value, bool) != any(isinstance(v, bool) for v in inert) or value not in inert:
        return False
    logger.info("%s: %s = %r is torchtitan's and asks for nothing here: ignored (%s)", origin, dotted, value,
                _TORCHTITAN_UNSUPPORTED[dotted])
    return True


# torchtitan sections for what we deliberately do not have.
_TORCHTITAN_UNSUPPORTED_SECTIONS = {
    "memory_estimation": (
        "not supported: the dry run (COMM_MODE=fake_backend, see README) and tools/plan.py estimate each "
        "rank's memory before a job starts"
    ),
    "fault_tolerance": (
        "TorchFT is not supported: a failed or pre-empted job resumes from its latest complete checkpoint "
        "(torchrun restarts, MAX_RESTARTS)"
    ),
    "experimental": "not supported: models are registered in torchtitan_like/models (MODELS)",
    "training.dataloader": (
        "not needed: batches are prepared by a background thread (training.prefetch_batches), not by worker processes"
    ),
    "validation.dataloader": "not needed: held-out batches are read by the validator itself, not by worker processes",
    "quantize.grouped_mm": _MOE,
    "mx": "MXFP8 is not supported (it needs Blackwell GPUs): float8 is under [quantize.linear.float8]",
    "quantize.linear.mx": "MXFP8 is not supported (it needs Blackwell GPUs): float8 is under [quantize.linear.float8]",
}

# Keys whose value is a filesystem path: a leading ~ is the user's home, as in a shell.
PATH_KEYS = (
    "job.config_file", "job.dump_folder", "model.tokenizer_path", "model.hf_assets_path", "training.dataset_path",
    "validation.dataset_path",
    "checkpoint.initial_load_path", "parallelism.pipeline_parallel_schedule_csv",
    # (Relative to job.dump_folder unless absolute; ~ makes one absolute, as it does in a shell.)
    "checkpoint.folder", "metrics.save_tb_folder", "comm.save_traces_folder", "profiling.save_traces_folder",
    "profiling.save_memory_snapshot_folder",
)


def _unknown_key(dotted: str, *, origin: str) -> ConfigError:
    if dotted in sections():
        example = next(k for k in keys() if k.startswith(dotted + "."))
        return ConfigError(f"{origin}: '{dotted}' is a section, not a key: set its keys, e.g. {example}")
    if dotted.rpartition(".")[2] == "extends" and origin != "command line":
        return ConfigError(f"{origin}: extends is read only at the top of a file, before any [section] header "
                           f"(here it is {dotted})")
    if dotted in _TORCHTITAN_UNSUPPORTED:
        return ConfigError(f"{origin}: unknown key '{dotted}': {_TORCHTITAN_UNSUPPORTED[dotted]}")
    if dotted in _TORCHTITAN_FORMER:
        return ConfigError(f"{origin}: unknown key '{dotted}' (torchtitan's former name: use "
                           f"'{_TORCHTITAN_FORMER[dotted]}')")
    section, _, name = dotted.rpartition(".")
    # (The section or one above it: quantize.grouped_mm.float8.fqns is under quantize.grouped_mm.)
    unsupported = next((s for s in _TORCHTITAN_UNSUPPORTED_SECTIONS if section == s or section.startswith(s + ".")), None)
    if unsupported is not None:
        return ConfigError(f"{origin}: unknown section '{unsupported}': {_TORCHTITAN_UNSUPPORTED_SECTIONS[unsupported]}")
    if section and section not in sections():
        return ConfigError(f"{origin}: unknown section '{section}'{_closest(section, list(sections()))}")
    # The same key name in another section (torchtitan keeps some keys elsewhere, e.g. training.seed
    # vs debug.seed) is the likeliest meaning; else the closest dotted name.
    elsewhere = [k for k in keys() if k.rpartition(".")[2] == name]
    if len(elsewhere) == 1:
        hint = f" (did you mean '{elsewhere[0]}'?)"
    elif elsewhere:
        more = ", ..." if len(elsewhere) > 4 else ""
        hint = f" (did you mean one of {', '.join(repr(k) for k in elsewhere[:4])}{more}?)"
    else:
        hint = _closest(dotted, list(keys()))
    return ConfigError(f"{origin}: unknown key '{dotted}'{hint}")


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def load_config(argv: list[str]) -> JobConfig:
    """Build the JobConfig for a command line (config file named by --job.config_file)."""
    overrides = parse_cli(argv)
    config_file = None
    for name, value in overrides:
        if name == "job.config_file":
            config_file = coerce(keys()[name], value, from_cli=True)  # "none" unsets it, like any optional key
    values: dict[str, Any] = {}
    hub_names: dict[str, str] = {}  # dataset key -> the torchtitan name it was given
    if config_file:
        for section, table in read_toml(config_file).items():
            for name, value in table.items():
                dotted = f"{section}.{name}"
                key = keys().get(dotted)
                if key is None:
                    raise _unknown_key(dotted, origin=str(config_file))
                if isinstance(value, str) and (dotted, value) in _TORCHTITAN_HF_DATASETS:
                    hub_names[dotted], value = value, "hf"
                if dotted == "job.config_file":
                    # (A resolved config.toml records the file it came from; a file names the next one by extends.)
                    logger.info("%s: job.config_file = %r is a record only, not read (to build on a file, write "
                                "extends = %r at the top)", config_file, value, value)
                    continue
                values[dotted] = coerce(key, value, from_cli=False)
    given_on_cli: dict[str, Any] = {}
    for name, raw in overrides:
        target = name
        negated = _negated(name)
        key = keys().get(name)
        if key is None and negated is not None:
            target, key = negated, keys()[negated]
            if raw is not None and raw.lower() not in _TRUE | _FALSE:
                raise ConfigError(f"--{name}={raw!r} must be true or false")
            raw = "false" if raw is None or raw.lower() in _TRUE else "true"
        if key is None and _inert_torchtitan_setting(name, raw, origin="command line"):
            continue
        if key is None:
            raise _unknown_key(name, origin="command line")
        if raw is None:
            raw = "true"
        if (target, raw) in _TORCHTITAN_HF_DATASETS:
            hub_names[target], raw = raw, "hf"
        elif target in hub_names:
            del hub_names[target]
        value = coerce(key, raw, from_cli=True)
        if target in given_on_cli and given_on_cli[target] != value:
            # (A script's overrides followed by the user's: legitimate, but never silently.)
            logger.warning("--%s is given twice on the command line (%r, then %r): the last one wins", target,
                           given_on_cli[target], value)
        given_on_cli[target] = values[target] = value
    for dotted, name in hub_names.items():
        section = dotted.rpartition(".")[0]
        settings = {f"{section}.{k}": v for k, v in _TORCHTITAN_HF_DATASETS[(dotted, name)].items()}
        for k, v in settings.items():
            values.setdefault(k, v)
        logger.info("%s = %r (torchtitan's name): the Hugging Face hub dataset, read as %s = \"hf\" with %s", dotted,
                    name, dotted, ", ".join(f"{k} = {values[k]!r}" for k in settings))
    for dotted in PATH_KEYS:
        if isinstance(values.get(dotted), str) and values[dotted].startswith("~"):
            values[dotted] = os.path.expanduser(values[dotted])
    cfg = build(values)
    from torchtitan_like.config.validate import validate

    validate(cfg)
    return cfg


def build(values: dict[str, Any]) -> JobConfig:
    cfg = JobConfig()
    for dotted, value in values.items():
        section, _, name = dotted.rpartition(".")
        obj: Any = cfg
        for part in section.split("."):
            obj = getattr(obj, part)
        setattr(obj, name, value)
    hf_assets = cfg.model.hf_assets_path
    if hf_assets:
        # torchtitan's meaning of the key: the tokenizer, and the Hugging Face weights to start from, are there
        # unless given apart. (The resolved config.toml then names them.)
        if not cfg.model.tokenizer_path:
            cfg.model.tokenizer_path = hf_assets
        if cfg.checkpoint.initial_load_in_hf and not cfg.checkpoint.initial_load_path:
            cfg.checkpoint.initial_load_path = hf_assets
    if cfg.validation.enable and cfg.validation.seq_len is None:
        # Validation sequences as long as the training ones unless set (left unset while validation is off,
        # so the unused-settings warning does not name it).
        cfg.validation.seq_len = cfg.training.seq_len
    return cfg


def to_dict(cfg: JobConfig) -> dict[str, dict[str, Any]]:
    """{dotted section: {key: value}} of every key (the fully resolved config)."""
    out: dict[str, dict[str, Any]] = {}
    for key in keys().values():
        obj: Any = cfg
        for part in key.section.split("."):
            obj = getattr(obj, part)
        out.setdefault(key.section, {})[key.name] = getattr(obj, key.name)
    return out


def to_toml(cfg: JobConfig) -> str:
    """The resolved config as TOML that `load_config` reads back to an equal JobConfig."""
    lines: list[str] = []
    for section, table in to_dict(cfg).items():
        lines.append(f"[{section}]")
        for name, value in table.items():
            if value is None:
                lines.append(f"# {name} = (unset)")
            else:
                lines.append(f"{name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def config_hash(cfg: JobConfig) -> str:
    """A short digest of the resolved config, recorded in each checkpoint's manifest."""
    return hashlib.sha256(to_toml(cfg).encode()).hexdigest()[:16]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + "".join(_toml_char(c) for c in v) + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise AssertionError(f"cannot write {v!r} as TOML")


_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_char(c: str) -> str:
    """One character of a TOML basic string: quote, backslash and control characters escaped."""
    if c in _TOML_ESCAPES:
        return _TOML_ESCAPES[c]
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"\\u{ord(c):04x}"
    return c
