"""Tokenize + pack documents into fixed-length samples, and deal global batches out to DP ranks.

The sequence of global batches depends only on (dataset, seed, global_batch_size, seq_len), never on
the number of data-parallel ranks: global batch g is samples [g*GBS, (g+1)*GBS) of one packed
stream, and DP rank r of D takes the contiguous slice [r*GBS/D, (r+1)*GBS/D) of it, as
microbatches of local_batch_size. Every rank reads the whole global batch (packing boundaries
depend on all of it) and keeps its slice, so at a step boundary all ranks hold the same state and a
checkpoint taken with D ranks resumes with any D'.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import IterableDataset

from torchtitan_like.components.tokenizer import Tokenizer
from torchtitan_like.data import sources
from torchtitan_like.data.sources import DocumentSource, frame, synthetic_sample
from torchtitan_like.errors import DataError

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class BatchLayout:
    """How global batches are dealt out: validated by the loader (GBS divisible by local_bs x D)."""

    global_batch_size: int
    local_batch_size: int
    dp_rank: int
    dp_degree: int


class _SliceIterator:
    """Global batch -> this rank's slice -> microbatches; subclasses say how to read a slice."""

    def __init__(self, layout: BatchLayout) -> None:
        assert layout.global_batch_size % (layout.local_batch_size * layout.dp_degree) == 0
        assert 0 <= layout.dp_rank < layout.dp_degree
        self.global_batch_size = layout.global_batch_size
        self.local_batch_size = layout.local_batch_size
        self.dp_degree = layout.dp_degree
        self.slice_size = layout.global_batch_size // layout.dp_degree
        self.slice_start = layout.dp_rank * self.slice_size
        self.accum_steps = self.slice_size // layout.local_batch_size
        self.batch_index = 0  # global batch the next microbatch belongs to
        self.micro_index = 0  # microbatches of that global batch already yielded by this rank
        # Samples of the stream before that global batch: with another global batch size after a resume
        # (global_batch_size -1 and another data-parallel degree) the stream still continues where it was.
        self.sample_index = 0
        self._slice: torch.Tensor | None = None  # (slice_size, seq_len + 1); a cache, not state

    def __iter__(self) -> _SliceIterator:
        return self

    def __next__(self) -> Batch:
        if self._slice is None:
            self._slice = self._read_slice()  # StopIteration here ends a finite stream
        b = self.local_batch_size
        micro = self._slice[self.micro_index * b : (self.micro_index + 1) * b]  # (local_bs, seq_len + 1)
        self.micro_index += 1
        if self.micro_index == self.accum_steps:
            # Advance now, not on the next call: at the step boundary the state already names the
            # next global batch, identically on every rank.
            self._commit()
            self.batch_index += 1
            self.sample_index += self.global_batch_size
            self.micro_index = 0
            self._slice = None
        # Copies, never views: with local_batch_size 1 the slices are contiguous views of one storage,
        # one token apart, and context parallel shards each buffer in place (resize_ + copy_), so
        # sharding the labels would overwrite the inputs.
        return micro[:, :-1].clone(), micro[:, 1:].clone()

    def _read_slice(self) -> torch.Tensor:
        raise NotImplementedError

    def _commit(self) -> None:
        """Make the position after the current global batch the committed one."""

    def _cursor_state(self) -> dict[str, Any]:
        # The layout too: a position inside a global batch means something only under the layout that took it.
        return {"batch_index": self.batch_index, "micro_index": self.micro_index, "sample_index": self.sample_index,
                "global_batch_size": self.global_batch_size, "local_batch_size": self.local_batch_size,
                "dp_degree": self.dp_degree}

    def _load_cursor(self, state: dict[str, Any]) -> None:
        micro = state["micro_index"]
        saved = (state.get("local_batch_size", self.local_batch_size), state.get("dp_degree", self.dp_degree),
                 state.get("global_batch_size", self.global_batch_size))
        if not 0 <= micro < self.accum_steps or (
            micro and saved != (self.local_batch_size, self.dp_degree, self.global_batch_size)
        ):
            raise DataError(
                f"dataloader checkpoint is {micro} microbatches into a global batch (local batch {saved[0]}, "
                f"data-parallel degree {saved[1]}, global batch {saved[2]}), which this layout (local batch "
                f"{self.local_batch_size}, data-parallel degree {self.dp_degree}, global batch "
                f"{self.global_batch_size}) cannot resume: resume mid-step checkpoints with the same layout"
            )
        self.batch_index = state["batch_index"]
        self.micro_index = micro
        # Samples before the current global batch; older checkpoints count global batches only.
        self.sample_index = state.get("sample_index", self.batch_index * self.global_batch_size)
        self._slice = None


class _TokenStream:
    """Reads documents from a position and cuts the [bos] doc [eos] token stream into windows.

    A position is (epoch, doc_index, tail): the next record to read (a document, or a TextPiece of a
    long .txt one), and how many tokens of the one before it (doc_index - 1) are still unread. Unread
    tokens are only ever a suffix of that record: a record is read only when fewer than a window are
    left, so a window takes all that came before it. So a checkpoint holds three integers, however
    long the document, and a resume tokenizes that record again to recover its tail.
    """

    def __init__(
        self, source: DocumentSource, tokenizer: Tokenizer, *, epoch: int, doc_index: int, tail: int = 0,
        buffer: list[int] | None = None, infinite: bool,
    ) -> None:
        """buffer: the unread tokens themselves, as checkpoints before `tail` stored them."""
        self.source, self.tokenizer, self.infinite = source, tokenizer, infinite
        self.epoch, self.doc_index = epoch, doc_index
        self._buf = list(buffer or [])
        self._off = 0  # consumed prefix of _buf (deleting it per window would be quadratic)
        self._full_pass = doc_index == 0  # only a pass from the first record can prove emptiness
        self._docs_in_pass = 0
        if tail and not buffer:
            # One reader from the previous document: its tail first, then on from doc_index.
            self._docs = source.documents(epoch, doc_index - 1)
            text = next(iter(self._docs), None)
            tokens = [] if text is None else _tokens(tokenizer, text)
            if len(tokens) < tail:
                raise DataError(
                    f"dataloader checkpoint: {tail} tokens of document {doc_index - 1} (epoch {epoch}) are unread, "
                    f"but that document now has {len(tokens)}: the dataset changed since the checkpoint (resume "
                    "with the same data, or add \"dataloader\" to checkpoint.exclude_from_loading to start it over)"
                )
            self._buf = tokens[len(tokens) - tail:]
        else:
            self._docs = source.documents(epoch, doc_index)

    def take(self, n: int) -> list[int] | None:
        """The next `n` tokens, or None when a finite stream runs out."""
        while len(self._buf) - self._off < n:
            if not self._read_document():
                return None
        window = self._buf[self._off : self._off + n]
        self._off += n
        return window

    def tail(self) -> int:
        """Unread tokens (all of them from the document before doc_index)."""
        return len(self._buf) - self._off

    def _read_document(self) -> bool:
        while True:
            for text in self._docs:
                self.doc_index += 1
                tokens = _tokens(self.tokenizer, text)
                if not tokens:
                    continue
                self._docs_in_pass += 1
                del self._buf[: self._off]
                self._off = 0
                self._buf.extend(tokens)
                return True
            if self._full_pass and self._docs_in_pass == 0:
                label = getattr(self.source, "label", None)
                raise DataError(f"{label + ': ' if label else ''}the dataset is empty: a full pass found no non-empty "
                                "documents")
            if not self.infinite:
                return False
            self.epoch += 1
            self.doc_index = 0
            logger.info("data: source exhausted, starting epoch %d", self.epoch)
            self._docs = self.source.documents(self.epoch, 0)
            self._full_pass, self._docs_in_pass = True, 0


def _tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """A record's tokens: [bos] doc [eos], or a TextPiece's share of them; none for a blank document."""
    bos, eos = frame(text)
    if bos and eos and not text.strip():
        return []
    return tokenizer.encode(text, bos=bos, eos=eos)


class PackedIterator(_SliceIterator):
    """Stateful iterator over this rank's microbatches of packed documents."""

    def __init__(
        self, *, source: DocumentSource, tokenizer: Tokenizer, seq_len: int, layout: BatchLayout, infinite: bool
    ) -> None:
        super().__init__(layout)
        self.source, self.tokenizer, self.seq_len, self.infinite = source, tokenizer, seq_len, infinite
        # Stream position at the start of global batch `batch_index` (committed state): _TokenStream's
        # (epoch, doc_index, tail); `buffer` only for a checkpoint that stored the unread tokens.
        self.epoch, self.doc_index, self.tail, self.buffer = 0, 0, 0, None
        self._next_position: tuple[int, int, int] | None = None
        # The live reader stays open across global batches: reopening it at doc_index every step
        # would re-scan a .jsonl file (or re-skip an HF stream) from its start each time.
        self._stream: _TokenStream | None = None

    def _read_slice(self) -> torch.Tensor:
        if self._stream is None:
            self._stream = _TokenStream(
                self.source, self.tokenizer, epoch=self.epoch, doc_index=self.doc_index, tail=self.tail,
                buffer=self.buffer, infinite=self.infinite,
            )
        stream = self._stream
        kept = []
        for i in range(self.global_batch_size):
            window = stream.take(self.seq_len + 1)
            if window is None:
                raise StopIteration  # finite mode drops a last, incomplete global batch
            if self.slice_start <= i < self.slice_start + self.slice_size:
                kept.append(window)
        self._next_position = (stream.epoch, stream.doc_index, stream.tail())
        return torch.tensor(kept, dtype=torch.int64)

    def _commit(self) -> None:
        assert self._next_position is not None
        self.epoch, self.doc_index, self.tail = self._next_position
        self.buffer = None
        self._next_position = None

    def state_dict(self) -> dict[str, Any]:
        state = {
            "epoch": self.epoch, "doc_index": self.doc_index, "txt_piece_chars": sources.txt_piece_chars(),
            **self._cursor_state(),
        }
        if isinstance(self.source, sources.EmbeddedSource):  # (its document order is drawn from debug.seed)
            state["order_seed"] = self.source.seed
        if self.buffer is not None:  # loaded from an older checkpoint and not yet past its first step
            state["buffer"] = list(self.buffer)
        else:
            state["tail"] = self.tail
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not ({"epoch", "doc_index"} <= set(state) and ("tail" in state or "buffer" in state)):
            # E.g. a run that trained on training.dataset = "synthetic" resumed with documents.
            raise DataError(
                "the checkpoint's data loader state holds no document position (it was saved with synthetic "
                "tokens or an indexed dataset): resume with the same training.dataset, or add \"dataloader\" to "
                "checkpoint.exclude_from_loading to read this dataset from its beginning"
            )
        saved_seed = state.get("order_seed")
        if isinstance(self.source, sources.EmbeddedSource) and saved_seed not in (None, self.source.seed):
            # Its position (document k of epoch e) means another document under another order.
            raise DataError(
                f"dataloader checkpoint: it read the embedded data in the order of debug.seed={saved_seed}, this run "
                f"draws it with debug.seed={self.source.seed}: resume with the same debug.seed, or add \"dataloader\" "
                "to checkpoint.exclude_from_loading to start the data over"
            )
        self._load_cursor(state)
        self.epoch, self.doc_index = state["epoch"], state["doc_index"]
        self.tail = state.get("tail", 0)
        self.buffer = list(state["buffer"]) if "buffer" in state else None
        saved_pieces, pieces = state.get("txt_piece_chars"), sources.txt_piece_chars()
        splits = getattr(self.source, "splits_documents", lambda piece_chars=None: False)
        # (Positions differ where some file splits at either size: at the smaller one.)
        if saved_pieces != pieces and splits(pieces if saved_pieces is None else min(saved_pieces, pieces)):
            if saved_pieces is not None:
                raise DataError(
                    f"dataloader checkpoint: its positions count .txt pieces of {saved_pieces} characters, this "
                    f"version reads pieces of {sources.txt_piece_chars()}: resume with the version that saved it, "
                    "or add \"dataloader\" to checkpoint.exclude_from_loading to start the data over"
                )
            self.doc_index, self.tail = _piece_position(
                self.source, self.tokenizer, self.epoch, self.doc_index, self.tail, keep_buffer=self.buffer is not None
            )
        self._next_position = None
        self._stream = None  # reopened at the loaded position on the next read


def _piece_position(
    source: DocumentSource, tokenizer: Tokenizer, epoch: int, doc_index: int, tail: int, *, keep_buffer: bool
) -> tuple[int, int]:
    """The (doc_index, tail) in records (TextPieces) of a position saved when every .txt file was one
    record: doc_index counted whole documents, and the tail tokens unread were a suffix of document
    doc_index - 1. keep_buffer: the checkpoint holds those tokens themselves (read on from the record
    after that document's last piece)."""
    if doc_index == 0:
        return 0, tail
    whole = records = 0
    counts: list[tuple[int, int]] = []  # (records read after it, tokens) of each piece of document doc_index - 1
    for text in source.documents(epoch, 0):
        records += 1
        if whole == doc_index - 1 and not keep_buffer:
            counts.append((records, len(_tokens(tokenizer, text))))
        if frame(text)[1]:
            whole += 1
            if whole == doc_index:
                break
    else:
        raise DataError(
            f"dataloader checkpoint: it is at document {doc_index} of epoch {epoch}, but the dataset now has "
            f"{whole}: the dataset changed since the checkpoint (resume with the same data, or add \"dataloader\" "
            "to checkpoint.exclude_from_loading to start it over)"
        )
    if keep_buffer or tail == 0:
        return records, tail
    read = sum(n for _, n in counts) - tail  # tokens of the document consumed before the checkpoint
    if read < 0:
        raise DataError(
            f"dataloader checkpoint: {tail} tokens of document {doc_index - 1} (epoch {epoch}) are unread, but that "
            f"document now has {read + tail}: the dataset changed since the checkpoint (resume with the same data, "
            "or add \"dataloader\" to checkpoint.exclude_from_loading to start it over)"
        )
    upto = 0
    for after, n in counts:
        upto += n
        if read < upto:  # the first unread token is in this piece: the rest of it is the tail
            return after, upto - read
    raise AssertionError("unreachable: tail > 0 leaves a token unread")


class SyntheticIterator(_SliceIterator):
    """Random tokens: sample i of the stream is a pure function of (seed, i); endless in both modes."""

    def __init__(self, *, seed: int, seq_len: int, vocab_size: int, layout: BatchLayout) -> None:
        super().__init__(layout)
        self.seed, self.seq_len, self.vocab_size = seed, seq_len, vocab_size

    def _read_slice(self) -> torch.Tensor:
        first = self.sample_index + self.slice_start
        n = self.seq_len + 1
        return torch.stack([synthetic_sample(self.seed, first + i, n, self.vocab_size) for i in range(self.slice_size)])

    def state_dict(self) -> dict[str, Any]:
        return self._cursor_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_cursor(state)


class PackedDataset(IterableDataset):
    """Packed documents; all state lives in the iterator, which StatefulDataLoader saves and restores."""

    def __init__(
        self, *, source: DocumentSource, tokenizer: Tokenizer, seq_len: int, layout: BatchLayout, infinite: bool
    ) -> None:
        self.source, self.tokenizer, self.seq_len, self.layout, self.infinite = (
            source, tokenizer, seq_len, layout, infinite,
        )

    def __iter__(self) -> PackedIterator:
        # Cheap by design: StatefulDataLoader calls this before loading a checkpointed state into it.
        return PackedIterator(
            source=self.source, tokenizer=self.tokenizer, seq_len=self.seq_len, layout=self.layout,
            infinite=self.infinite,
        )


class SyntheticDataset(IterableDataset):
    """Synthetic tokens; all state lives in the iterator."""

    def __init__(self, *, seed: int, seq_len: int, vocab_size: int, layout: BatchLayout) -> None:
        self.seed, self.seq_len, self.vocab_size, self.layout = seed, seq_len, vocab_size, layout

    def __iter__(self) -> SyntheticIterator:
        return SyntheticIterator(seed=self.seed, seq_len=self.seq_len, vocab_size=self.vocab_size, layout=self.layout)
