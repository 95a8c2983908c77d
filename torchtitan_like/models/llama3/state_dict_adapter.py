"""Llama 3 weights: our (Meta) parameter names <-> Hugging Face `LlamaForCausalLM`, and the HF files.

Two differences besides the names:
- RoPE layout. Meta rotates interleaved pairs (x0, x1), (x2, x3), ...; HF's `rotate_half` rotates the
  first half of each head against the second. The q and k projections' output rows are permuted per
  head so both layouts compute the same attention (GQA: k uses the kv head count).
- Tied embeddings. HF stores no `lm_head.weight` when `tie_word_embeddings`; our state dict lists
  `output.weight` (the same tensor as `tok_embeddings.weight`).

The conversions work on full (unsharded) tensors: gather before `to_hf`, distribute after `from_hf`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from torchtitan_like.components.manifest import CheckpointError
from torchtitan_like.models.llama3.args import RopeScaling, TransformerArgs

HF_CONFIG = "config.json"
HF_SINGLE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"

_LAYER_TO_HF = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_LAYER_FROM_HF = {v: k for k, v in _LAYER_TO_HF.items()}
_TOP_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_TOP_FROM_HF = {v: k for k, v in _TOP_TO_HF.items()}
_OURS_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _rope_rows(w: torch.Tensor, n_heads: int, head_dim: int, name: str, *, to_hf: bool) -> torch.Tensor:
    """Permute the output rows of a q/k projection between the Meta and HF RoPE layouts."""
    rows, cols = w.shape
    if rows != n_heads * head_dim:
        raise CheckpointError(f"{name} has {rows} rows, expected {n_heads} heads x {head_dim} = {n_heads * head_dim}")
    if to_hf:  # per head: (pairs, 2) -> (2, pairs): the reals first, then the imaginaries
        return w.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
    return w.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def to_hf(state_dict: dict[str, torch.Tensor], args: TransformerArgs) -> dict[str, torch.Tensor]:
    """Our full model state dict -> HF LlamaForCausalLM names and RoPE layout."""
    out: dict[str, torch.Tensor] = {}
    for name, w in state_dict.items():
        if name == "output.weight" and args.tie_word_embeddings:
            continue  # HF ties lm_head to embed_tokens itself
        if name in _TOP_TO_HF:
            out[_TOP_TO_HF[name]] = w
            continue
        m = _OURS_LAYER.match(name)
        if m is None or m.group(2) not in _LAYER_TO_HF:
            raise CheckpointError(f"no Hugging Face name for parameter {name!r}")
        layer, rest = m.groups()
        if rest == "attention.wq.weight":
            w = _rope_rows(w, args.n_heads, args.head_dim, name, to_hf=True)
        elif rest == "attention.wk.weight":
            w = _rope_rows(w, args.kv_heads, args.head_dim, name, to_hf=True)
        out[f"model.layers.{layer}.{_LAYER_TO_HF[rest]}"] = w
    return out


def from_hf(hf_state_dict: dict[str, torch.Tensor], args: TransformerArgs) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM state dict -> our names and RoPE layout (with `output.weight` when tied)."""
    out: dict[str, torch.Tensor] = {}
    for name, w in hf_state_dict.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some old HF checkpoints saved; we recompute it
        if name == "lm_head.weight" and args.tie_word_embeddings:
            # Some tied checkpoints still store it (a copy of the embedding): skip that copy, but an output
            # head of its own would be lost by tying, so refuse it.
            embedding = hf_state_dict.get("model.embed_tokens.weight")
            if embedding is None or not torch.equal(w, embedding):
                raise CheckpointError(
                    "Hugging Face tensor 'lm_head.weight' differs from 'model.embed_tokens.weight', but this "
                    "model.flavor ties them (tie_word_embeddings): use a flavor with an output head of its own"
                )
            continue
        if name in _TOP_FROM_HF:
            out[_TOP_FROM_HF[name]] = w
            continue
        m = _HF_LAYER.match(name)
        if m is None or m.group(2) not in _LAYER_FROM_HF:
            if name.startswith(("layers.", "tok_embeddings.", "norm.", "output.")):
                # (tools/checkpoint.py convert to .safetensors without --hf writes this trainer's names.)
                raise CheckpointError(
                    f"tensor {name!r} has this trainer's name, not a Hugging Face one: load such a file as "
                    "checkpoint.initial_load_path after `tools/checkpoint.py convert FILE OUT_FOLDER` (a DCP "
                    "folder), or write Hugging Face names with `tools/checkpoint.py convert ... --hf --flavor F`"
                )
            raise CheckpointError(f"Hugging Face tensor {name!r} has no counterpart in the llama3 model")
        layer, rest = m.groups()
        ours = _LAYER_FROM_HF[rest]
        if ours == "attention.wq.weight":
            w = _rope_rows(w, args.n_heads, args.head_dim, name, to_hf=False)
        elif ours == "attention.wk.weight":
            w = _rope_rows(w, args.kv_heads, args.head_dim, name, to_hf=False)
        out[f"layers.{layer}.{ours}"] = w
    if args.tie_word_embeddings and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


# --- config.json ---------------------------------------------------------------------------------


LLAMA3_SPECIAL_TOKENS = (128000, 128001)
"""<|begin_of_text|> and <|end_of_text|> of the Llama 3 tokenizer (128000 base tokens, vocab 128256)."""


def hf_config(
    args: TransformerArgs, *, dtype: torch.dtype = torch.float32, special_tokens: tuple[int, int] | None = None
) -> dict[str, Any]:
    """A config.json for LlamaForCausalLM that reproduces `args`.

    Writes the rope settings both as transformers 5's `rope_parameters` and as the older
    `rope_theta` / `rope_scaling` keys, so 4.x and 5.x both read them. `special_tokens` (bos, eos) of
    the run's tokenizer; by default the Llama 3 tokenizer's for its 128256-token vocabulary (without
    them transformers falls back to Llama 2's 1 / 2, and generation never stops at end of text)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": args.rope_theta}
    scaling = None
    if args.rope_scaling is not None:
        s = args.rope_scaling
        scaling = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
        rope = {**scaling, "rope_theta": args.rope_theta}
    dtype_name = str(dtype).removeprefix("torch.")
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "num_hidden_layers": args.n_layers,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": rope,
        "vocab_size": args.vocab_size,
        "tie_word_embeddings": args.tie_word_embeddings,
        "max_position_embeddings": args.max_seq_len,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }
    if special_tokens is None and args.vocab_size == 128256:
        special_tokens = LLAMA3_SPECIAL_TOKENS
    if special_tokens is not None:
        out["bos_token_id"], out["eos_token_id"] = special_tokens
    return out


# transformers' LlamaConfig defaults, for a config.json that leaves these out.
_HF_DEFAULT_ROPE_THETA = 10000.0
_HF_DEFAULT_RMS_NORM_EPS = 1e-6


def check_hf_config(config: dict[str, Any], args: TransformerArgs, *, where: str) -> None:
    """Raise CheckpointError when an HF config.json describes a different model than `args`."""
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or (rope if rope.get("rope_type") == "llama3" else None)
    want: dict[str, tuple[Any, Any]] = {
        "hidden_size": (config.get("hidden_size"), args.dim),
        "num_hidden_layers": (config.get("num_hidden_layers"), args.n_layers),
        "num_attention_heads": (config.get("num_attention_heads"), args.n_heads),
        "num_key_value_heads": (config.get("num_key_value_heads", config.get("num_attention_heads")), args.kv_heads),
        "intermediate_size": (config.get("intermediate_size"), args.ffn_hidden_dim),
        "vocab_size": (config.get("vocab_size"), args.vocab_size),
        "tie_word_embeddings": (bool(config.get("tie_word_embeddings", False)), args.tie_word_embeddings),
        # Not stated: what transformers' LlamaConfig reads then (the shapes cannot tell these apart).
        "rope_theta": (config.get("rope_theta", rope.get("rope_theta", _HF_DEFAULT_ROPE_THETA)), args.rope_theta),
        "rms_norm_eps": (config.get("rms_norm_eps", _HF_DEFAULT_RMS_NORM_EPS), args.norm_eps),
        "hidden_act": (config.get("hidden_act", "silu"), "silu"),
        "head_dim": (config.get("head_dim"), args.head_dim),
        "rope_scaling": (_scaling_from_hf(scaling, where=where), args.rope_scaling),
    }
    for key, (got, expected) in want.items():
        if got is None and key != "rope_scaling":
            continue  # a shape key not stated: the tensor shapes are checked on load
        if isinstance(expected, float) and isinstance(got, (int, float)):
            same = abs(float(got) - expected) <= 1e-9 * max(1.0, abs(expected))
        else:
            same = got == expected
        if not same:
            raise CheckpointError(
                f"{where}: {key}={got} but the model flavor has {expected}: pick the model.flavor that matches "
                f"this checkpoint"
            )


def _scaling_from_hf(scaling: dict[str, Any] | None, *, where: str) -> RopeScaling | None:
    if not scaling or scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        return None
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return scaling.get("rope_type", scaling.get("type"))  # compares unequal to any RopeScaling
    try:
        return RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{where}: rope_scaling {scaling} is not a complete llama3 scaling (factor, low_freq_factor, "
            f"high_freq_factor, original_max_position_embeddings): {type(e).__name__}: {e}"
        ) from e


# --- safetensors files ---------------------------------------------------------------------------


def hf_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of an HF checkpoint: a file, or a folder with model.safetensors or an index."""
    path = Path(path)
    if path.is_file():
        index = path.parent / HF_INDEX
        if index.is_file():
            # One shard of a sharded checkpoint: loading it alone named the others' tensors as missing, with a
            # model.flavor mismatch as the likely cause.
            try:
                shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                shards = set()
            if path.name in shards and len(shards) > 1:
                raise CheckpointError(f"{path} is one of the {len(shards)} shards that {index} lists: pass their "
                                      f"folder, {path.parent}")
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist (expected a Hugging Face folder or a .safetensors file)")
    index = path / HF_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{index} is not a safetensors index ({e})") from e
        files = [path / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f} is missing (listed in {index})")
        return files
    if (path / HF_SINGLE).is_file():
        return [path / HF_SINGLE]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{path} holds no {HF_SINGLE}, {HF_INDEX} or other .safetensors file")
    return found


def load_hf_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of an HF checkpoint (full tensors, on CPU, in their stored dtype)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in hf_files(path):
        try:
            out.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise CheckpointError(f"{f} is not a readable safetensors file ({e})") from e
    return out


def read_hf_config(path: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(path)
    cfg = (path if path.is_dir() else path.parent) / HF_CONFIG
    if not cfg.is_file():
        return None
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg} is not valid JSON ({e})") from e
    _check_config_types(config, cfg)
    return config


# What check_hf_config reads, by JSON type (null = not stated). A string "256" would otherwise be
# reported as "hidden_size=256 but the model flavor has 256".
_CONFIG_TYPES: dict[str, tuple[str, tuple[type, ...]]] = {
    **{
        key: ("an integer", (int,))
        for key in (
            "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "num_hidden_layers", "head_dim", "vocab_size",
        )
    },
    "rope_theta": ("a number", (int, float)),
    "rms_norm_eps": ("a number", (int, float)),
    "tie_word_embeddings": ("true or false", (bool,)),
    "hidden_act": ("a string", (str,)),
    "rope_scaling": ("an object", (dict,)),
    "rope_parameters": ("an object", (dict,)),
}
_JSON_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
               float: "a decimal number"}


def _check_config_types(config: Any, cfg: Path) -> None:
    """Raise CheckpointError naming the file and the key when a config.json value has the wrong JSON type."""
    if not isinstance(config, dict):
        what = _JSON_NAMES.get(type(config), "null")
        raise CheckpointError(f"{cfg} holds {what}, not a JSON object of model settings: is it a Hugging Face config?")
    for key, (expected, types) in _CONFIG_TYPES.items():
        value = config.get(key)
        if value is None:
            continue
        # (bool is an int in Python, not in JSON: "hidden_size": true is not a size)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise CheckpointError(
                f"{cfg}: \"{key}\" is {json.dumps(value)} ({_JSON_NAMES.get(type(value), 'null')}), expected "
                f"{expected}: fix that value in the file"
            )
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_theta") is not None and (
        isinstance(rope["rope_theta"], bool) or not isinstance(rope["rope_theta"], (int, float))
    ):
        raise CheckpointError(
            f"{cfg}: \"rope_parameters.rope_theta\" is {json.dumps(rope['rope_theta'])}, expected a number: "
            "fix that value in the file"
        )


def save_hf_safetensors(
    hf_state_dict: dict[str, torch.Tensor],
    folder: str | os.PathLike,
    *,
    args: TransformerArgs | None,
    max_shard_bytes: int = 5 * 1024**3,
    special_tokens: tuple[int, int] | None = None,
) -> list[Path]:
    """Write model.safetensors (or model-0000i-of-0000n.safetensors + index) and, with `args`, config.json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in hf_state_dict.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().to("cpu").contiguous()
        size += nbytes
    written = []
    if len(shards) == 1:
        save_file(shards[0], str(folder / HF_SINGLE), metadata={"format": "pt"})
        written.append(folder / HF_SINGLE)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
            written.append(folder / fname)
        total = sum(t.numel() * t.element_size() for t in hf_state_dict.values())
        (folder / HF_INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
        )
        written.append(folder / HF_INDEX)
    if args is not None:
        dtype = next(iter(hf_state_dict.values())).dtype if hf_state_dict else torch.float32
        config = hf_config(args, dtype=dtype, special_tokens=special_tokens)
        (folder / HF_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
        written.append(folder / HF_CONFIG)
    return written
