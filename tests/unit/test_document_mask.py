"""Document masking (model.attn_mask_type = "block_causal") and the attention kernels (model.attn_type).

A packed sequence under block_causal gives each document the logits it has alone: RoPE scores depend only
on relative positions, so a document that starts later in the sequence is the same computation as the
document by itself. Parallel layouts are compared with one process in
tests/distributed/test_document_mask_parity.py.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from feature_runs import losses, train

from torchtitan_like.components.tokenizer import build_tokenizer
from torchtitan_like.config.loader import load_config
from torchtitan_like.distributed.pipeline import split_model
from torchtitan_like.errors import ConfigError
from torchtitan_like.models.llama3 import LLAMA3_FLAVORS, Transformer
from torchtitan_like.models.llama3.model import document_ids
from torchtitan_like.models.llama3.parallelize import check_attention_device

BOS, EOS = 1990, 1991


def test_a_document_starts_at_bos_and_after_eos() -> None:
    t = torch.tensor([
        [5, 6, BOS, 7, EOS, BOS, 8, 9],  # the packer's [bos] doc [eos] stream, cut mid-document
        [5, EOS, 6, 7, EOS, 8, 9, EOS],  # Megatron-style: eos between documents, no bos
    ])
    assert document_ids(t, BOS, EOS).tolist() == [[0, 0, 1, 1, 1, 2, 2, 2], [0, 0, 1, 1, 1, 2, 2, 2]]


def _model(**overrides) -> Transformer:
    args = replace(LLAMA3_FLAVORS["debugmodel"], **{"n_layers": 2, "max_seq_len": 64, "bos_id": BOS, "eos_id": EOS,
                                                   **overrides})
    model = Transformer(args)
    model.init_weights(seed=3)
    return model


def _doc(n: int, gen: torch.Generator) -> torch.Tensor:
    d = torch.randint(0, 1700, (1, n), generator=gen)
    d[0, 0], d[0, -1] = BOS, EOS
    return d


def _same_weights(model: Transformer, **overrides) -> Transformer:
    other = _model(**overrides)
    other.load_state_dict(model.state_dict())
    return other


@torch.no_grad()
def test_packed_documents_get_the_logits_they_have_alone() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b, c = _doc(20, gen), _doc(30, gen), _doc(14, gen)
    packed = torch.cat([a, b, c], dim=1)  # 64 positions
    model = _model(attn_mask_type="block_causal")
    out = model(packed)
    for doc, start in ((a, 0), (b, 20), (c, 50)):
        torch.testing.assert_close(out[:, start:start + doc.shape[1]], model(doc), rtol=1e-5, atol=1e-5)
    # Without the mask the later documents see the earlier ones.
    causal = _same_weights(model)(packed)
    assert (causal[:, 20:50] - model(b)).abs().max() > 1e-2
    torch.testing.assert_close(causal[:, :20], out[:, :20])  # (the first document sees nothing before it)


def test_the_mask_keeps_gradients_inside_each_document() -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = _doc(24, gen), _doc(40, gen)
    model = _model(attn_mask_type="block_causal")
    emb = model.tok_embeddings
    hidden = emb(torch.cat([a, b], dim=1)).detach().requires_grad_(True)
    model.tok_embeddings = None  # (feed hidden states: a later pipeline stage, given the ids)
    out = model(hidden, doc_ids=document_ids(torch.cat([a, b], dim=1), BOS, EOS))
    out[:, 24:].sum().backward()  # the second document's logits only
    assert hidden.grad[:, :24].abs().max() == 0
    assert hidden.grad[:, 24:].abs().max() > 0


@torch.no_grad()
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("mask", ["causal", "block_causal"])
def test_flex_attention_forward_matches_sdpa(mask: str) -> None:
    """FlexAttention's forward runs on CPU (eager: its backward does not): the same logits as SDPA."""
    gen = torch.Generator().manual_seed(2)
    batch = torch.cat([torch.cat([_doc(16, gen), _doc(48, gen)], dim=1), torch.cat([_doc(40, gen), _doc(24, gen)], dim=1)])
    sdpa = _model(attn_mask_type=mask)
    flex = _same_weights(sdpa, attn_mask_type=mask, attn_type="flex")
    torch.testing.assert_close(flex(batch), sdpa(batch), rtol=1e-5, atol=1e-5)


def test_a_later_pipeline_stage_needs_the_ids() -> None:
    model = _model(attn_mask_type="block_causal")
    stage = split_model(model, ["layers.1", "norm", "output"])
    with pytest.raises(ValueError, match="pass doc_ids"):
        stage(torch.zeros(1, 8, 256))
    no_ids = Transformer(replace(model.args, bos_id=None, eos_id=None))
    with pytest.raises(ValueError, match="bos and eos ids"):
        no_ids.to_empty(device="cpu")(torch.zeros(1, 8, dtype=torch.long))


def test_block_causal_with_context_parallel_is_refused() -> None:
    with pytest.raises(ConfigError, match=r'attn_mask_type="block_causal" with parallelism.context_parallel_degree=2'):
        load_config(["--model.attn_mask_type", "block_causal", "--parallelism.context_parallel_degree", "2"])
    with pytest.raises(ConfigError, match="attn_mask_type"):
        load_config(["--model.attn_mask_type", "document"])


def test_flex_attention_with_context_parallel_is_refused() -> None:
    """CP makes only SDPA a ring attention: FlexAttention under CP attended within each rank's shard (a
    forward of the debug model with peaked attention: loss 1036.56 on 2 cp ranks vs 1031.63 in one
    process, where SDPA matches exactly), and on CUDA such a job trained that other model silently."""
    with pytest.raises(ConfigError, match=r'model.attn_type="flex" with parallelism.context_parallel_degree=2: .*'
                                          r'use attn_type="sdpa" or context_parallel_degree=1'):
        load_config(["--model.attn_type", "flex", "--parallelism.context_parallel_degree", "2"])
    load_config(["--model.attn_type", "flex"])  # (without CP it is the job's choice)


def test_flex_attention_trains_on_cuda_only() -> None:
    cfg = load_config(["--model.attn_type", "flex"])
    with pytest.raises(ConfigError, match='model.attn_type="flex" needs CUDA to train.*attn_type="sdpa"'):
        check_attention_device(cfg.model, "cpu")
    check_attention_device(cfg.model, "cuda")
    check_attention_device(load_config([]).model, "cpu")


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice("ab cd ef gh ij".split()) for _ in range(rng.randint(2, 12)))})
                            + "\n" for _ in range(300)))
    return path


def test_activation_checkpointing_and_compile_keep_the_mask(docs: Path, tmp_path: Path) -> None:
    data = ("--model.attn_mask_type", "block_causal", "--training.dataset", "local", "--training.dataset_path", str(docs),
            "--training.steps", "4")
    plain = losses(train(tmp_path / "plain", *data))
    causal = losses(train(tmp_path / "causal", *data[2:]))
    assert abs(plain[0] - causal[0]) > 1e-4, (plain, causal)
    for name, features in {
        "op": ("--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op"),
        "full+compile": ("--activation_checkpoint.mode", "full", "--compile.enable", "--compile.backend", "aot_eager"),
    }.items():
        got = losses(train(tmp_path / name.replace("+", "_"), *data, *features))
        torch.testing.assert_close(torch.tensor(got), torch.tensor(plain), rtol=1e-5, atol=0, msg=lambda m: f"{name}: {m}")


def test_synthetic_data_gets_the_tokenizers_ids(tmp_path: Path) -> None:
    trainer = train(tmp_path / "run", "--model.attn_mask_type", "block_causal", "--training.dataset", "synthetic",
                    "--training.steps", "1")
    (part,) = trainer.model_parts
    tok = build_tokenizer("")  # model.tokenizer_path: the embedded one
    assert (part.args.bos_id, part.args.eos_id) == (tok.bos_id, tok.eos_id)
    assert part.args.attn_mask_type == "block_causal" and len(trainer.history) == 1


@pytest.mark.parametrize("autocast", [False, True])
def test_every_layer_shares_one_mask_in_the_compute_dtype(autocast: bool) -> None:
    """SDPA given a boolean mask converts it in each layer, and each layer's backward keeps its copy."""
    model = _model(attn_mask_type="block_causal", n_layers=4)
    tokens = torch.cat([_doc(40, torch.Generator().manual_seed(3)), _doc(24, torch.Generator().manual_seed(4))], dim=1)
    saved: dict[int, tuple[torch.dtype, tuple[int, ...]]] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = (t.dtype, tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        model(tokens).float().sum().backward()
    masks = [v for v in saved.values() if v[1] == (1, 1, 64, 64)]
    assert masks == [(torch.bfloat16 if autocast else torch.float32, (1, 1, 64, 64))]


@torch.no_grad()
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_fullgraph_compiled_blocks_take_the_block_mask() -> None:
    """compile.enable compiles each block with fullgraph=True: the BlockMask must trace as an input (forward
    only here, as FlexAttention on CPU; the training is a GPU check)."""
    gen = torch.Generator().manual_seed(5)
    tokens = torch.cat([torch.cat([_doc(24, gen), _doc(40, gen)], dim=1), torch.cat([_doc(50, gen), _doc(14, gen)], dim=1)])
    model = _model(attn_mask_type="block_causal", attn_type="flex")
    eager = model(tokens)
    for name, block in list(model.layers.items()):
        model.layers[name] = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(model(tokens), eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn_type", ["sdpa", "flex"])
def test_a_meta_forward_gives_the_shapes(attn_type: str) -> None:
    """A pipeline stage's shape inference runs on meta tensors in torch 2.11: the mask must build there too."""
    args = replace(LLAMA3_FLAVORS["debugmodel"], n_layers=2, max_seq_len=64, bos_id=BOS, eos_id=EOS,
                   attn_mask_type="block_causal", attn_type=attn_type)
    with torch.device("meta"):
        out = Transformer(args)(torch.zeros(2, 64, dtype=torch.long))
    assert out.shape == (2, 64, 2000) and out.device.type == "meta"
