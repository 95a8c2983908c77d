"""Pre-tokenized data in the indexed format that Megatron-LM's and NeMo's preprocess_data.py write:
PREFIX.bin (the token ids of every document, one after another) and PREFIX.idx (their dtype, and each
sequence's length and byte offset in PREFIX.bin).

`dataset = "indexed"` reads PREFIX.bin as one token stream, in order, and cuts it into the windows of
seq_len + 1 tokens that packed documents are cut into: sample i is tokens [i * (seq_len + 1),
(i + 1) * (seq_len + 1)) of the stream, which wraps to its start when training runs past its end (the
next epoch, in the same order). Nothing is tokenized at run time, and each rank reads only its slice of
every global batch. The position is the loader's sample cursor, so a resume is exact, under any
data-parallel degree. `tools/pretokenize.py` writes the pair from any dataset the trainer reads,
tokenized as the packer does ([bos] doc [eos] per record), so the first epoch's batches are the same as
training on that dataset directly.

PREFIX.idx, little-endian: the 9 bytes b"MMIDIDX\\x00\\x00", u64 version (1), u8 dtype code (1 uint8,
2 int8, 3 int16, 4 int32, 5 int64, 8 uint16; 6 and 7 are floats), u64 sequence count S, u64 document
count D, then int32 lengths[S] (tokens), int64 pointers[S] (byte offsets into PREFIX.bin), int64
document indices[D] (the first sequence of each document, then S).

tools/pretokenize.py also writes PREFIX.json: the tokenizer's vocabulary fingerprint, the source and the
counts. Where it exists, a run whose model.tokenizer_path maps text to other ids is refused (the format
itself records no tokenizer, so Megatron-LM's files are only checked for ids outside the vocabulary).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset

from torchtitan_like.components.tokenizer import Tokenizer
from torchtitan_like.config.validate import indexed_prefixes
from torchtitan_like.data.dataset import BatchLayout, _SliceIterator
from torchtitan_like.errors import DataError

logger = logging.getLogger(__name__)

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
# dtype code -> (torch dtype, bytes per token)
DTYPES: dict[int, tuple[torch.dtype, int]] = {
    1: (torch.uint8, 1), 2: (torch.int8, 1), 3: (torch.int16, 2), 4: (torch.int32, 4), 5: (torch.int64, 8),
    8: (torch.uint16, 2),
}
_FLOAT_CODES = (6, 7)
UINT16, INT32 = 8, 4  # what pretokenize writes: uint16 where every id fits, else int32


def split_prefix(dataset_path: str) -> str:
    """PREFIX from "PREFIX", "PREFIX.bin" or "PREFIX.idx"."""
    for suffix in (".bin", ".idx"):
        if dataset_path.endswith(suffix):
            return dataset_path[: -len(suffix)]
    return dataset_path


class IndexedTokens:
    """The token stream of one PREFIX.bin / PREFIX.idx pair, checked when opened: both files exist, the
    index is one (header, version, an integer dtype, its size), and PREFIX.bin ends where the index says."""

    def __init__(self, dataset_path: str, *, section: str, label: str | None = None) -> None:
        """label: how messages name the path (default: `{section}.dataset_path='...'`, the config key)."""
        self.label = label or f"{section}.dataset_path={dataset_path!r}"
        prefix = split_prefix(dataset_path)
        self.prefix, self.bin_path, self.idx_path = prefix, prefix + ".bin", prefix + ".idx"
        self.files = [self.bin_path]  # (the trainer's held-out check compares these)
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise DataError(
                    f"{self.label}: {path} does not exist; an indexed dataset is the pair PREFIX.bin + PREFIX.idx "
                    "(set the path to PREFIX; write them with tools/pretokenize.py or Megatron-LM's preprocess_data.py)"
                )
        with open(self.idx_path, "rb") as f:
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size or head[:9] != MAGIC:
                raise DataError(f"{self.label}: {self.idx_path} is not an indexed-dataset index (it does not start "
                                f"with {MAGIC!r})")
            _, version, code, n_seq, n_docs = _HEADER.unpack(head)
            if version != VERSION:
                raise DataError(f"{self.label}: {self.idx_path} is index version {version}; only version {VERSION} "
                                "is read")
            if code not in DTYPES:
                kind = "a float type" if code in _FLOAT_CODES else "not a known type"
                raise DataError(f"{self.label}: {self.idx_path} stores tokens as dtype code {code}, {kind}: token ids "
                                "must be integers (codes 1-5 or 8)")
            self.dtype, self.itemsize = DTYPES[code]
            want = _HEADER.size + 4 * n_seq + 8 * n_seq + 8 * n_docs
            size = os.path.getsize(self.idx_path)
            if size != want:
                raise DataError(f"{self.label}: {self.idx_path} holds {size} bytes, but its header ({n_seq} sequences, "
                                f"{n_docs} document indices) needs {want}: truncated or corrupt; write it again")
            if n_seq == 0:
                raise DataError(f"{self.label}: {self.idx_path} indexes no sequences: the dataset is empty")
            f.seek(_HEADER.size + 4 * (n_seq - 1))
            (last_len,) = struct.unpack("<i", f.read(4))
            f.seek(_HEADER.size + 4 * n_seq + 8 * (n_seq - 1))
            (last_ptr,) = struct.unpack("<q", f.read(8))
        end = last_ptr + last_len * self.itemsize
        size = os.path.getsize(self.bin_path)
        if size != end:
            raise DataError(
                f"{self.label}: {self.bin_path} holds {size} bytes, but its index ends the last sequence at byte "
                f"{end}: "
                "truncated, or the two files are from different runs; write them again"
            )
        self.n_sequences, self.n_tokens = n_seq, size // self.itemsize
        self._file = None  # opened by the first read; closed with this object

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Refuse a tokenizer other than the one PREFIX.json (pretokenize's record) names; no record: no check."""
        path = self.prefix + ".json"
        if not os.path.isfile(path):
            return
        try:
            meta = json.loads(Path(path).read_text(encoding="utf-8"))
            written, tokens = meta["tokenizer_sha256"], meta["tokens"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{self.label}: {path} is not a record tools/pretokenize.py wrote ({type(e).__name__}: "
                            f"{e}): delete it, or write the dataset again") from None
        if tokens != self.n_tokens:
            raise DataError(f"{self.label}: {path} records {tokens} tokens, but {self.bin_path} holds {self.n_tokens}: "
                            "it is from another write; delete it, or write the dataset again")
        if written != tokenizer.fingerprint():
            raise DataError(
                f"{self.label}: {self.prefix} was tokenized with {meta.get('tokenizer')!r} (vocabulary sha256 "
                f"{written[:12]}...), but model.tokenizer_path loads another ({tokenizer.fingerprint()[:12]}...): "
                "train with the tokenizer that wrote it, or tokenize the data again with this one"
            )

    def __del__(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()

    def read(self, start: int, count: int) -> torch.Tensor:
        """Tokens [start, start + count) of the stream, wrapping past its end, as int64."""
        if self._file is None:  # one handle for every read (a shuffled step reads each window apart)
            self._file = open(self.bin_path, "rb", buffering=0)
        parts, pos = [], start % self.n_tokens
        while count > 0:
            take = min(count, self.n_tokens - pos)
            # pread: no shared file offset, so the prefetch thread and the start-up check may both read.
            data = bytearray(os.pread(self._file.fileno(), take * self.itemsize, pos * self.itemsize))
            if len(data) != take * self.itemsize:
                raise DataError(f"{self.label}: {self.bin_path} ended early (it shrank while training?)")
            parts.append(torch.frombuffer(data, dtype=self.dtype).to(torch.int64))
            count, pos = count - take, 0
        return parts[0] if len(parts) == 1 else torch.cat(parts)


_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's output function: a 64-bit integer hash."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def window_permutation(j: int, m: int, key: int) -> int:
    """Position j of a pseudo-random permutation of range(m) chosen by `key`, in O(1) memory: a 4-round
    Feistel network over the smallest even number of bits that holds m - 1 (a bijection of that power of
    two), walking values >= m through it again until one lands in range (fewer than 4 tries on average)."""
    if m == 1:
        return 0
    bits = max(2, (m - 1).bit_length())
    half = (bits + 1) // 2
    mask = (1 << half) - 1
    x = j
    while True:
        left, right = x >> half, x & mask
        for r in range(4):
            left, right = right, left ^ (_mix(key ^ (r << 60) ^ right) & mask)
        x = (left << half) | right
        if x < m:
            return x


@dataclass(frozen=True)
class IndexedSources:
    """What the trainer's held-out check reads of a dataset: the setting that names it and its files."""

    label: str
    files: list[str]


class IndexedIterator(_SliceIterator):
    """This rank's microbatches of the windows of one indexed dataset, or of a weighted blend of several.

    In a blend, sample i of the stream comes from the source whose count lags its weight most:
    argmax_s (w_s * (i + 1) - count_s), the lowest s on a tie (greedy, largest deficit first). That is a
    function of i and the counts before it, so every rank computes the whole global batch's assignment
    and keeps its slice, and the counts at a step boundary are the whole position. Source s's k-th sample
    is its own window k, wrapping past its end on its own; with `shuffle_seed`, window
    window_permutation(k mod m, m, key) of its m whole windows instead, a new order each epoch k // m
    (the key mixes the seed, the source and the epoch; the tail of fewer than seq_len + 1 tokens is skipped).
    """

    def __init__(
        self, *, sources: list[IndexedTokens], weights: list[float], seq_len: int, layout: BatchLayout,
        infinite: bool, vocab_size: int, shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(layout)
        self.sources, self.weights, self.seq_len, self.infinite, self.vocab_size = (
            sources, weights, seq_len, infinite, vocab_size,
        )
        self.shuffle_seed = shuffle_seed
        self.counts = [0] * len(sources)  # samples each source gave before global batch `batch_index`
        self._next_counts: list[int] | None = None

    def _assign(self) -> list[tuple[int, int]]:
        """(source, its sample index) of every sample of the current global batch; sets _next_counts."""
        counts, w = list(self.counts), self.weights
        out = []
        for i in range(self.sample_index, self.sample_index + self.global_batch_size):
            s = 0 if len(w) == 1 else max(range(len(w)), key=lambda s: w[s] * (i + 1) - counts[s])
            out.append((s, counts[s]))
            counts[s] += 1
        self._next_counts = counts
        return out

    def _read_slice(self) -> torch.Tensor:
        w = self.seq_len + 1
        batch = self._assign()
        if not self.infinite and any((k + 1) * w > self.sources[s].n_tokens for s, k in batch):
            raise StopIteration  # finite mode ends where a source would start over (drops the incomplete batch)
        if self.infinite:
            for s, tokens in enumerate(self.sources):
                ks = [k for src, k in batch if src == s]
                if not ks:
                    continue
                if self.shuffle_seed is None:  # the epochs of the token before the batch and of its last token
                    before = (ks[0] * w - 1) // tokens.n_tokens if ks[0] else 0
                    after = (ks[-1] * w + w - 1) // tokens.n_tokens
                else:  # the epochs of the window before the batch and of its last window
                    m = tokens.n_tokens // w
                    before, after = (ks[0] - 1) // m if ks[0] else 0, ks[-1] // m
                if after > before:
                    logger.info("data: %s read to its end, starting epoch %d%s", tokens.bin_path, after,
                                "" if self.shuffle_seed is None else " (in a new order)")
        mine = batch[self.slice_start : self.slice_start + self.slice_size]
        if self.shuffle_seed is not None:
            rows = [self._checked(self.sources[s], self._shuffled(s, k) * w, w) for s, k in mine]
            return torch.stack(rows)  # (slice_size, seq_len + 1)
        parts, j = [], 0
        while j < len(mine):  # one read per run of consecutive windows of one source
            s, k = mine[j]
            run = 1
            while j + run < len(mine) and mine[j + run] == (s, k + run):
                run += 1
            parts.append(self._checked(self.sources[s], k * w, run * w))
            j += run
        return torch.cat(parts).view(self.slice_size, w)  # (slice_size, seq_len + 1)

    def _shuffled(self, s: int, k: int) -> int:
        """The window that source s's k-th sample reads when shuffling."""
        assert self.shuffle_seed is not None
        m = self.sources[s].n_tokens // (self.seq_len + 1)
        epoch, j = divmod(k, m)
        return window_permutation(j, m, _mix(_mix(_mix(self.shuffle_seed) ^ s) ^ epoch))

    def _checked(self, tokens: IndexedTokens, start: int, count: int) -> torch.Tensor:
        window = tokens.read(start, count)
        bad = (window < 0) | (window >= self.vocab_size)
        if bool(bad.any()):
            at = int(bad.nonzero()[0, 0])
            raise DataError(
                f"{tokens.label}: token {int(window[at])} at position {(start + at) % tokens.n_tokens} of "
                f"{tokens.bin_path} is outside the model's vocabulary (0..{self.vocab_size - 1}): the data was "
                "tokenized with another tokenizer than model.tokenizer_path (or for another model.flavor)"
            )
        return window

    def _commit(self) -> None:
        assert self._next_counts is not None
        self.counts, self._next_counts = self._next_counts, None

    def state_dict(self) -> dict[str, Any]:
        return {**self._cursor_state(), "indexed_tokens": [t.n_tokens for t in self.sources],
                "indexed_weights": list(self.weights), "indexed_counts": list(self.counts),
                "indexed_shuffle_seed": self.shuffle_seed, "indexed_seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("indexed_tokens")
        if saved is None:
            raise DataError(
                "the checkpoint's data loader state is not a position in an indexed dataset (it was saved with "
                "another training.dataset): resume with the same training.dataset, or add \"dataloader\" to "
                "checkpoint.exclude_from_loading to read this dataset from its beginning"
            )
        now = [t.n_tokens for t in self.sources]
        if saved != now or state["indexed_weights"] != self.weights:
            raise DataError(
                f"dataloader checkpoint: it is a position in indexed data of {saved} tokens with weights "
                f"{state['indexed_weights']}, but {', '.join(t.bin_path for t in self.sources)} hold {now} with "
                f"weights {self.weights}: the data or the blend changed since the checkpoint (resume with the same "
                "data and training.dataset_weights, or add \"dataloader\" to checkpoint.exclude_from_loading to "
                "start it over)"
            )
        if state.get("indexed_shuffle_seed") != self.shuffle_seed:
            raise DataError(
                f"dataloader checkpoint: it read the indexed data {_order(state.get('indexed_shuffle_seed'))}, this "
                f"run reads it {_order(self.shuffle_seed)}: resume with the same training.dataset_shuffle and "
                "debug.seed, or add \"dataloader\" to checkpoint.exclude_from_loading to start the data over"
            )
        self._load_cursor(state)
        self.counts = self._counts_at(list(state["indexed_counts"]), state.get("indexed_seq_len", self.seq_len))
        self._next_counts = None

    def _counts_at(self, counts: list[int], saved_seq_len: int) -> list[int]:
        """The checkpoint's counts, in windows of this run's seq_len + 1 tokens. The counts are windows of the
        saved training.seq_len: read as windows of another length they would skip or repeat data. One source
        in file order goes on from the first window boundary at or after the tokens it read (fewer than
        seq_len + 1 tokens skipped, said); a blend or a shuffled order, which are orders of whole windows, is
        refused."""
        if saved_seq_len == self.seq_len:
            return counts
        change = f"training.seq_len {saved_seq_len} -> {self.seq_len}"
        if self.shuffle_seed is not None or len(self.sources) > 1:
            what = "shuffled order" if self.shuffle_seed is not None else "blend"
            raise DataError(
                f"dataloader checkpoint: its position in the indexed data's {what} counts windows of "
                f"{saved_seq_len + 1} tokens, and this run's are {self.seq_len + 1} ({change}): resume with the "
                f"same training.seq_len, or add \"dataloader\" to checkpoint.exclude_from_loading to start the data "
                "over"
            )
        (count,) = counts
        read, w = count * (saved_seq_len + 1), self.seq_len + 1
        now = -(-read // w)  # the first whole window at or after the tokens read
        if now * w != read:
            logger.warning("%s: the checkpoint read %d tokens in windows of %d (%s); this run goes on from token %d, "
                           "the next window boundary (%d tokens skipped)", self.sources[0].label, read,
                           saved_seq_len + 1, change, now * w, now * w - read)
        return [now]


def _order(shuffle_seed: int | None) -> str:
    return "in file order" if shuffle_seed is None else f"shuffled with seed {shuffle_seed}"


class IndexedDataset(IterableDataset):
    """Windows of one indexed dataset or a weighted blend (`weights` relative, one per source); all state
    lives in the iterator, which StatefulDataLoader saves."""

    def __init__(
        self, *, sources: list[IndexedTokens], weights: list[float] | None = None, seq_len: int, layout: BatchLayout,
        infinite: bool, vocab_size: int, shuffle_seed: int | None = None, tokenizer: Tokenizer | None = None,
    ) -> None:
        """tokenizer: the run's, checked against each source's PREFIX.json where there is one."""
        weights = list(weights) if weights else [1.0]
        assert len(weights) == len(sources) and all(w > 0 for w in weights)  # (config validation)
        self.sources, self.weights = sources, [w / sum(weights) for w in weights]
        self.seq_len, self.layout, self.infinite, self.vocab_size = seq_len, layout, infinite, vocab_size
        self.shuffle_seed = shuffle_seed
        # (as PackedDataset's: the trainer's held-out check reads its files)
        self.source = IndexedSources(sources[0].label, [t.bin_path for t in sources])
        for tokens in sources:
            if tokenizer is not None:
                tokens.check_tokenizer(tokenizer)
            if tokens.n_tokens < seq_len + 1:
                raise DataError(
                    f"{tokens.label}: {tokens.bin_path} holds {tokens.n_tokens} tokens, fewer than one sample of "
                    f"seq_len + 1 = {seq_len + 1}"
                )
        for tokens, weight in zip(sources, self.weights):
            per_epoch = tokens.n_tokens / ((seq_len + 1) * layout.global_batch_size * weight)
            logger.info(
                "data: %s, %d tokens in %d sequences (%s), %s%.1f global batches of %d x %d per epoch%s",
                tokens.bin_path, tokens.n_tokens, tokens.n_sequences, str(tokens.dtype).removeprefix("torch."),
                f"weight {weight:.3g}, " if len(sources) > 1 else "", per_epoch, layout.global_batch_size, seq_len + 1,
                ", shuffled" if shuffle_seed is not None else "",
            )

    def __iter__(self) -> IndexedIterator:
        return IndexedIterator(
            sources=self.sources, weights=self.weights, seq_len=self.seq_len, layout=self.layout,
            infinite=self.infinite, vocab_size=self.vocab_size, shuffle_seed=self.shuffle_seed,
        )


def open_indexed(dataset_path: str, *, section: str) -> list[IndexedTokens]:
    """The sources `dataset_path` names: one PREFIX, or several separated by commas (a blend; config
    validation checked the entries against training.dataset_weights)."""
    return [IndexedTokens(prefix, section=section) for prefix in indexed_prefixes(dataset_path)]


def write_indexed(
    prefix: str | Path, records: Iterable[list[int]], *, vocab_size: int, meta: dict[str, Any] | None = None
) -> tuple[int, int]:
    """Write `records` (each a list of token ids: one sequence and one document) as PREFIX.bin / PREFIX.idx,
    and with `meta`, PREFIX.json (meta plus the counts); return (records, tokens). All go through temporary
    files renamed at the end, .idx last: an interrupted write leaves any earlier set as it was (a crash
    between the renames leaves a new .bin beside an old .idx, which the reader refuses, as it does any
    pair that does not match)."""
    code = UINT16 if vocab_size <= 1 << 16 else INT32
    itemsize = DTYPES[code][1]
    typecode = "H" if code == UINT16 else "i"
    assert array(typecode).itemsize == itemsize
    prefix = str(prefix)
    bin_tmp, idx_tmp, json_tmp = (f"{prefix}.{ext}.tmp{os.getpid()}" for ext in ("bin", "idx", "json"))
    lengths = array("i")
    n_tokens = 0
    try:
        with open(bin_tmp, "wb") as f:
            for tokens in records:
                if not tokens:
                    continue
                if min(tokens) < 0 or max(tokens) >= vocab_size:
                    raise ValueError(f"a token id outside 0..{vocab_size - 1}")
                chunk = array(typecode, tokens)
                if sys.byteorder != "little":
                    chunk.byteswap()
                f.write(chunk.tobytes())
                lengths.append(len(tokens))
                n_tokens += len(tokens)
        if not lengths:
            raise ValueError("no tokens: the dataset is empty")
        pointers = array("q", [0] * len(lengths))
        offset = 0
        for i, n in enumerate(lengths):
            pointers[i] = offset
            offset += n * itemsize
        documents = array("q", range(len(lengths) + 1))
        with open(idx_tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, code, len(lengths), len(documents)))
            for part in (lengths, pointers, documents):
                if sys.byteorder != "little":
                    part.byteswap()
                f.write(part.tobytes())
        if meta is not None:
            record = {**meta, "records": len(lengths), "tokens": n_tokens}
            Path(json_tmp).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        os.replace(bin_tmp, f"{prefix}.bin")
        if meta is not None:
            os.replace(json_tmp, f"{prefix}.json")
        elif os.path.exists(f"{prefix}.json"):
            os.remove(f"{prefix}.json")  # an earlier write's record would describe other data
        os.replace(idx_tmp, f"{prefix}.idx")
    finally:
        for tmp in (bin_tmp, idx_tmp, json_tmp):
            if os.path.exists(tmp):
                os.remove(tmp)
    return len(lengths), n_tokens
