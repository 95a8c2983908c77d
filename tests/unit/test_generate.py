"""tools/generate.py: text from a trained checkpoint.

The reference is computed here, apart from the tool: the checkpoint's weights read with DCP into a
model of the job's shape, then the argmax (or the top-k set) of the model's logits at every position
the tool generated. A tool that loaded nothing (the seeded init), another step, or broke the RoPE
table (a dtype cast) gives other tokens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from feature_runs import ROOT, argv, train
from torchtitan_like.components.tokenizer import build_tokenizer
from torchtitan_like.config.loader import load_config
from torchtitan_like.errors import ConfigError
from torchtitan_like.generation import LoadedModel, Sampling, generate, load_model, stop_token_ids
from torchtitan_like.models import MODELS
from torchtitan_like.trainer import job_model_args


def _load_tool():
    """tools/generate.py as a module, without putting tools/ on sys.path (as the other tool tests do)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_tool", ROOT / "tools" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate_tool = _load_tool()

pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
              pytest.mark.usefixtures("restore_root_logger")]

PROMPT = "def add(a, b):"
# The model's own shape: the flavor cut to 2 blocks, a RoPE table of 32 positions (training.seq_len).
SHAPE = ["--model.n_layers", "2", "--training.seq_len", "32"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """8 steps of the debug model, full checkpoints at steps 4 and 8 (the last one model-only)."""
    dump = tmp_path_factory.mktemp("gen") / "run"
    train(dump, "--training.steps", "8", "--checkpoint.enable", "--checkpoint.interval", "4")
    return dump


def _config_args(run: Path, *more: str) -> list[str]:
    return ["--job.config_file", str(ROOT / "train_configs/debug_model.toml"), "--job.dump_folder", str(run),
            *SHAPE, *more]


def _tool(run: Path, *args: str) -> dict:
    """tools/generate.py in this process; its --out report."""
    out = run.parent / "gen.json"
    out.unlink(missing_ok=True)
    assert generate_tool.main([*_config_args(run), "--prompt", PROMPT, *args, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def _reference(run: Path, step: int) -> nn.Module:
    """A model of the job's shape with step `step`'s weights, read with DCP (not the tool's loader)."""
    cfg = load_config(argv(run))
    args = job_model_args(cfg)
    with torch.device("meta"):
        model = MODELS["llama3"].build(args)
    model.to_empty(device="cpu")
    model.init_weights(seed=cfg.debug.seed, buffer_device=torch.device("cpu"))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(run / "checkpoint" / f"step-{step}"))
    assert not torch.equal(init["layers.0.attention.wq.weight"], model.layers["0"].attention.wq.weight)  # trained
    return model.eval()


def _logits_along(model: nn.Module, prompt_ids: list[int], new: list[int]) -> list[torch.Tensor]:
    """The model's next-token logits before each generated token."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + new]))[0]
    return [logits[len(prompt_ids) - 1 + i] for i in range(len(new))]


def _greedy(model: nn.Module, prompt_ids: list[int], n: int) -> list[int]:
    """Up to n argmax tokens, the tokenizer's eos included and last."""
    ids, eos = list(prompt_ids), build_tokenizer("").eos_id
    with torch.no_grad():
        while len(ids) < len(prompt_ids) + n and ids[-1] != eos:
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt_ids):]


@pytest.mark.parametrize("load_step", [None, 4])
def test_greedy_continuation_is_the_trained_models_argmax(run: Path, load_step: int | None) -> None:
    args = ["--max-new-tokens", "12"] + (["--checkpoint.load_step", str(load_step)] if load_step else [])
    report = _tool(run, *args)
    step = load_step or 8
    assert report["step"] == step and report["checkpoint"].endswith(f"step-{step}")
    (result,) = report["results"]
    tok = build_tokenizer("")
    prompt_ids = tok.encode(PROMPT, bos=True, eos=False)
    assert result["prompt_tokens"] == len(prompt_ids)
    new = result["new_token_ids"]
    assert new == _greedy(_reference(run, step), prompt_ids, 12) and len(new) > 4
    assert result["completion"] == tok.decode(new[:-1] if result["stopped_at_eos"] else new)
    assert report["dtype"] == "float32" and report["device"] == "cpu" and result["tokens_per_s"] > 0


def test_sampling_stays_in_the_top_k_and_repeats_with_its_seed(run: Path) -> None:
    tok = build_tokenizer("")
    prompt_ids = tok.encode(PROMPT, bos=True, eos=False)
    model = _reference(run, 8)
    sampled = _tool(run, "--max-new-tokens", "16", "--temperature", "1.0", "--top-k", "3", "--seed", "1")
    new = sampled["results"][0]["new_token_ids"]
    for logits, token in zip(_logits_along(model, prompt_ids, new), new):
        assert token in torch.topk(logits[: tok.vocab_size], 3).indices.tolist()
    again = _tool(run, "--max-new-tokens", "16", "--temperature", "1.0", "--top-k", "3", "--seed", "1")
    assert again["results"][0]["new_token_ids"] == new and sampled["sampling"]["seed"] == 1
    # top_k = 1 is greedy whatever the temperature; a flat distribution with another seed is another text.
    one = _tool(run, "--max-new-tokens", "8", "--temperature", "1.0", "--top-k", "1", "--seed", "2")
    assert one["results"][0]["new_token_ids"] == _greedy(model, prompt_ids, 8)
    hot = [_tool(run, "--max-new-tokens", "16", "--temperature", "3.0", "--seed", str(s))["results"][0]["new_token_ids"]
           for s in (1, 2)]
    assert hot[0] != hot[1]


def test_other_checkpoints_by_path_give_the_same_text(run: Path, tmp_path: Path) -> None:
    """--checkpoint with an HF folder (tools/checkpoint.py's export of the step) loads through the HF
    adapter, a torchtitan-layout folder through the trainer's torchtitan loader."""
    hf = tmp_path / "hf"
    subprocess.run([sys.executable, str(ROOT / "tools/checkpoint.py"), "convert", str(run / "checkpoint/step-8"),
                    str(hf), "--hf", "--flavor", "debugmodel", "--n-layers", "2"], check=True, capture_output=True)
    from_hf = _tool(run, "--max-new-tokens", "10", "--checkpoint", str(hf))
    ours = _tool(run, "--max-new-tokens", "10")
    assert from_hf["checkpoint"] == str(hf) and from_hf["step"] is None
    assert from_hf["results"][0]["new_token_ids"] == ours["results"][0]["new_token_ids"]
    # A model folder that ships a tokenizer: it is used where model.tokenizer_path is unset (here a smaller
    # one, the embedded tokenizer's first 300 ranks: bytes and a few merges, so the prompt takes more ids).
    ranks = (ROOT / "torchtitan_like/assets/tokenizer/tokenizer.model").read_text().splitlines()[:300]
    (hf / "tokenizer.model").write_text("\n".join(ranks) + "\n")
    shipped = _tool(run, "--max-new-tokens", "2", "--checkpoint", str(hf))
    prompt_ids = build_tokenizer(str(hf / "tokenizer.model")).encode(PROMPT, bos=True, eos=False)
    assert shipped["results"][0]["prompt_tokens"] == len(prompt_ids) > ours["results"][0]["prompt_tokens"]
    # A step folder by path: its manifest gives the step.
    by_path = _tool(run, "--max-new-tokens", "10", "--checkpoint", str(run / "checkpoint/step-4"))
    assert by_path["step"] == 4
    # torchtitan's layout (the model's keys at the top level, no manifest): the same weights, the same text.
    flat = tmp_path / "torchtitan_step"
    dcp.save(_reference(run, 8).state_dict(), checkpoint_id=str(flat))
    from_torchtitan = _tool(run, "--max-new-tokens", "10", "--checkpoint", str(flat))
    assert from_torchtitan["step"] is None
    assert from_torchtitan["results"][0]["new_token_ids"] == ours["results"][0]["new_token_ids"]


def test_a_checkpoint_trained_with_another_tokenizer_is_loaded_with_a_warning(run: Path, tmp_path: Path,
                                                                               capsys) -> None:
    """The checkpoint's manifest records its tokenizer: generating with another of the same size (the embedded
    one with two ranks exchanged) once said nothing, and its text was garbage. Now a warning names both."""
    lines = (ROOT / "torchtitan_like/assets/tokenizer/tokenizer.model").read_text().splitlines()
    (a, ra), (b, rb) = lines[1000].split(), lines[1001].split()
    lines[1000], lines[1001] = f"{a} {rb}", f"{b} {ra}"
    other = tmp_path / "tokenizer.model"
    other.write_text("\n".join(lines) + "\n")
    for checkpoint in ([], ["--checkpoint", str(run / "checkpoint/step-4")]):  # (its own run's; one by path)
        capsys.readouterr()
        _tool(run, "--max-new-tokens", "2", "--model.tokenizer_path", str(other), *checkpoint)
        err = capsys.readouterr().err
        assert re.search(rf"WARNING .* was trained with .*tokenizer.*{re.escape(str(other))}", err), (checkpoint, err)
    _tool(run, "--max-new-tokens", "2")
    assert "trained with" not in capsys.readouterr().err


def test_hugging_face_weights_stop_at_their_generation_configs_eos_ids(run: Path, tmp_path: Path, capsys) -> None:
    """Llama 3 instruct models end a turn with <|eot_id|>, listed with <|end_of_text|> as eos_token_id in their
    generation_config.json; generation stopped only at the tokenizer's eos and ran on past the turn. Here the
    file names a token the model generates greedily, which must end the completion."""
    hf = tmp_path / "hf"
    subprocess.run([sys.executable, str(ROOT / "tools/checkpoint.py"), "convert", str(run / "checkpoint/step-8"),
                    str(hf), "--hf", "--flavor", "debugmodel", "--n-layers", "2"], check=True, capture_output=True)
    free = _tool(run, "--max-new-tokens", "8", "--checkpoint", str(hf))["results"][0]
    ids = free["new_token_ids"]
    assert not free["stopped_at_eos"] and len(ids) == 8
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])  # (the first stop is at k, not before)
    tok = build_tokenizer(str(hf))
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_id, ids[k]]}))
    for where in (["--checkpoint", str(hf)], ["--model.hf_assets_path", str(hf)]):  # (the run's own step-8)
        report = _tool(run, "--max-new-tokens", "8", *where)
        r = report["results"][0]
        assert r["new_token_ids"] == ids[: k + 1] and r["stopped_at_eos"] and r["stop_token_id"] == ids[k], where
        assert r["completion"] == tok.decode(ids[:k]) and report["sampling"]["stop_token_ids"] == [tok.eos_id, ids[k]]
    # Without the file (our own checkpoint, no assets): the tokenizer's eos alone, as before.
    assert _tool(run, "--max-new-tokens", "8")["results"][0]["new_token_ids"] == ids
    # An id the tokenizer does not have is refused, naming the file.
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": 128009}))
    assert generate_tool.main([*_config_args(run), "--prompt", PROMPT, "--checkpoint", str(hf)]) == 2
    assert re.search(r"generation_config.json: eos_token_id 128009 is not an id \(or list of ids\) of the tokenizer",
                     capsys.readouterr().err)


def test_stop_tokens_end_the_completion_and_unknown_ones_are_refused() -> None:
    tok = build_tokenizer("")
    eot = stop_token_ids(tok, ["<|eot_id|>"])
    model = _Scripted([65, eot[0], 67], vocab=tok.vocab_size + 8)
    loaded = LoadedModel(model=model, tokenizer=tok, device=torch.device("cpu"), max_len=64, source="x", step=None,
                         stop_ids=(tok.eos_id, *eot))
    r = generate(loaded, "hi", Sampling(max_new_tokens=10), seed=0)
    assert r["new_token_ids"] == [65, eot[0]] and r["stop_token_id"] == eot[0] and r["completion"] == tok.decode([65])
    with pytest.raises(ConfigError, match=r"--stop-token 'eot' is not a special token of the tokenizer"):
        stop_token_ids(tok, ["eot"])


def test_a_prompt_file_with_a_byte_order_mark_is_the_prompt_without_it(run: Path, tmp_path: Path, capsys) -> None:
    """Training drops a .txt document's leading byte-order mark (data/sources.py); --prompt-file does too, so a
    prompt saved by an editor that writes one is encoded as the same text ([bos] text), not [bos] BOM text."""
    with_bom = tmp_path / "prompt.txt"
    with_bom.write_bytes(b"\xef\xbb\xbf" + PROMPT.encode())
    report = _tool(run, "--max-new-tokens", "6", "--prompt-file", str(with_bom))
    plain, from_file = report["results"]
    assert from_file["prompt"] == PROMPT and from_file["prompt_tokens"] == plain["prompt_tokens"]
    assert from_file["new_token_ids"] == plain["new_token_ids"]
    assert "\ufeff" not in capsys.readouterr().out


def test_the_report_names_the_folder_read_for_a_checkpoint_left_aside(run: Path, tmp_path: Path) -> None:
    """A run killed inside a replace leaves its newest checkpoint as step-N.old-*: the loader reads it there
    (load_only renames nothing), and the report names that folder, not a step-N that does not exist."""
    copy = tmp_path / "run"
    shutil.copytree(run / "checkpoint", copy / "checkpoint")
    aside = copy / "checkpoint/step-8.old-0badf00d-1"
    os.rename(copy / "checkpoint/step-8", aside)
    report = _tool(copy, "--max-new-tokens", "6")
    assert report["checkpoint"] == str(aside) and report["step"] == 8 and aside.is_dir()
    assert report["results"][0]["new_token_ids"] == _tool(run, "--max-new-tokens", "6")["results"][0]["new_token_ids"]


def test_bfloat16_weights_keep_a_float32_rope_table(run: Path) -> None:
    cfg = load_config(_config_args(run, "--training.mixed_precision_param", "bfloat16"))
    loaded = load_model(cfg, device=torch.device("cpu"))
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.model.freqs_cis.dtype == torch.float32  # (made again after the cast: not rounded to bfloat16)
    ref = _reference(run, 8)
    torch.testing.assert_close(loaded.model.layers["1"].feed_forward.w2.weight,
                               ref.layers["1"].feed_forward.w2.weight.to(torch.bfloat16), rtol=0, atol=0)
    result = generate(loaded, PROMPT, Sampling(max_new_tokens=4), seed=0)
    assert len(result["new_token_ids"]) == 4


class _Scripted(nn.Module):
    """Logits that put each scripted token first, one per call (the last position only)."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(1, tokens.shape[1], self.vocab)
        logits[0, -1, self.script[self.calls]] = 10.0
        logits[0, -1, self.vocab - 1] = 20.0  # past the tokenizer's ids: never chosen
        self.calls += 1
        return logits


def test_generation_stops_at_eos_and_never_picks_ids_past_the_tokenizer() -> None:
    tok = build_tokenizer("")
    model = _Scripted([65, 66, tok.eos_id, 67], vocab=tok.vocab_size + 8)
    loaded = LoadedModel(model=model, tokenizer=tok, device=torch.device("cpu"), max_len=64, source="x", step=None)
    r = generate(loaded, "hi", Sampling(max_new_tokens=10), seed=0)
    assert r["new_token_ids"] == [65, 66, tok.eos_id] and r["stopped_at_eos"]
    assert r["completion"] == tok.decode([65, 66]) and model.calls == 3


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "40"], r"the prompt \(8 tokens\) plus --max-new-tokens 40 is 48 positions, more than the "
                                 r"model's 32 \(model.max_seq_len"),
    (["--top-k", "5"], "--top-k 5 has no effect with --temperature 0"),
    (["--temperature", "-1"], "--temperature -1.0 must be >= 0"),
    (["--checkpoint", "/nonexistent/step-3"], "--checkpoint /nonexistent/step-3 does not exist"),
    (["--checkpoint", "{run}/checkpoint"], r"--checkpoint \S+/checkpoint holds step folders: pass one, e.g. \S+/step-8$"),
    (["--checkpoint", "{run}/config.toml"], "is neither a DCP checkpoint"),
    (["--model.n_layers", "3"], r"lacks model weights that this model.flavor has: \['layers.2"),
    (["--model.flavor", "debugmodel_tied"], r"output head of its own \(tie_word_embeddings=false\), but this "
                                            "model.flavor ties"),
    (["--stop-token", "eot"], r"--stop-token 'eot' is not a special token of the tokenizer: give one such as "),
    (["--device", "tpu"], r"--device tpu: use cpu, cuda or cuda:N$"),  # (torch.device raised a traceback)
    (["--temperature", "1", "--seed", str(2**64)],  # (torch's manual_seed raised a traceback)
     r"--seed 18446744073709551616 must be in \[-2\*\*63, 2\*\*64\) \(what torch.manual_seed takes\)$"),
    (["--checkpoint", "{run}/ours.safetensors"], r"has this trainer's name, not a Hugging Face one: .* convert FILE "
                                                 "OUT_FOLDER"),
])
def test_bad_requests_are_one_error_line(run: Path, args: list[str], message: str, capsys) -> None:
    if not (run / "ours.safetensors").exists():  # tools/checkpoint.py's export under this trainer's names
        subprocess.run([sys.executable, str(ROOT / "tools/checkpoint.py"), "convert", str(run / "checkpoint/step-8"),
                        str(run / "ours.safetensors")], check=True, capture_output=True)
    rc = generate_tool.main([*_config_args(run), "--prompt", PROMPT, *(a.format(run=run) for a in args)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("error: ")
    assert re.search(message, err), err


def test_no_checkpoint_and_no_prompt_exit_2_from_the_command_line(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "tools/generate.py"), *_config_args(tmp_path / "never_trained")]
    none = subprocess.run([*cmd, "--prompt", "x"], capture_output=True, text=True)
    assert none.returncode == 2, none.stderr
    assert none.stderr.strip().splitlines()[-1].startswith("error: nothing to generate from: ")
    assert "--checkpoint PATH" in none.stderr and none.stdout == ""
    no_prompt = subprocess.run(cmd, capture_output=True, text=True)
    assert no_prompt.returncode == 2 and "error: no prompt: give --prompt TEXT" in no_prompt.stderr


def test_a_tiny_temperature_samples_the_argmax() -> None:
    # logits / 1e-45 overflowed to inf, and softmax of inf is NaN: torch.multinomial raised a RuntimeError.
    from torchtitan_like.generation import next_token

    logits = torch.tensor([1.0, 3.0, 2.5, -1.0])
    generator = torch.Generator().manual_seed(0)
    for temperature in (1e-45, 1e-38):
        for top_k in (0, 2):
            assert next_token(logits, Sampling(1, temperature, top_k), generator) == 1


def test_sampling_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match="--max-new-tokens 0 must be >= 1"):
        Sampling(max_new_tokens=0).check()
    with pytest.raises(ConfigError, match="--top-k -1 must be >= 0"):
        Sampling(max_new_tokens=1, temperature=1.0, top_k=-1).check()
