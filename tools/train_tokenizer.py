"""Train the embedded byte-level BPE tokenizer and write it in Llama 3 `tokenizer.model` format.

    .venv/bin/python tools/train_tokenizer.py   # writes torchtitan_like/assets/tokenizer/tokenizer.model

Corpus: the embedded dataset (the Python standard library's .py files, in seed-0 epoch-0 order),
all of it (about 11 MB on Python 3.11; --max-mb trains on a prefix); about 10 s on 2 cores. Chunks
come from the Llama 3 split pattern (via the `regex` package, which tiktoken itself depends on);
merges are learned over unique chunk counts with incremental pair-count updates, ties broken by the
smaller (left id, right id), so the output is a pure function of the corpus (and so of the Python
version whose standard library it reads: the committed file was trained on CPython 3.11.7).
256 byte tokens + 1488 merges = 1744 base tokens; with the 256 Llama 3 special tokens the vocab is
2000, the debugmodel's.
"""

from __future__ import annotations

import argparse
import base64
import heapq
import math
import os
import secrets
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import regex

from torchtitan_like.components.tokenizer import DEFAULT_TOKENIZER_PATH, LLAMA3_PAT_STR
from torchtitan_like.data.sources import EmbeddedSource
from torchtitan_like.errors import ConfigError
from torchtitan_like.output_files import check_output_file


def corpus_chunks(max_bytes: int | None) -> Counter[bytes]:
    """Counts of the pre-tokenized chunks (UTF-8 bytes) of the embedded corpus (its first `max_bytes`)."""
    pattern = regex.compile(LLAMA3_PAT_STR)
    counts: Counter[bytes] = Counter()
    total = 0
    for doc in EmbeddedSource(seed=0).documents(epoch=0, start=0):
        if max_bytes is not None and total >= max_bytes:
            break
        counts.update(chunk.encode("utf-8") for chunk in pattern.findall(doc))
        total += len(doc.encode("utf-8"))
    return counts


class CorpusTooSmall(ValueError):
    """The corpus has no pair left to merge before the wanted number of tokens."""


def train_bpe(counts: Counter[bytes], n_tokens: int) -> list[bytes]:
    """Token byte strings in rank order: the 256 single bytes, then merges until there are `n_tokens`."""
    vocab = [bytes([b]) for b in range(256)]
    known = {tok: i for i, tok in enumerate(vocab)}
    chunks = sorted(counts)  # fixed word order keeps everything below deterministic
    words = [list(c) for c in chunks]
    freqs = [counts[c] for c in chunks]
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[wi]
            where[pair].add(wi)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)
    while len(vocab) < n_tokens:
        if not heap:
            raise CorpusTooSmall(f"corpus too small: only {len(vocab)} tokens learned (wanted {n_tokens})")
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg or neg == 0:
            continue  # stale heap entry: its count changed after it was pushed
        merged = vocab[pair[0]] + vocab[pair[1]]
        new_id = known.get(merged)
        if new_id is None:  # the same bytes can arise from two different splits: keep one id
            new_id = known[merged] = len(vocab)
            vocab.append(merged)
        changed: set[tuple[int, int]] = set()
        for wi in sorted(where.pop(pair)):
            word, f = words[wi], freqs[wi]
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            if len(out) == len(word):
                continue  # index entry was stale: an earlier merge already consumed this pair
            for q in zip(word, word[1:]):
                pair_counts[q] -= f
                changed.add(q)
            for q in zip(out, out[1:]):
                pair_counts[q] += f
                where[q].add(wi)
                changed.add(q)
            words[wi] = out
        pair_counts.pop(pair, None)
        for q in changed:
            if pair_counts.get(q, 0) > 0:
                heapq.heappush(heap, (-pair_counts[q], q))
    return vocab


def write_tokenizer_model(vocab: list[bytes], path: Path) -> None:
    """One `base64(token) rank` line per token, in rank order (Llama 3 / tiktoken format). Written beside
    `path` and renamed onto it: a failed write (a full disk) never replaces a good tokenizer.model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as f:
            for rank, tok in enumerate(vocab):
                f.write(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    """Exit status 0, or 2 with one error line (a bad argument, a corpus too small, an unwritable output)."""
    parser = argparse.ArgumentParser(prog="tools/train_tokenizer.py", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_TOKENIZER_PATH,
                        help=f"the tokenizer.model to write (default: the committed one, {DEFAULT_TOKENIZER_PATH}, "
                             "which the trainer's default model.tokenizer_path reads)")
    parser.add_argument("--base-tokens", type=int, default=1744, help="256 bytes + merges (at least 256)")
    parser.add_argument("--max-mb", type=float, default=None, help="train on this many corpus MB (default: all)")
    args = parser.parse_args(argv)
    if args.base_tokens < 256:
        parser.error(f"--base-tokens {args.base_tokens} is below 256: the 256 byte tokens come first, merges on top "
                     "(e.g. 1744, the default)")
    if args.max_mb is not None and not (math.isfinite(args.max_mb) and args.max_mb > 0):
        parser.error(f"--max-mb {args.max_mb} must be a positive number of megabytes (leave it out for all the corpus)")
    try:  # before training (seconds to minutes) rather than after
        check_output_file(args.output, f"--output {args.output}", example="tokenizer.model")
    except ConfigError as e:
        parser.error(str(e))
    t0 = time.perf_counter()
    counts = corpus_chunks(None if args.max_mb is None else int(args.max_mb * 1e6))
    t1 = time.perf_counter()
    try:
        vocab = train_bpe(counts, args.base_tokens)
    except CorpusTooSmall as e:
        more = " (raise --max-mb or lower --base-tokens)" if args.max_mb is not None else " (lower --base-tokens)"
        parser.error(f"{e}{more}")
    try:
        write_tokenizer_model(vocab, args.output)
    except OSError as e:  # a full disk, a permission: the old file, if any, is untouched
        print(f"error: cannot write --output {args.output}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(
        f"{len(counts)} unique chunks ({t1 - t0:.1f} s), {len(vocab)} base tokens ({time.perf_counter() - t1:.1f} s)"
        f" -> {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
