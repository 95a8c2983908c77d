"""model.tokenizer_path may name a Hugging Face tokenizer.json (or a folder with one and no tokenizer.model,
as torchtitan's asset download leaves it): the same vocabulary as the tiktoken file, so the same ids.

The files here are the embedded tokenizer.model written in tokenizer.json's layout (GPT-2's byte
alphabet, Llama 3's split pattern and added tokens) by the Hugging Face export's writer, so both must
give the same tokenizer.
"""

from __future__ import annotations

import copy
import json
import sysconfig
from pathlib import Path

import pytest

from torchtitan_like.components.hf_tokenizer import tokenizer_json
from torchtitan_like.components.tokenizer import DEFAULT_TOKENIZER_PATH, build_tokenizer
from torchtitan_like.errors import DataError


@pytest.fixture(scope="module")
def reference() -> dict:
    # The export's writer, which the `tokenizers` package itself checks (test_hf_tokenizer_export.py).
    return tokenizer_json(build_tokenizer(""))


def _write(folder: Path, data: dict | str, name: str = "tokenizer.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def test_a_tokenizer_json_folder_gives_the_same_ids_as_the_tiktoken_file(reference, tmp_path) -> None:
    folder = tmp_path / "assets" / "hf" / "Llama-3.1-8B"  # torchtitan's download: no original/ in it
    _write(folder, reference)
    _write(folder, {"bos_token": "<|begin_of_text|>"}, name="tokenizer_config.json")
    ours, tiktoken_file = build_tokenizer(str(folder)), build_tokenizer("")
    assert (ours.vocab_size, ours.bos_id, ours.eos_id) == (tiktoken_file.vocab_size, tiktoken_file.bos_id, tiktoken_file.eos_id)
    assert ours.fingerprint() == tiktoken_file.fingerprint()  # checkpoints and PREFIX.json records accept either
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()[:6000] + " héllo wörld ✓ 12345\r\n\t"
    assert ours.encode(text, bos=True, eos=True) == tiktoken_file.encode(text, bos=True, eos=True)
    assert ours.decode(ours.encode(text, bos=False, eos=False)) == text
    assert build_tokenizer(str(folder / "tokenizer.json")).fingerprint() == ours.fingerprint()
    assert len(reference["model"]["merges"]) >= len(reference["model"]["vocab"]) - 256  # (the order check ran)
    listed = copy.deepcopy(reference)  # special tokens in model.vocab as well as in added_tokens
    listed["model"]["vocab"].update({t["content"]: t["id"] for t in listed["added_tokens"]})
    assert build_tokenizer(str(_write(tmp_path / "listed", listed))).fingerprint() == ours.fingerprint()
    pairs = copy.deepcopy(reference)  # the newer format: each merge a [left, right] list
    pairs["model"]["merges"] = [m.split(" ") for m in pairs["model"]["merges"]]
    assert build_tokenizer(str(_write(tmp_path / "pairs", pairs))).fingerprint() == ours.fingerprint()


def test_a_folder_prefers_metas_tokenizer_model(reference, tmp_path) -> None:
    _write(tmp_path, reference)
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "tokenizer.model").write_bytes(DEFAULT_TOKENIZER_PATH.read_bytes())
    assert build_tokenizer(str(tmp_path)).model.name == "tokenizer.model"
    (tmp_path / "original" / "tokenizer.model").unlink()
    assert build_tokenizer(str(tmp_path)).model.name == "tokenizer.json"


def _broken(reference: dict, change) -> dict:
    data = copy.deepcopy(reference)
    change(data)
    return data


BROKEN = {
    "wordpiece": (lambda d: d["model"].update(type="WordPiece"), "not a BPE tokenizer.json"),
    "normalizer": (lambda d: d.update(normalizer={"type": "NFC"}), "normalizes text first"),
    "gpt2_split": (lambda d: d.update(pre_tokenizer={"type": "ByteLevel", "use_regex": True}), "not Llama 3's pattern"),
    "other_regex": (lambda d: d["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\s+|\S+"),
                    "not Llama 3's pattern"),
    "string_split": (lambda d: d["pre_tokenizer"]["pretokenizers"][0].update(pattern=" "), "not Llama 3's pattern"),
    "not_byte_level": (lambda d: d["model"]["vocab"].update({"€": len(d["model"]["vocab"])}),
                       "not in the byte-level alphabet"),
    "rank_gap": (lambda d: d["model"]["vocab"].update({"ĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠ": 10**6}), "ranks must be exactly"),
    "string_id": (lambda d: d["model"]["vocab"].update({"ĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠ": "7"}), "not an integer"),
    "bos_elsewhere": (lambda d: d["added_tokens"][0].update(id=5), "<|begin_of_text|> has id 5"),
    "merge_order": (lambda d: d["model"]["merges"].reverse(), "not in id order"),
    "merge_unknown": (lambda d: d["model"]["merges"].append("Ġ ĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠ"), "not in model.vocab"),
    "merge_shape": (lambda d: d["model"]["merges"].insert(0, ["a", "b", "c"]), r"merges\[0\]"),
    "merge_missing": (lambda d: d["model"]["merges"].pop(), r"model\.merges lacks .*, the merge that builds token"),
    # Accepted once, while Hugging Face's `tokenizers` gave other ids for them (" hello" for "hello", random
    # merges, suffixed tokens) than ours, and an export copied the file as it is.
    "prefix_space": (lambda d: d["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True),
                     r"pre_tokenizer ByteLevel\.add_prefix_space is true, which Llama 3's tokenizer\.json does not set"),
    "dropout": (lambda d: d["model"].update(dropout=0.1), r"model\.dropout is 0\.1"),
    "subword_prefix": (lambda d: d["model"].update(continuing_subword_prefix="##"), r"model\.continuing_subword_prefix"),
    "word_suffix": (lambda d: d["model"].update(end_of_word_suffix="</w>"), r"model\.end_of_word_suffix is \"</w>\""),
}


def _three_letter_vocab(reference: dict, tokens: list[str], merges: list[str], *, ignore_merges: bool) -> dict:
    """The 256 bytes, then `tokens` (ids 256, 257, ...), `merges`, and the special tokens right after them."""
    data = copy.deepcopy(reference)
    vocab = {token: i for token, i in reference["model"]["vocab"].items() if i < 256}
    vocab.update({token: 256 + i for i, token in enumerate(tokens)})
    data["model"].update(vocab=vocab, merges=merges, ignore_merges=ignore_merges)
    data["added_tokens"] = [dict(t, id=len(vocab) + i) for i, t in enumerate(reference["added_tokens"])]
    return data


def test_merges_that_hugging_face_cannot_build_every_token_with_are_refused(reference, tmp_path) -> None:
    """Merges in id order are not enough: Hugging Face merges only the pairs its list names, tiktoken any two
    parts that make a token. With "ab" (256), "bc" (257) and "abc" (258) made by "a bc" only, tiktoken gives
    "abcd" as [abc, d], the tokenizers package as [ab, c, d]; that file was accepted as the same ids."""
    hf_tokenizer = pytest.importorskip("tokenizers").Tokenizer

    def hf_ids(path: Path, text: str) -> list[int]:
        return hf_tokenizer.from_file(str(path)).encode(text, add_special_tokens=False).ids

    only_a_bc = _three_letter_vocab(reference, ["ab", "bc", "abc"], ["a b", "b c", "a bc"], ignore_merges=True)
    assert hf_ids(_write(tmp_path / "a_bc", only_a_bc), "abcd") == [256, 99, 100]
    with pytest.raises(DataError, match=r'model\.merges lacks "ab c", the merge that builds token \'abc\' \(id 258\)'):
        build_tokenizer(str(_write(tmp_path / "a_bc", only_a_bc)))
    # Hugging Face's own conversion lists every split of a token (both here): accepted, and the ids agree.
    both = _three_letter_vocab(reference, ["ab", "bc", "abc"], ["a b", "b c", "a bc", "ab c"], ignore_merges=True)
    path = _write(tmp_path / "both", both)
    assert build_tokenizer(str(path)).encode("abcd", bos=False, eos=False) == hf_ids(path, "abcd") == [258, 100]
    # A token no merge builds ("abc" without "ab" or "bc"): whole, tiktoken looks it up; Hugging Face does
    # too only with ignore_merges.
    whole = _three_letter_vocab(reference, ["abc"], [], ignore_merges=False)
    assert hf_ids(_write(tmp_path / "whole", whole), "abc") == [97, 98, 99]
    with pytest.raises(DataError, match=r"no BPE merge builds token 'abc' \(id 256\) from two tokens, and "
                                        r"model\.ignore_merges is not true"):
        build_tokenizer(str(_write(tmp_path / "whole", whole)))
    whole["model"]["ignore_merges"] = True
    path = _write(tmp_path / "whole", whole)
    assert build_tokenizer(str(path)).encode("abc", bos=False, eos=False) == hf_ids(path, "abc") == [256]


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_tokenizer_json_that_is_not_llama_3s_is_refused_saying_why(case: str, reference, tmp_path) -> None:
    change, message = BROKEN[case]
    path = _write(tmp_path, _broken(reference, change))
    with pytest.raises(DataError, match=message) as e:
        build_tokenizer(str(path))
    assert str(path) in str(e.value)


def test_added_tokens_beyond_llama_3s_special_tokens_are_refused_naming_them(reference, tmp_path) -> None:
    """A `<pad>` appended at the first id past the 256 special tokens, or a non-special added token: Hugging Face
    matches them in text, and they were dropped here without a word (the text got other ids than under HF)."""
    n = reference["added_tokens"][0]["id"] + 256
    pad = _broken(reference, lambda d: d["added_tokens"].append(
        {"id": n, "content": "<pad>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}))
    path = _write(tmp_path / "pad", pad)
    hf = pytest.importorskip("tokenizers").Tokenizer.from_file(str(path))
    assert hf.encode("a<pad>b", add_special_tokens=False).ids[1] == n  # (Hugging Face matches it in text)
    with pytest.raises(DataError, match=rf"added_tokens holds 1 token\(s\) besides Llama 3's 256 special tokens "
                                        rf"\(special, ids {n - 256}..{n - 1}\): '<pad>' \(id {n}\); .*remove them"):
        build_tokenizer(str(path))
    plain = _broken(reference, lambda d: d["added_tokens"][-1].update(special=False))
    with pytest.raises(DataError, match=r"'<\|reserved_special_token_246\|>' \(id \d+, not special\)"):
        build_tokenizer(str(_write(tmp_path / "plain", plain)))


def test_a_malformed_tokenizer_json_names_its_line(tmp_path) -> None:
    path = _write(tmp_path, '{\n  "version": "1.0",\n  "model": {\n    "type": "BPE",,\n  }\n}\n')
    with pytest.raises(DataError, match=r"tokenizer.json:4: malformed tokenizer.json"):
        build_tokenizer(str(tmp_path))


def test_a_tokenizer_json_trains_through_run_train(reference, tmp_path) -> None:
    import subprocess

    root = Path(__file__).resolve().parents[2]
    folder = tmp_path / "tok"
    _write(folder, reference)
    r = subprocess.run(
        ["./run_train.sh", "--model.tokenizer_path", str(folder), "--job.dump_folder", str(tmp_path / "run"),
         "--training.steps", "1", "--training.seq_len", "32", "--model.n_layers", "1"],
        cwd=root, env={"NGPU": "1", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=240,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step:    1" in r.stdout + r.stderr
