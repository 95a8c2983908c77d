"""Llama 3 tiktoken tokenizer: loads a `tokenizer.model` (base64 token bytes + rank per line).

The embedded default (torchtitan_like/assets/tokenizer/tokenizer.model) is a small byte-level BPE
trained by tools/train_tokenizer.py; with the 256 Llama 3 special tokens its vocab is 2000, the
debugmodel's. A real Llama 3 tokenizer.model (128000 base tokens) gives 128256.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

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

    def __init__(self, mergeable_ranks: dict[bytes, int], *, name: str) -> None:
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
    if not ranks:
        raise DataError(f"{path}: tokenizer file is empty")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise DataError(f"{path}: ranks must be exactly 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise DataError(f"{path}: not a byte-level BPE: {len(missing)} single-byte tokens missing (first {missing[0]})")
    return ranks


def build_tokenizer(tokenizer_path: str) -> Tokenizer:
    """Load `tokenizer_path` ("" = the embedded default tokenizer)."""
    path = Path(tokenizer_path) if tokenizer_path else DEFAULT_TOKENIZER_PATH
    if path.is_dir():
        # A Hugging Face download: its tiktoken file is original/tokenizer.model.
        found = [p for p in (path / "original" / "tokenizer.model", path / "tokenizer.model") if p.is_file()]
        if not found:
            raise DataError(
                f"model.tokenizer_path={str(path)!r} is a folder with no tokenizer.model in it (nor in original/): "
                "point it at a tiktoken tokenizer.model file (in a Hugging Face Llama 3 download: "
                "original/tokenizer.model)"
            )
        path = found[0]
    if not path.is_file():
        what = "is not a regular file (a device or pipe)" if path.exists() else "not found"
        raise DataError(
            f"model.tokenizer_path: tokenizer file {str(path)!r} {what} (leave it empty for the embedded tokenizer)"
        )
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head.startswith(b"{"):
        raise DataError(
            f"model.tokenizer_path={str(path)!r} is JSON (a Hugging Face tokenizer.json), which is not supported: use "
            "the tiktoken tokenizer.model (original/tokenizer.model in a Hugging Face Llama 3 download)"
        )
    return Tokenizer(load_bpe_ranks(path), name=path.name)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, flavor: str) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding table."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ConfigError(
            f"tokenizer vocab size {tokenizer.vocab_size} (model.tokenizer_path) exceeds the model vocab size "
            f"{model_vocab_size} (model.flavor={flavor!r}): use a matching tokenizer or a flavor with a larger vocab"
        )
