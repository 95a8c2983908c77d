"""The tokenizer files of a Hugging Face export, checked against libraries nobody here wrote: the
`tokenizers` package reading our tokenizer.json must give tiktoken's ids, and transformers must load the
exported folder (AutoTokenizer, AutoModelForCausalLM) and continue a prompt as tools/generate.py does.
"""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from torchtitan_like.components.hf_tokenizer import export_hf_tokenizer, tokenizer_json
from feature_runs import train
from torchtitan_like.components.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
EDGES = "héllo wörld ✓ 12345 1234567\r\n\t  \n\n   x = 1  it's WE'LL  ... --- 日本語 😀  "


def _texts() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = ["textwrap.py", "json/decoder.py", "email/_header_value_parser.py", "unicodedata.py", "difflib.py"]
    return [EDGES] + [(stdlib / f).read_text(encoding="utf-8")[:30000] for f in files if (stdlib / f).is_file()]


def test_the_tokenizer_json_of_a_tiktoken_file_encodes_as_tiktoken_does(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    ours = build_tokenizer("")
    written = export_hf_tokenizer("", tmp_path, model_max_length=4096)
    assert [p.name for p in written] == ["tokenizer.json", "tokenizer_config.json"]
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in _texts():
        ids = ours.encode(text, bos=False, eos=False)
        assert hf.encode(text, add_special_tokens=False).ids == ids
        assert hf.encode(text).ids == [ours.bos_id, *ids]  # the post-processor puts bos first, as training does
        assert hf.decode(ids) == ours.decode(ids)
    assert hf.token_to_id("<|end_of_text|>") == ours.eos_id and hf.get_vocab_size() == ours.vocab_size
    # Our own reader takes it back as the same vocabulary.
    assert build_tokenizer(str(tmp_path / "tokenizer.json")).fingerprint() == ours.fingerprint()


def test_transformers_loads_the_tokenizer_of_an_export(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    ours = build_tokenizer("")
    export_hf_tokenizer("", tmp_path, model_max_length=4096)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (tok.bos_token, tok.eos_token, tok.model_max_length) == ("<|begin_of_text|>", "<|end_of_text|>", 4096)
    assert (tok.bos_token_id, tok.eos_token_id) == (ours.bos_id, ours.eos_id)
    assert tok(EDGES).input_ids == ours.encode(EDGES, bos=True, eos=False)
    assert tok.decode(ours.encode(EDGES, bos=False, eos=False)) == EDGES  # (no clean-up of spaces)


def test_a_tokenizer_json_is_exported_as_it_is(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = tokenizer_json(build_tokenizer(""))
    data["post_processor"] = None  # another file's own choices stay
    (src / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    (tmp_path / "a").mkdir()
    assert len(export_hf_tokenizer(str(src / "tokenizer.json"), tmp_path / "a", model_max_length=64)) == 2
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())["model_max_length"] == 64
    (src / "tokenizer_config.json").write_text('{"bos_token": "<|begin_of_text|>", "their": 1}')
    (tmp_path / "b").mkdir()
    export_hf_tokenizer(str(src), tmp_path / "b", model_max_length=64)  # (a folder, as model.tokenizer_path)
    assert json.loads((tmp_path / "b" / "tokenizer_config.json").read_text())["their"] == 1


def test_a_vocabulary_that_merges_cannot_express_exports_no_tokenizer_with_a_warning(tmp_path, caplog) -> None:
    ranks = [bytes([b]) for b in range(256)] + [b"abc"]  # "abc" without "ab" or "bc": no merge makes it
    path = tmp_path / "odd.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    (tmp_path / "out").mkdir()
    with caplog.at_level(logging.WARNING):
        assert export_hf_tokenizer(str(path), tmp_path / "out", model_max_length=64) == []
    assert "token b'abc' (id 256) is not the merge of two lower-ranked tokens" in caplog.text
    assert not list((tmp_path / "out").iterdir())


def test_exports_carry_the_tokenizer_and_transformers_continues_a_prompt_as_we_do(tmp_path: Path) -> None:
    """The trainer's final HF export (last_save_in_hf) and tools/checkpoint.py convert --hf both write the
    tokenizer; transformers then encodes the prompt as we do and its greedy continuation is ours (each of
    our tokens is its argmax, within float noise: a tie could fall either way on another CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    train(run, "--training.steps", "6", "--checkpoint.enable", "--checkpoint.last_save_in_hf")
    hf = run / "checkpoint" / "step-6" / "hf"
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in hf.iterdir()}
    converted = tmp_path / "converted"
    subprocess.run([sys.executable, str(ROOT / "tools/checkpoint.py"), "convert", str(run / "checkpoint/step-6"),
                    str(converted), "--hf", "--flavor", "debugmodel", "--n-layers", "2"], check=True, capture_output=True)
    assert (converted / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()

    prompt = "import os\ndef main():"
    ours = build_tokenizer("")
    tok = AutoTokenizer.from_pretrained(str(hf))
    assert tok(prompt).input_ids == ours.encode(prompt, bos=True, eos=False)
    out = tmp_path / "gen.json"
    subprocess.run([sys.executable, str(ROOT / "tools/generate.py"), "--job.config_file",
                    str(ROOT / "train_configs/debug_model.toml"), "--job.dump_folder", str(run), "--model.n_layers", "2",
                    "--training.seq_len", "32", "--prompt", prompt, "--max-new-tokens", "12", "--out", str(out)],
                   check=True, capture_output=True)
    new = json.loads(out.read_text())["results"][0]["new_token_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(hf)).float().eval()
    ids = tok(prompt).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids + new])).logits[0, len(ids) - 1 : -1]
    chosen = logits.gather(1, torch.tensor(new)[:, None])[:, 0]
    torch.testing.assert_close(chosen, logits.max(dim=1).values, rtol=0, atol=1e-4)
