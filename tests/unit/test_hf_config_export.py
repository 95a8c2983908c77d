"""The config.json our Hugging Face export writes, as transformers reads it, and our flavors against the
published Llama 3.1 / 3.2 config.json files (hyper-parameters typed in from the releases)."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig  # noqa: E402

from torchtitan_like.components.tokenizer import build_tokenizer  # noqa: E402
from torchtitan_like.config.loader import load_config  # noqa: E402
from torchtitan_like.models.llama3 import LLAMA3_FLAVORS  # noqa: E402
from torchtitan_like.models.llama3.model import precompute_freqs_cis  # noqa: E402
from torchtitan_like.models.llama3.state_dict_adapter import check_hf_config, hf_config  # noqa: E402


def _as_transformers_reads_it(args, tmp_path) -> LlamaConfig:
    (tmp_path / "config.json").write_text(json.dumps(hf_config(args)))
    return LlamaConfig.from_pretrained(tmp_path)


# The published config.json values of the base models (meta-llama/Llama-3.2-1B, -3B, Llama-3.1-8B, -70B, -405B).
_ROPE_31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
_ROPE_32 = {**_ROPE_31, "factor": 32.0}
PUBLISHED = {
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, rope_scaling=_ROPE_32),
    "3B": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, rope_scaling=_ROPE_32),
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False, rope_scaling=_ROPE_31),
    "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, tie_word_embeddings=False, rope_scaling=_ROPE_31),
    "405B": dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                 num_key_value_heads=8, tie_word_embeddings=False, rope_scaling=_ROPE_31),
}
COMMON = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, rms_norm_eps=1e-5,
              rope_theta=500000.0, max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001,
              hidden_act="silu", attention_bias=False, mlp_bias=False)


@pytest.mark.parametrize("flavor", sorted(PUBLISHED))
def test_published_hf_configs_are_accepted_by_their_flavor(flavor):
    """Passing: the flavor dims agree with the released config.json (check_hf_config compares every dim)."""
    config = {**COMMON, **PUBLISHED[flavor]}
    args = LLAMA3_FLAVORS[flavor]
    check_hf_config(config, args, where=f"{flavor}/config.json")
    assert args.norm_eps == config["rms_norm_eps"] and args.vocab_size == 128256
    assert args.head_dim == config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])


@pytest.mark.parametrize("flavor", ["1B", "8B"])
def test_our_rope_frequencies_equal_transformers_llama3_rope(flavor, tmp_path):
    """Passing: the rotation table (position-by-position, out to 128K) equals a float64 evaluation of
    the published Llama 3.1 rule and, to float32 precision, transformers' own llama3 inv_freq."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    args = LLAMA3_FLAVORS[flavor]
    s = args.rope_scaling
    hd = args.head_dim
    base = [1.0 / args.rope_theta ** (2 * k / hd) for k in range(hd // 2)]
    ref = []
    for f in base:  # Meta's apply_scaling, verbatim in scalar form
        wavelen = 2 * math.pi / f
        if wavelen < s.original_max_position_embeddings / s.high_freq_factor:
            ref.append(f)
        elif wavelen > s.original_max_position_embeddings / s.low_freq_factor:
            ref.append(f / s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            ref.append((1 - smooth) * f / s.factor + smooth * f)
    ref_t = torch.tensor(ref, dtype=torch.float64)

    positions = [0, 1, 2, 511, 2048, 8191, 8192, 32768, 100003, 131071]
    table = precompute_freqs_cis(hd, 131072, args.rope_theta, s)
    want = torch.tensor(positions, dtype=torch.float64)[:, None] * ref_t[None]
    want = torch.stack((want.cos(), want.sin()), dim=-1).float()
    torch.testing.assert_close(table[positions], want, atol=1e-6, rtol=0)

    hf_inv_freq, scale = ROPE_INIT_FUNCTIONS["llama3"](_as_transformers_reads_it(args, tmp_path), "cpu")
    assert scale == 1.0
    torch.testing.assert_close(hf_inv_freq.double(), ref_t, rtol=1e-6, atol=0)


def test_exported_config_names_the_llama3_special_tokens(tmp_path):
    # Without them LlamaConfig's defaults are bos 1 / eos 2 (Llama 2's): transformers 4.x then stops
    # generate() at token 2 ('#' in Llama 3's vocab), 5.x has no EOS at all. (Once the case.)
    config = _as_transformers_reads_it(LLAMA3_FLAVORS["8B"], tmp_path)  # the Llama 3 tokenizer's, by default
    assert (config.bos_token_id, config.eos_token_id) == (128000, 128001)
    # Another vocabulary: only the run's tokenizer knows them (the trainer passes them); none are guessed.
    assert "bos_token_id" not in hf_config(LLAMA3_FLAVORS["debugmodel"])
    assert hf_config(LLAMA3_FLAVORS["debugmodel"], special_tokens=(1744, 1745))["eos_token_id"] == 1745


def test_the_runs_export_has_the_flavors_context_and_its_tokenizers_special_tokens(tmp_path):
    """last_save_in_hf from a run at seq_len 64: max_position_embeddings is the flavor's context (it once
    was the training seq_len, which vLLM reads as the limit), bos/eos those of the run's tokenizer."""
    from torchtitan_like.trainer import Trainer

    trainer = Trainer(load_config([
        "--job.config_file", "train_configs/debug_model.toml", "--job.dump_folder", str(tmp_path),
        "--training.seq_len", "64", "--training.local_batch_size", "2", "--training.steps", "1",
        "--metrics.no_enable_tensorboard", "--checkpoint.enable", "--checkpoint.last_save_in_hf",
    ]))
    try:
        trainer.train()
    finally:
        trainer.close()
    config = json.loads((tmp_path / "checkpoint" / "step-1" / "hf" / "config.json").read_text())
    tok = build_tokenizer("")  # the debug config's embedded tokenizer
    assert config["max_position_embeddings"] == LLAMA3_FLAVORS["debugmodel"].max_seq_len == 2048
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_id, tok.eos_id) == (1744, 1745)
