"""Llama 3 tiktoken tokenizer: loads a `tokenizer.model` (base64 token bytes + rank per line), or the
same vocabulary from a Hugging Face `tokenizer.json` (what torchtitan's asset download fetches).

The embedded default (torchtitan_like/assets/tokenizer/tokenizer.model) is a small byte-level BPE
trained by tools/train_tokenizer.py; with the 256 Llama 3 special tokens its vocab is 2000, the
debugmodel's. A real Llama 3 tokenizer.model (128000 base tokens) gives 128256.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import tiktoken

from torchtitan_like.errors import ConfigError, DataError

# Meta's Llama 3 pre-tokenization split (tiktoken syntax: needs \p{L} / \p{N} classes).
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
_NAMED_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
LLAMA3_SPECIAL_TOKENS = _NAMED_SPECIALS + [
    f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(_NAMED_SPECIALS))
]

DEFAULT_TOKENIZER_PATH = Path(__file__).resolve().parent.parent / "assets" / "tokenizer" / "tokenizer.model"

# Same limits as Meta's Llama 3 tokenizer: tiktoken gets slow (quadratic) on very long runs of
# whitespace or non-whitespace, so text is cut into pieces no run of which exceeds these lengths.
# (encode cuts a text at every multiple of ENCODE_CHUNK_CHARS: a text cut elsewhere first at such
# multiples encodes to the same tokens piece by piece, which data/sources.py relies on.)
ENCODE_CHUNK_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_SPACE_RUNS = re.compile(r"\s+")


class Tokenizer:
    """Byte-level BPE with Llama 3 special tokens; `encode` never treats special-token text as special."""

    def __init__(self, mergeable_ranks: dict[bytes, int], *, name: str, source: Path | None = None) -> None:
        """`source`: the file it was read from (for identity(); None for one built in memory)."""
        self.source = source
        self.num_base_tokens = len(mergeable_ranks)
        self.special_tokens = {tok: self.num_base_tokens + i for i, tok in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(
            name=name, pat_str=LLAMA3_PAT_STR, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens
        )
        self.vocab_size = self.num_base_tokens + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self._ranks = mergeable_ranks
        self._fingerprint: str | None = None

    @property
    def ranks(self) -> dict[bytes, int]:
        """The base vocabulary: each token's bytes -> its id (its BPE merge rank)."""
        return self._ranks

    def fingerprint(self) -> str:
        """sha256 of the vocabulary (every token's bytes, by rank, then the special tokens): equal for two
        tokenizers exactly when they map text to the same ids, whatever file each was read from. Computed
        once (~0.1 s for a 128K vocabulary)."""
        if self._fingerprint is not None:
            return self._fingerprint
        h = hashlib.sha256()
        for token, rank in sorted(self._ranks.items(), key=lambda item: item[1]):
            h.update(rank.to_bytes(4, "little") + len(token).to_bytes(4, "little") + token)
        for token, rank in self.special_tokens.items():
            h.update(rank.to_bytes(4, "little") + token.encode())
        self._fingerprint = h.hexdigest()
        return self._fingerprint

    def identity(self) -> dict[str, Any]:
        """What a checkpoint records of the tokenizer it was trained with (checkpoint.py compares the
        fingerprint; the file and its kind only say where it came from: a tokenizer.model and the
        tokenizer.json converted from it have one fingerprint)."""
        kind = "tokenizer.json" if self.source is not None and is_hf_tokenizer_json(self.source) else "tokenizer.model"
        return {"fingerprint": self.fingerprint(), "vocab_size": self.vocab_size, "kind": kind,
                "file": str(self.source) if self.source is not None else None}

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        """Token ids of `text`, optionally framed by bos/eos."""
        ids = [self.bos_id] if bos else []
        chunk = ENCODE_CHUNK_CHARS
        for i in range(0, len(text), chunk):
            for piece in _split_long_runs(text[i : i + chunk], _MAX_RUN_CHARS):
                ids.extend(self.model.encode_ordinary(piece))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (a list or a 1-D tensor); invalid UTF-8 byte sequences become U+FFFD."""
        return self.model.decode([int(i) for i in ids])


def _split_long_runs(s: str, max_run: int) -> Iterator[str]:
    """Meta's `_split_whitespaces_or_nonwhitespaces`, with a C-speed check that skips it when no run is long."""
    if len(s) <= max_run or (
        max(map(len, s.split()), default=0) <= max_run and max(map(len, _SPACE_RUNS.findall(s)), default=0) <= max_run
    ):
        yield s
        return
    run_len = 0
    run_is_space = s[0].isspace()
    start = 0
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if run_is_space ^ is_space:
            run_len, run_is_space = 1, is_space
        else:
            run_len += 1
            if run_len > max_run:
                yield s[start:i]
                start, run_len = i, 1
    yield s[start:]


def load_bpe_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tokenizer.model file; every defect is a DataError naming the file and line."""
    # Same format as tiktoken.load.load_tiktoken_bpe, parsed here because that function caches
    # local files by path in $TMPDIR/data-gym-cache (tiktoken 0.14): a regenerated file at the same
    # path would silently load stale contents. Parsing here also gives line numbers in errors.
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError("expected '<base64 token> <rank>'")
                token = base64.b64decode(parts[0], validate=True)
                rank = int(parts[1])
            except (ValueError, binascii.Error) as e:
                shown = line.decode("utf-8", "replace").strip()[:60]
                raise DataError(f"{path}:{lineno}: malformed tokenizer line {shown!r} ({e})") from None
            if token in ranks:
                raise DataError(f"{path}:{lineno}: token {token!r} appears twice")
            ranks[token] = rank
    _check_ranks(ranks, path)
    return ranks


def _check_ranks(ranks: dict[bytes, int], path: Path) -> None:
    """A byte-level BPE's ranks: 0..n-1 each once, and every single byte a token."""
    if not ranks:
        raise DataError(f"{path}: tokenizer file is empty")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise DataError(f"{path}: ranks must be exactly 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise DataError(f"{path}: not a byte-level BPE: {len(missing)} single-byte tokens missing (first {missing[0]})")


def build_tokenizer(tokenizer_path: str, *, key: str = "model.tokenizer_path") -> Tokenizer:
    """Load `tokenizer_path` ("" = the embedded default tokenizer): a tiktoken tokenizer.model, a Hugging
    Face tokenizer.json, or a folder holding one (original/tokenizer.model first, as Meta ships it).
    `key`: the config key that named it, for the errors (tokenizer_key)."""
    path = tokenizer_file(tokenizer_path, key=key)
    if is_hf_tokenizer_json(path):
        return Tokenizer(load_hf_tokenizer_json(path), name=path.name, source=path.resolve())
    return Tokenizer(load_bpe_ranks(path), name=path.name, source=path.resolve())


def is_hf_tokenizer_json(path: Path) -> bool:
    """A Hugging Face tokenizer.json (JSON) rather than a tiktoken tokenizer.model (base64 lines)."""
    with open(path, "rb") as f:
        return f.read(64).lstrip().startswith(b"{")


def tokenizer_file(tokenizer_path: str, *, key: str = "model.tokenizer_path") -> Path:
    """The file build_tokenizer reads for `tokenizer_path` (DataError naming `key` when there is none)."""
    path = Path(tokenizer_path) if tokenizer_path else DEFAULT_TOKENIZER_PATH
    if path.is_dir():
        candidates = (path / "original" / "tokenizer.model", path / "tokenizer.model", path / "tokenizer.json")
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise DataError(
                f"{key}={str(path)!r} is a folder with no tokenizer.model (nor original/tokenizer.model) "
                "and no tokenizer.json in it: point it at a Llama 3 tokenizer.model or tokenizer.json"
            )
        path = found[0]
    if not path.is_file():
        what = "is not a regular file (a device or pipe)" if path.exists() else "not found"
        fix = {
            "model.tokenizer_path": "leave it empty for the embedded tokenizer",
            "--tokenizer": "leave --tokenizer out for the embedded tokenizer",
        }.get(key, "download the model's assets there, or set model.tokenizer_path")
        raise DataError(f"{key}: tokenizer file {str(path)!r} {what} ({fix})")
    return path


def describe_identity(identity: dict[str, Any]) -> str:
    """One line for a Tokenizer.identity() (as read back from a manifest: any field may be missing)."""
    fingerprint = str(identity.get("fingerprint"))[:12]
    return f"{identity.get('file')}: {identity.get('kind')}, vocab {identity.get('vocab_size')}, sha256 {fingerprint}..."


def tokenizer_key(model: Any) -> str:
    """The config key that names the tokenizer of `model` (the [model] section): model.hf_assets_path where
    model.tokenizer_path was taken from it (config/loader.py), else model.tokenizer_path."""
    if model.hf_assets_path and model.tokenizer_path == model.hf_assets_path:
        return "model.hf_assets_path"
    return "model.tokenizer_path"


def byte_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet of Hugging Face tokenizer.json files (GPT-2's): each byte is stored as
    one printable character. Bytes that print as themselves (! to ~, and Latin-1's ¡ to ¬ and ® to ÿ)
    keep their code point; the other 68 take U+0100, U+0101, ... in byte order. Returns char -> byte."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    alphabet = {chr(b): b for b in printable}
    alphabet.update({chr(0x100 + i): b for i, b in enumerate(others)})
    return alphabet


def load_hf_tokenizer_json(path: Path) -> dict[bytes, int]:
    """The tiktoken ranks of a Llama 3 family tokenizer.json: its byte-level BPE vocabulary, ids as ranks
    (how Hugging Face converted Meta's tokenizer.model, so both files give the same ids). Anything else
    (another model type, split pattern or special-token layout) is a DataError that says what differs."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed tokenizer.json ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: tokenizer.json is not UTF-8 ({e.reason} at byte {e.start})") from None
    model = data.get("model") if isinstance(data, dict) else None
    kind = model.get("type") if isinstance(model, dict) else None
    if kind != "BPE":
        raise DataError(f"{path}: not a BPE tokenizer.json (model.type={kind!r}): only Llama 3's byte-level BPE is "
                        "supported")
    if not isinstance(model.get("vocab"), dict):
        raise DataError(f"{path}: model.vocab is missing or not an object of token: id (an incomplete download?)")
    normalizer = data.get("normalizer")
    if normalizer is not None:
        kind = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
        raise DataError(f"{path}: it normalizes text first (normalizer {kind!r}), which Llama 3's tokenizer does not: "
                        "only Llama 3 family tokenizers are supported")
    pattern = _split_pattern(data.get("pre_tokenizer"))
    if pattern != LLAMA3_PAT_STR:
        raise DataError(f"{path}: its pre-tokenizer splits text with {pattern!r}, not Llama 3's pattern: only Llama 3 "
                        "family tokenizers are supported (another split would give other tokens)")
    # Settings that change Hugging Face's tokens, which tiktoken's ranks cannot express (Llama 3's file sets none).
    byte_level = data["pre_tokenizer"]["pretokenizers"][1]  # (_split_pattern checked the layout)
    changes = {"pre_tokenizer ByteLevel.add_prefix_space": byte_level.get("add_prefix_space"),
               **{f"model.{key}": model.get(key) for key in ("dropout", "continuing_subword_prefix",
                                                               "end_of_word_suffix")}}
    for key, value in changes.items():
        if value:
            raise DataError(f"{path}: {key} is {json.dumps(value)}, which Llama 3's tokenizer.json does not set and "
                            "which changes the tokens Hugging Face makes: only Llama 3 family tokenizers are supported")
    alphabet = byte_alphabet()
    added = {t.get("content"): t.get("id") for t in data.get("added_tokens") or [] if isinstance(t, dict)}
    ranks: dict[bytes, int] = {}
    for token, rank in model["vocab"].items():
        if added.get(token, -1) == rank:
            continue  # a special token listed in the vocabulary too (some files do): not a BPE token
        if type(rank) is not int:
            raise DataError(f"{path}: vocab token {token!r} has id {rank!r}, not an integer")
        try:
            ranks[bytes(alphabet[ch] for ch in token)] = rank
        except KeyError as e:
            raise DataError(f"{path}: vocab token {token!r} has {e.args[0]!r}, which is not in the byte-level alphabet: "
                            "not a byte-level BPE") from None
    _check_ranks(ranks, path)
    merges = _check_merge_order(model["vocab"], model.get("merges") or [], path)
    _check_merges_build_every_token(ranks, merges, ignore_merges=model.get("ignore_merges") is True, path=path)
    # Our Tokenizer puts Llama 3's special tokens right after the base vocabulary; bos and eos must be there.
    for i, name in enumerate(LLAMA3_SPECIAL_TOKENS[:2]):
        if added.get(name) != len(ranks) + i:
            raise DataError(f"{path}: {name} has id {added.get(name)!r} in added_tokens, not {len(ranks) + i} (right "
                            "after the base vocabulary, as in Llama 3): not a Llama 3 family tokenizer")
    # Hugging Face matches every added token in the text before its BPE runs (a `<pad>` written in a document
    # becomes its id); this tokenizer has Llama 3's 256 special tokens alone, right after the base vocabulary,
    # and encodes all text as data. Another added token would be dropped here, and text holding it would get
    # other ids than under Hugging Face: refused.
    n = len(ranks)
    extra = [t for t in data.get("added_tokens") or [] if not (
        isinstance(t, dict) and t.get("special") is True and type(t.get("id")) is int
        and n <= t["id"] < n + NUM_SPECIAL_TOKENS)]
    if extra:
        shown = ", ".join(
            f"{t.get('content')!r} (id {t.get('id')!r}{'' if t.get('special') is True else ', not special'})"
            if isinstance(t, dict) else repr(t) for t in extra[:5])
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise DataError(f"{path}: added_tokens holds {len(extra)} token(s) besides Llama 3's {NUM_SPECIAL_TOKENS} special "
                        f"tokens (special, ids {n}..{n + NUM_SPECIAL_TOKENS - 1}): {shown}{more}; Hugging Face matches "
                        "them in text and this tokenizer cannot: remove them from added_tokens (only Llama 3 family "
                        "tokenizers are supported)")
    return ranks


def _check_merge_order(vocab: dict[str, int], merges: list, path: Path) -> set[tuple[str, str]]:
    """tiktoken applies the merge whose result has the lowest id; Hugging Face applies the earliest merge in
    the list. They agree when the merges are in the order of their results' ids, as in Llama 3's file.
    Returns the merges as (left, right) pairs."""
    last = -1
    pairs: set[tuple[str, str]] = set()
    for i, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise DataError(f"{path}: model.merges[{i}] is {merge!r}, not a pair of tokens")
        rank = vocab.get(pair[0] + pair[1])
        if rank is None:
            raise DataError(f"{path}: model.merges[{i}] {merge!r} makes a token that is not in model.vocab")
        if rank < last:
            raise DataError(
                f"{path}: model.merges[{i}] {merge!r} makes id {rank} after a merge that made id {last}: the merges "
                "are not in id order, so its ids would tokenize differently here than under Hugging Face"
            )
        last = rank
        pairs.add((pair[0], pair[1]))
    return pairs


def _check_merges_build_every_token(ranks: dict[bytes, int], merges: set[tuple[str, str]], *, ignore_merges: bool,
                                    path: Path) -> None:
    """Hugging Face merges only the pairs its list names; tiktoken merges any two adjacent parts that make a
    token (the lowest id first). Inside a longer piece tiktoken builds each token with the last merge of its
    own BPE (bpe_parts): the list must name that pair, or Hugging Face stops short of the token. A token that
    BPE never reaches (tiktoken's lookup of whole pieces makes it) needs ignore_merges, as in Llama 3's file."""
    chars = {b: ch for ch, b in byte_alphabet().items()}
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        parts = bpe_parts(ranks, token, below=rank)
        text = ["".join(chars[b] for b in part) for part in parts]
        if len(parts) == 2 and (text[0], text[1]) not in merges:
            raise DataError(f"{path}: model.merges lacks \"{text[0]} {text[1]}\", the merge that builds token "
                            f"{''.join(text)!r} (id {rank}) in tiktoken's BPE: Hugging Face would tokenize text that "
                            "holds it differently (a merges list that is not Llama 3's)")
        if len(parts) != 2 and not ignore_merges:
            raise DataError(f"{path}: no BPE merge builds token {''.join(text)!r} (id {rank}) from two tokens, and "
                            "model.ignore_merges is not true: Hugging Face would split that word where tiktoken keeps "
                            "it whole; set \"ignore_merges\": true in model, as Llama 3's tokenizer.json does")


def bpe_parts(ranks: dict[bytes, int], token: bytes, *, below: int) -> list[bytes]:
    """tiktoken's BPE of `token` with only the merges that make tokens of rank < `below`: for a token's own
    rank, the two parts its last merge joins (more where BPE never reaches the token)."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_rank = -1, below
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def _split_pattern(pre_tokenizer: object) -> str | None:
    """The regex of a tokenizer.json pre-tokenizer that is a Split then a ByteLevel without its own regex
    (Llama 3's), else None."""
    if not isinstance(pre_tokenizer, dict) or pre_tokenizer.get("type") != "Sequence":
        return None
    steps = pre_tokenizer.get("pretokenizers")
    if not (isinstance(steps, list) and len(steps) == 2 and all(isinstance(s, dict) for s in steps)):
        return None
    split, byte_level = steps
    if split.get("type") != "Split" or (split.get("behavior"), split.get("invert")) != ("Isolated", False):
        return None
    if byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True):
        return None
    pattern = split.get("pattern")
    regex = pattern.get("Regex") if isinstance(pattern, dict) else None  # ({"String": ...} splits on a literal)
    return regex if isinstance(regex, str) else None


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, flavor: str) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding table."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ConfigError(
            f"tokenizer vocab size {tokenizer.vocab_size} (model.tokenizer_path) exceeds the model vocab size "
            f"{model_vocab_size} (model.flavor={flavor!r}): use a matching tokenizer or a flavor with a larger vocab"
        )
