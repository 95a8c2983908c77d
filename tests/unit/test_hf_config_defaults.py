"""An HF config.json is compared with the flavor as transformers reads it: a key left out means
transformers' default (rope_theta 10000, rms_norm_eps 1e-6), and the activation counts too; an
incomplete llama3 rope_scaling is a CheckpointError, not a KeyError."""

from __future__ import annotations

import pytest

from torchtitan_like.components.manifest import CheckpointError
from torchtitan_like.models.llama3 import LLAMA3_FLAVORS
from torchtitan_like.models.llama3.state_dict_adapter import check_hf_config, hf_config


def _config_without(args, *keys: str) -> dict:
    config = hf_config(args)
    for key in keys:
        config.pop(key)
    return config


def test_hf_config_without_rope_theta_is_refused():
    from transformers import LlamaConfig

    args = LLAMA3_FLAVORS["debugmodel"]  # rope_theta 500000, no rope scaling
    config = _config_without(args, "rope_theta", "rope_parameters")
    assert config["rope_scaling"] is None
    # What transformers makes of this config.json: RoPE base 10000, not the flavor's.
    assert LlamaConfig.from_dict(config).rope_parameters["rope_theta"] != args.rope_theta
    with pytest.raises(CheckpointError, match="rope_theta"):
        check_hf_config(config, args, where="config.json")


def test_hf_config_without_rms_norm_eps_is_refused():
    from transformers import LlamaConfig

    args = LLAMA3_FLAVORS["8B"]  # rms_norm_eps 1e-5
    config = _config_without(args, "rms_norm_eps")
    assert LlamaConfig.from_dict(config).rms_norm_eps != args.norm_eps
    with pytest.raises(CheckpointError, match="rms_norm_eps"):
        check_hf_config(config, args, where="config.json")


def test_hf_config_with_another_activation_is_refused():
    from transformers import LlamaConfig

    args = LLAMA3_FLAVORS["debugmodel"]
    config = {**hf_config(args), "hidden_act": "gelu"}
    assert LlamaConfig.from_dict(config).hidden_act == "gelu"  # transformers builds a GELU-gated MLP from it
    with pytest.raises(CheckpointError, match="hidden_act"):
        check_hf_config(config, args, where="config.json")


def test_an_incomplete_llama3_rope_scaling_is_a_checkpoint_error():
    args = LLAMA3_FLAVORS["8B"]
    config = {**hf_config(args), "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    config.pop("rope_parameters", None)
    with pytest.raises(CheckpointError, match="not a complete llama3 scaling.*low_freq_factor"):
        check_hf_config(config, args, where="config.json")
