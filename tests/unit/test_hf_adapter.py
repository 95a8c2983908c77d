"""Hugging Face interop, checked against a reference nobody here wrote: transformers' LlamaForCausalLM.

A random HF model is saved with `save_pretrained` (one file, and sharded with an index), loaded into
our Transformer, and must give the same logits; our export must load back with `from_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from torchtitan_like.components.checkpoint import CheckpointError, CheckpointManager, TrainState
from torchtitan_like.components.manifest import verify
from torchtitan_like.config.schema import Checkpoint
from torchtitan_like.models.llama3 import RopeScaling, Transformer, TransformerArgs
from torchtitan_like.models.llama3.state_dict_adapter import (
    check_hf_config,
    from_hf,
    hf_config,
    load_hf_safetensors,
    read_hf_config,
    save_hf_safetensors,
    to_hf,
)

# Llama 3.1 rope scaling with a short original context, so the scaled, interpolated and unscaled
# frequency bands all occur at head_dim 16.
SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)


def llama_args(tie: bool) -> TransformerArgs:
    # ffn_hidden_dim: int(2 * 4 * 64 / 3) = 170, rounded up to multiple_of 32 -> 192
    return TransformerArgs(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=128,
        multiple_of=32,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=SCALING,
        max_seq_len=64,
        tie_word_embeddings=tie,
    )


def hf_reference(tie: bool) -> LlamaForCausalLM:
    args = llama_args(tie)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        intermediate_size=args.ffn_hidden_dim,
        rms_norm_eps=1e-5,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    )
    torch.manual_seed(1234)
    return LlamaForCausalLM(config).float().eval()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf_saved(request, tmp_path_factory):
    """(tie, reference model, single-file folder, sharded folder)."""
    tie = request.param
    model = hf_reference(tie)
    root = tmp_path_factory.mktemp("hf_tied" if tie else "hf_untied")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="40KB")
    assert (root / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((root / "sharded").glob("model-*.safetensors"))) > 2
    return tie, model, root / "single", root / "sharded"


TOKENS = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))


def ours_from(hf_dir: Path, tie: bool) -> Transformer:
    args = llama_args(tie)
    model = Transformer(args)
    model.init_weights(0)
    model.load_state_dict(from_hf(load_hf_safetensors(hf_dir), args), strict=True)
    return model.eval()


@torch.no_grad()
def assert_same_logits(ours: Transformer, theirs: LlamaForCausalLM) -> None:
    torch.testing.assert_close(ours(TOKENS), theirs(TOKENS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_hf_checkpoint_gives_transformers_logits(hf_saved, layout):
    tie, reference, single, sharded = hf_saved
    check_hf_config(read_hf_config(single), llama_args(tie), where="config.json")
    ours = ours_from(single if layout == "single" else sharded, tie)
    if tie:
        assert ours.output.weight is ours.tok_embeddings.weight
    assert_same_logits(ours, reference)


def test_export_loads_in_transformers_with_the_same_logits(hf_saved, tmp_path):
    tie, reference, single, _ = hf_saved
    ours = ours_from(single, tie)
    written = save_hf_safetensors(to_hf(ours.state_dict(), ours.args), tmp_path, args=ours.args)
    assert {p.name for p in written} == {"model.safetensors", "config.json"}
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).float().eval()
    assert loaded.config.num_key_value_heads == 2 and loaded.config.tie_word_embeddings == tie
    assert loaded.config.rope_parameters["rope_type"] == "llama3"
    assert_same_logits(ours, loaded)


def test_sharded_export_writes_an_index_transformers_reads(hf_saved, tmp_path):
    tie, reference, single, _ = hf_saved
    ours = ours_from(single, tie)
    written = save_hf_safetensors(to_hf(ours.state_dict(), ours.args), tmp_path, args=ours.args, max_shard_bytes=40_000)
    assert (tmp_path / "model.safetensors.index.json") in written
    assert_same_logits(ours, LlamaForCausalLM.from_pretrained(tmp_path).float().eval())


def test_rope_permutation_round_trips_bitwise():
    args = llama_args(False)
    model = Transformer(args)
    model.init_weights(3)
    sd = model.state_dict()
    hf = to_hf(sd, args)
    assert "lm_head.weight" in hf and not torch.equal(
        hf["model.layers.0.self_attn.q_proj.weight"], sd["layers.0.attention.wq.weight"]
    )
    back = from_hf(hf, args)
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_tied_export_has_no_lm_head():
    args = llama_args(True)
    model = Transformer(args)
    model.init_weights(0)
    assert "lm_head.weight" not in to_hf(model.state_dict(), args)
    assert hf_config(args)["tie_word_embeddings"] is True


def test_a_config_for_another_model_is_refused_naming_the_key(hf_saved):
    tie, _, single, _ = hf_saved
    other = TransformerArgs(**{**llama_args(tie).__dict__, "n_kv_heads": 4})
    with pytest.raises(CheckpointError, match=r"config\.json: num_key_value_heads=2 but the model flavor has 4"):
        check_hf_config(read_hf_config(single), other, where="config.json")
    no_scaling = TransformerArgs(**{**llama_args(tie).__dict__, "rope_scaling": None})
    with pytest.raises(CheckpointError, match=r"rope_scaling=RopeScaling\(factor=8\.0.* but the model flavor has None"):
        check_hf_config(read_hf_config(single), no_scaling, where="config.json")
    # A fine-tune's own norm epsilon would otherwise load and silently run with the flavor's.
    config = {**read_hf_config(single), "rms_norm_eps": 1e-6}
    with pytest.raises(CheckpointError, match=r"config\.json: rms_norm_eps=1e-06 but the model flavor has 1e-05"):
        check_hf_config(config, llama_args(tie), where="config.json")
    config = {**read_hf_config(single), "head_dim": 2 * llama_args(tie).head_dim}
    with pytest.raises(CheckpointError, match=r"config\.json: head_dim="):
        check_hf_config(config, llama_args(tie), where="config.json")


def test_unknown_hf_tensors_are_named():
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.q_norm\.weight' has no counterpart"):
        from_hf({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}, llama_args(False))


def test_a_missing_shard_is_named(hf_saved, tmp_path):
    _, _, _, sharded = hf_saved
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sharded, copy)
    victim = sorted(copy.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(
        CheckpointError, match=rf"{victim.name} is missing \(listed in .*model\.safetensors\.index\.json\)"
    ):
        load_hf_safetensors(copy)


def test_one_shard_of_a_sharded_checkpoint_names_the_folder_to_pass(hf_saved):
    # (It loaded alone, and the others' tensors were reported missing as a model.flavor mismatch.)
    _, _, _, sharded = hf_saved
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    n = len(list(sharded.glob("model-*.safetensors")))
    with pytest.raises(CheckpointError, match=rf"{shard} is one of the {n} shards that "
                                              rf"\S+model\.safetensors\.index\.json lists: pass their folder, {sharded}$"):
        load_hf_safetensors(shard)


def _manager(model: Transformer, dump: Path, **cfg) -> CheckpointManager:
    optimizer = torch.optim.AdamW(model.parameters())
    return CheckpointManager(
        Checkpoint(enable=True, **cfg),
        dump_folder=str(dump),
        model_parts=[model],
        optimizer=optimizer,
        lr_scheduler=None,
        dataloader=None,
        train_state=TrainState(),
        fingerprint={"config_hash": "", "layout": {}, "world_size": 1},
    )


def test_manager_starts_from_hf_weights_and_exports_them_at_the_end(hf_saved, tmp_path):
    tie, reference, _, sharded = hf_saved
    model = Transformer(llama_args(tie))
    model.init_weights(7)
    mgr = _manager(
        model,
        tmp_path,
        initial_load_path=str(sharded),
        initial_load_in_hf=True,
        last_save_in_hf=True,
        export_dtype="float32",
    )
    assert mgr.load() is None  # a fresh run that starts from these weights
    model.eval()
    assert_same_logits(model, reference)

    mgr.maybe_save(5, last=True)
    mgr.close()
    step = tmp_path / "checkpoint" / "step-5"
    manifest = verify(step)
    assert {"hf/model.safetensors", "hf/config.json"} <= set(manifest["files"])
    assert_same_logits(model, LlamaForCausalLM.from_pretrained(step / "hf").float().eval())


def test_manager_refuses_hf_weights_of_another_flavor(hf_saved, tmp_path):
    tie, _, single, _ = hf_saved
    other = TransformerArgs(**{**llama_args(tie).__dict__, "n_layers": 3})
    model = Transformer(other)
    model.init_weights(0)
    with pytest.raises(CheckpointError, match=r"num_hidden_layers=2 but the model flavor has 3"):
        _manager(model, tmp_path, initial_load_path=str(single), initial_load_in_hf=True).load()
