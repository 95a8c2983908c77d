"""Tokenizer: embedded default, the tokenizer.model format, long inputs, and every user-facing error."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import torch

from torchtitan_like.components.tokenizer import (
    DEFAULT_TOKENIZER_PATH,
    LLAMA3_SPECIAL_TOKENS,
    _split_long_runs,
    build_tokenizer,
    check_vocab,
)
from torchtitan_like.errors import ConfigError, DataError
from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("")


def _write_model(path: Path, tokens: list[bytes]) -> Path:
    path.write_bytes(b"".join(base64.b64encode(t) + b" " + str(r).encode() + b"\n" for r, t in enumerate(tokens)))
    return path


BYTES = [bytes([b]) for b in range(256)]


def test_embedded_vocab_matches_debugmodel(tok):
    assert DEFAULT_TOKENIZER_PATH.is_file()
    assert tok.num_base_tokens == 1744
    assert tok.vocab_size == 2000 == LLAMA3_FLAVORS["debugmodel"].vocab_size
    check_vocab(tok, LLAMA3_FLAVORS["debugmodel"].vocab_size, "debugmodel")  # fits: no error


def test_special_tokens_follow_base_tokens(tok):
    assert len(LLAMA3_SPECIAL_TOKENS) == 256
    assert LLAMA3_SPECIAL_TOKENS[:2] == ["<|begin_of_text|>", "<|end_of_text|>"]
    assert LLAMA3_SPECIAL_TOKENS[-1] == "<|reserved_special_token_246|>"  # Meta: 11 named + 245 reserved
    assert (tok.bos_id, tok.eos_id) == (1744, 1745)
    assert tok.special_tokens["<|eot_id|>"] == 1744 + 9


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello world",
        "def f(x):\n    return x ** 2\n",
        "héllo wörld — 日本語テキスト 😀🚀",
        "\t\r\n  \u00a0 mixed\x00",
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text, bos=False, eos=False)
    assert all(0 <= i < tok.num_base_tokens for i in ids)
    assert tok.decode(ids) == text


def test_bos_eos_framing(tok):
    plain = tok.encode("abc", bos=False, eos=False)
    assert tok.encode("abc", bos=True, eos=True) == [tok.bos_id, *plain, tok.eos_id]
    assert tok.encode("abc", bos=True, eos=False) == [tok.bos_id, *plain]
    assert tok.encode("abc", bos=False, eos=True) == [*plain, tok.eos_id]
    assert tok.decode(torch.tensor(plain)) == "abc"  # decodes a row of a batch as well


def test_special_token_text_is_plain_text(tok):
    ids = tok.encode("<|begin_of_text|>", bos=False, eos=False)
    assert tok.bos_id not in ids and tok.decode(ids) == "<|begin_of_text|>"


def test_long_runs_round_trip(tok):
    text = "x = 1\n" + " " * 60_000 + "a" * 60_000 + "\n" + "word " * 90_000
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


def _meta_split(s: str, max_run: int) -> list[str]:
    """Meta's Llama 3 `_split_whitespaces_or_nonwhitespaces`, verbatim logic, as the reference."""
    out, run_len, start = [], 0, 0
    run_is_space = s[0].isspace() if s else False
    for i in range(len(s)):
        is_space = s[i].isspace()
        if run_is_space ^ is_space:
            run_len, run_is_space = 1, is_space
        else:
            run_len += 1
            if run_len > max_run:
                out.append(s[start:i])
                start, run_len = i, 1
    out.append(s[start:])
    return out


@pytest.mark.parametrize("s", ["", "ab cd", "aaaaaaa   b", "a" * 12, " " * 9 + "x", "ab\n\n\n\n\n\ncdefghij k"])
def test_split_long_runs_matches_meta(s):
    assert list(_split_long_runs(s, 3)) == _meta_split(s, 3)
    assert "".join(_split_long_runs(s, 3)) == s


def test_hand_written_model(tmp_path):
    path = _write_model(tmp_path / "tokenizer.model", BYTES + [b"he", b"ll", b"hell", b"hello"])
    tok = build_tokenizer(str(path))
    assert tok.num_base_tokens == 260 and tok.vocab_size == 516
    assert (tok.bos_id, tok.eos_id) == (260, 261)
    assert tok.encode("hello", bos=True, eos=False) == [260, 259]
    assert tok.encode("help", bos=False, eos=False) == [256, ord("l"), ord("p")]
    assert tok.decode([259, ord("!")]) == "hello!"


def test_missing_file(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(DataError, match="model.tokenizer_path") as exc:
        build_tokenizer(str(missing))
    assert str(missing) in str(exc.value) and "not found" in str(exc.value)
    with pytest.raises(DataError, match=r"tokenizer file '/dev/null' is not a regular file"):
        build_tokenizer("/dev/null")  # (it exists: "not found" misled)


@pytest.mark.parametrize("bad_line", [b"!!notbase64!! 256", b"aGk= notanint", b"aGk=", b"aGk= 1 2"])
def test_malformed_line_names_file_and_line(tmp_path, bad_line):
    path = tmp_path / "tokenizer.model"
    lines = [base64.b64encode(t) + b" " + str(r).encode() for r, t in enumerate(BYTES)]
    lines.insert(2, bad_line)  # becomes line 3 of the file
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match="malformed tokenizer line") as exc:
        build_tokenizer(str(path))
    assert f"{path}:3:" in str(exc.value)


def test_bad_ranks_and_missing_bytes(tmp_path):
    gap = tmp_path / "gap.model"
    gap.write_bytes(b"".join(base64.b64encode(t) + b" " + str(r * 2).encode() + b"\n" for r, t in enumerate(BYTES)))
    with pytest.raises(DataError, match=r"gap.model: ranks must be exactly 0\.\.255"):
        build_tokenizer(str(gap))
    dup = _write_model(tmp_path / "dup.model", BYTES + [b"a"])
    with pytest.raises(DataError, match=r"dup.model:257: token b'a' appears twice"):
        build_tokenizer(str(dup))
    partial = _write_model(tmp_path / "partial.model", BYTES[:100])
    with pytest.raises(DataError, match="not a byte-level BPE: 156 single-byte tokens missing"):
        build_tokenizer(str(partial))
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"\n")
    with pytest.raises(DataError, match="empty"):
        build_tokenizer(str(empty))


def test_vocab_mismatch_names_both_numbers(tok):
    with pytest.raises(ConfigError) as exc:
        check_vocab(tok, 1000, "tiny")
    msg = str(exc.value)
    assert "2000" in msg and "1000" in msg and "model.tokenizer_path" in msg and "model.flavor='tiny'" in msg
