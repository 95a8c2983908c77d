"""Text generation from a trained checkpoint, in one process (tools/generate.py is its command line).

The model is the job's (its config and overrides: model.flavor, model.n_layers, model.tokenizer_path,
model.max_seq_len or training.seq_len for the RoPE table), built on meta, materialized on one device in
training.mixed_precision_param's dtype (auto: bfloat16 on CUDA, float32 on CPU), and loaded by the
trainer's own CheckpointManager with checkpoint.load_only: the newest complete step of the job's
checkpoint folder (or checkpoint.load_step), else checkpoint.initial_load_path (ours, torchtitan's
layout, or Hugging Face safetensors with initial_load_in_hf), with the same integrity, flavor and
tying checks as a resume. Only the weights (and the step) are read.

Decoding is plain: every new token runs the model over the whole sequence so far (no KV cache), then
takes the argmax (temperature 0) or samples from softmax(logits / temperature), restricted to the
top_k most likely tokens when top_k > 0, with a generator seeded by the caller. It stops at a stop
token or after max_new_tokens. The stop tokens: the eos ids of the generation_config.json that Hugging Face
weights or assets carry (the folder of the Hugging Face weights loaded, else model.hf_assets_path; Llama 3
instruct models list <|eot_id|>, which ends their turns), else the tokenizer's eos (<|end_of_text|>); plus
any special tokens the caller names (--stop-token).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchtitan_like.components.checkpoint import CheckpointManager, TrainState
from torchtitan_like.components.manifest import MANIFEST, CheckpointError, complete_steps, read_manifest, step_folders
from torchtitan_like.components.tokenizer import Tokenizer, build_tokenizer, check_vocab, tokenizer_file, tokenizer_key
from torchtitan_like.config.loader import config_hash
from torchtitan_like.config.schema import JobConfig
from torchtitan_like.distributed.utils import param_dtype
from torchtitan_like.errors import ConfigError, DataError
from torchtitan_like.models import MODELS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How each next token is chosen."""

    max_new_tokens: int
    temperature: float = 0.0
    """0 = greedy (argmax); above 0, sample from softmax(logits / temperature)."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0 = among all."""

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {self.max_new_tokens} must be >= 1")
        if not self.temperature >= 0:  # (NaN too)
            raise ConfigError(f"--temperature {self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ConfigError(f"--top-k {self.top_k} must be >= 0 (0 = every token)")
        if self.top_k and self.temperature == 0:
            raise ConfigError(f"--top-k {self.top_k} has no effect with --temperature 0 (greedy): set a temperature, "
                              "e.g. 0.8, or leave --top-k out")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Tokenizer
    device: torch.device
    max_len: int
    """Positions the model takes (its RoPE table): prompt plus new tokens must fit."""
    source: str
    """What was loaded, for the log and the report."""
    step: int | None
    """The training step of the loaded weights (None where the checkpoint does not say: Hugging Face's, torchtitan's)."""
    stop_ids: tuple[int, ...] = ()
    """Generation stops at any of these ids; () = at the tokenizer's eos."""


GENERATION_CONFIG = "generation_config.json"


def generation_config_eos(folder: Path, tokenizer: Tokenizer) -> list[int] | None:
    """The eos ids of `folder`/generation_config.json (None when there is no file, or it names none)."""
    path = folder / GENERATION_CONFIG
    if not path.is_file():
        return None
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as e:
        raise DataError(f"{path}: not a readable generation config ({e}); fix or remove it") from None
    if eos is None:
        return None
    ids = eos if isinstance(eos, list) else [eos]
    if not ids or not all(type(i) is int and 0 <= i < tokenizer.vocab_size for i in ids):
        raise DataError(f"{path}: eos_token_id {eos!r} is not an id (or list of ids) of the tokenizer, whose "
                        f"vocabulary has {tokenizer.vocab_size}: use the model's own tokenizer (model.tokenizer_path)")
    return ids


def stop_token_ids(tokenizer: Tokenizer, names: list[str]) -> list[int]:
    """The ids of the special tokens `names` (--stop-token)."""
    unknown = [n for n in names if n not in tokenizer.special_tokens]
    if unknown:
        raise ConfigError(f"--stop-token {unknown[0]!r} is not a special token of the tokenizer: give one such as "
                          "<|eot_id|> or <|end_of_text|>")
    return [tokenizer.special_tokens[n] for n in names]


def load_model(cfg: JobConfig, *, device: torch.device, checkpoint: str | None = None,
               stop_tokens: list[str] | None = None) -> LoadedModel:
    """The job's model with its trained weights, on `device`, ready for forward passes. `checkpoint`: load
    that step folder (ours or torchtitan's) or Hugging Face safetensors (a file, or a folder without DCP's
    .metadata) instead of the job's own checkpoints, as checkpoint.initial_load_path. `stop_tokens`: names
    of special tokens to stop at too (--stop-token)."""
    from torchtitan_like.trainer import job_model_args

    ck = cfg.checkpoint
    own = Path(cfg.job.dump_folder) / ck.folder
    own_first = checkpoint is None
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise CheckpointError(f"--checkpoint {path} does not exist")
        hf = not (path / ".metadata").is_file() and (
            path.suffix == ".safetensors" if path.is_file() else any(path.glob("*.safetensors")))
        if not hf and not (path / ".metadata").is_file():
            steps = sorted(step_folders(path).items()) if path.is_dir() else []
            raise CheckpointError(
                f"--checkpoint {path} holds step folders: pass one, e.g. {steps[-1][1]}" if steps else
                f"--checkpoint {path} is neither a DCP checkpoint (no .metadata) nor Hugging Face safetensors (a "
                ".safetensors file, or a folder with them); a .pt state dict converts with tools/checkpoint.py "
                "convert FILE.pt OUT_FOLDER"
            )
        ck = dataclasses.replace(ck, initial_load_path=str(path), initial_load_in_hf=hf, load_step=-1)
        folder = path if path.is_dir() else path.parent
        if hf and not cfg.model.tokenizer_path:
            try:  # (the file the trainer would read for that folder)
                shipped = tokenizer_file(str(folder))
            except DataError:
                shipped = None
            if shipped is not None:
                # A Hugging Face model folder ships its tokenizer; the embedded one would only give garbage.
                logger.info("model.tokenizer_path unset: using the tokenizer of %s (%s)", folder, shipped.name)
                cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tokenizer_path=str(folder)))
    elif not complete_steps(own) and not ck.initial_load_path:
        raise ConfigError(
            f"nothing to generate from: {own} (job.dump_folder / checkpoint.folder) holds no complete checkpoint and "
            "checkpoint.initial_load_path is unset; pass --checkpoint PATH (a step-N folder, or Hugging Face "
            "safetensors), or the dump folder of a run that saved"
        )
    model_args = job_model_args(cfg)
    if model_args.attn_type != "sdpa":
        # Every kernel computes the same attention; FlexAttention would compile for every new length.
        logger.info("model.attn_type=%r: generating with sdpa (the same attention, no compile per length)",
                    model_args.attn_type)
        model_args = dataclasses.replace(model_args, attn_type="sdpa")
    tokenizer = build_tokenizer(cfg.model.tokenizer_path, key=tokenizer_key(cfg.model))
    check_vocab(tokenizer, model_args.vocab_size, cfg.model.flavor)
    extra_stops = stop_token_ids(tokenizer, stop_tokens or [])
    if model_args.attn_mask_type == "block_causal":
        model_args = dataclasses.replace(model_args, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    dtype = param_dtype(cfg.training, device.type)
    with torch.device("meta"):
        model = MODELS[cfg.model.name].build(model_args)
    # Cast on meta, then init: init_weights makes the RoPE table in float32 whatever the weights' dtype
    # (a model.to(bfloat16) after it would round the table too, as training never does).
    model.to(dtype=dtype)
    model.to_empty(device=device)
    model.init_weights(cfg.debug.seed, buffer_device=device)  # (the RoPE table, and ties the output head)
    # The trainer's own loader: the same checks as a resume. load_only: nothing is written or renamed.
    load_cfg = dataclasses.replace(ck, enable=own_first, load_only=True, initial_load_model_only=True,
                                   exclude_from_loading=[])
    manager = CheckpointManager(
        load_cfg, dump_folder=cfg.job.dump_folder, model_parts=[model], optimizer=None, lr_scheduler=None,
        dataloader=None, train_state=TrainState(),
        fingerprint={"config_hash": config_hash(cfg),
                     "layout": {"dp_replicate": 1, "dp_shard": 1, "cp": 1, "tp": 1, "pp": 1}},
        model_args=model_args,
        # A checkpoint trained with another tokenizer is loaded, with a warning (its text would be garbage).
        tokenizer=tokenizer.identity(), tokenizer_key=tokenizer_key(cfg.model), tokenizer_mismatch="warn",
    )
    try:
        step = manager.load()
    finally:
        manager.close()
    path = manager.loaded_from
    assert path is not None  # (nothing to load was refused above, or by the manager)
    if step is None:
        # A model-only load returns no step: ours has it in its manifest (Hugging Face weights have none).
        step = read_manifest(path)["step"] if (path / MANIFEST).is_file() else None
    source = str(path)
    # Hugging Face weights or assets end text where their generation_config.json says (Llama 3 instruct: at
    # <|eot_id|> too), not only at the tokenizer's eos.
    hf_loaded = load_cfg.initial_load_in_hf and path == Path(load_cfg.initial_load_path)
    folders = [path if path.is_dir() else path.parent] if hf_loaded else []
    if cfg.model.hf_assets_path:
        folders.append(Path(cfg.model.hf_assets_path))
    stops = [tokenizer.eos_id]
    for folder in folders:
        eos = generation_config_eos(folder, tokenizer)
        if eos is not None:
            stops = eos
            logger.info("stopping at eos ids %s (%s)", eos, folder / GENERATION_CONFIG)
            break
    stops += [i for i in extra_stops if i not in stops]
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, device=device, max_len=int(model.freqs_cis.shape[0]),
                       source=source, step=step, stop_ids=tuple(stops))


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token id from one position's logits (vocab,)."""
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float()
    # Shifted so the largest is 0 before the division (softmax is the same): a tiny temperature (below ~1e-37)
    # then makes the others -inf, not the largest inf and the softmax NaN.
    scaled = (logits - logits.max()) / sampling.temperature
    if sampling.top_k and sampling.top_k < scaled.numel():
        kth = torch.topk(scaled, sampling.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(loaded: LoadedModel, prompt: str, sampling: Sampling, *, seed: int) -> dict[str, Any]:
    """Continue `prompt` ([bos] prompt, as training packs documents); returns the report of one prompt."""
    tok = loaded.tokenizer
    stops = set(loaded.stop_ids or (tok.eos_id,))
    prompt_ids = tok.encode(prompt, bos=True, eos=False)
    total = len(prompt_ids) + sampling.max_new_tokens
    if total > loaded.max_len:
        raise ConfigError(
            f"the prompt ({len(prompt_ids)} tokens) plus --max-new-tokens {sampling.max_new_tokens} is {total} "
            f"positions, more than the model's {loaded.max_len} (model.max_seq_len, else training.seq_len): "
            "shorten them, or raise model.max_seq_len (beyond the trained length the model has not learned)"
        )
    generator = None
    if sampling.temperature > 0:
        generator = torch.Generator(device=loaded.device)
        generator.manual_seed(seed)
    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=loaded.device)  # (1, seqlen)
    new: list[int] = []
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)
    t0 = time.perf_counter()
    for _ in range(sampling.max_new_tokens):
        # (1, seqlen, vocab) -> the last position; ids past the tokenizer's (a padded vocabulary) are never
        # chosen: they decode to nothing.
        logits = loaded.model(tokens)[0, -1, : tok.vocab_size]
        token = next_token(logits, sampling, generator)
        new.append(token)
        if token in stops:
            break
        tokens = torch.cat([tokens, tokens.new_tensor([[token]])], dim=1)
    seconds = time.perf_counter() - t0  # (.item() in next_token waited for the device)
    stopped = bool(new) and new[-1] in stops
    text_ids = new[:-1] if stopped else new
    return {
        "prompt": prompt,
        "prompt_tokens": len(prompt_ids),
        "new_token_ids": new,
        "completion": tok.decode(text_ids),
        # (at a stop token: the tokenizer's eos, a generation_config.json eos id, or a --stop-token)
        "stopped_at_eos": stopped,
        "stop_token_id": new[-1] if stopped else None,
        "seconds": round(seconds, 4),
        "tokens_per_s": round(len(new) / seconds, 2) if seconds > 0 else None,
    }
