"""Tokenize a job's dataset once into an indexed dataset (PREFIX.bin + PREFIX.idx), to train on with
`training.dataset = "indexed"` (or validate on with `validation.dataset = "indexed"`).

    .venv/bin/python tools/pretokenize.py --out data/train --job.config_file job.toml \
        --training.dataset local --training.dataset_path 'corpus/*.jsonl'

The config arguments are the trainer's: the source is the one `--section`'s dataset settings name
(training by default, or validation), read once in order (epoch 0), and each record is tokenized as the
trainer's packer does ([bos] text [eos], with model.tokenizer_path), so training on the output gives the
same batches as training on the source, through the first epoch. Token ids are stored as uint16 where
the vocabulary fits, else int32; PREFIX.json records the tokenizer (the trainer refuses another) and
the source. --max-tokens stops after that many tokens (a sample of a large hub dataset); --workers N
tokenizes in N processes (the output is the same). The files are written through temporary files and
renamed at the end: an interrupted run leaves an earlier set as it was.

    .venv/bin/python tools/pretokenize.py --describe --out data/megatron_text_document \
        --model.tokenizer_path assets/llama3/tokenizer.model

--describe writes only PREFIX.json for a pair written elsewhere (Megatron-LM's or NeMo's preprocess_data.py
keeps no record of its tokenizer), after reading every token id once and checking it against the vocabulary
of model.tokenizer_path. The trainer then refuses that pair with any other tokenizer. Which tokenizer wrote
the files is the user's word: ids of the same vocabulary size cannot tell two tokenizers apart.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from torchtitan_like.errors import TrainerError
from torchtitan_like.output_files import check_output_file


def source_of(cfg, section: str):
    """The document source that `section`'s dataset keys name, as the trainer builds it."""
    from torchtitan_like.components.validation import build_validation_source
    from torchtitan_like.data.sources import build_source

    if section == "training":
        return build_source(cfg.training, cfg.debug.seed)
    return build_validation_source(cfg.validation, text_field=cfg.training.dataset_text_field, seed=cfg.debug.seed)


def records(source, tokenizer_path: str, max_tokens: int | None, workers: int) -> Iterator[list[int]]:
    """The tokens of each record of `source`, in order (tokenized in `workers` processes when > 1)."""
    texts = (_framed(text) for text in source.documents(0, 0))
    if workers == 1:
        _start_worker(tokenizer_path)
        tokenized = (_encode(item) for item in texts)
    else:
        tokenized = _in_workers(texts, workers, tokenizer_path)
    total = 0
    for tokens in tokenized:
        if max_tokens is not None and total + len(tokens) > max_tokens:
            tokens = tokens[: max_tokens - total]
        if tokens:
            total += len(tokens)
            yield tokens
        if max_tokens is not None and total >= max_tokens:
            return


def _framed(text: str) -> tuple[str, bool, bool]:
    """A record as plain values for another process (a long .txt file's pieces carry their bos / eos)."""
    from torchtitan_like.data.sources import frame

    return (str(text), *frame(text))


_tokenizer = None  # each worker process's own


def _start_worker(tokenizer_path: str) -> None:
    global _tokenizer
    from torchtitan_like.components.tokenizer import build_tokenizer

    _tokenizer = build_tokenizer(tokenizer_path)


def _encode(item: tuple[str, bool, bool]) -> list[int]:
    """The record's tokens exactly as the trainer's packer makes them (data/dataset.py's _tokens)."""
    from torchtitan_like.data.dataset import _tokens
    from torchtitan_like.data.sources import TextPiece

    text, bos, eos = item
    return _tokens(_tokenizer, text if bos and eos else TextPiece(text, bos=bos, eos=eos))


def _encode_chunk(items: list[tuple[str, bool, bool]]) -> list[list[int]]:
    return [_encode(item) for item in items]


def _in_workers(texts: Iterator[tuple[str, bool, bool]], workers: int, tokenizer_path: str) -> Iterator[list[int]]:
    """Chunks of records tokenized in a pool, yielded in order, with a bounded number in flight (Pool.imap
    would read the whole source ahead into its queue)."""
    chunk_size, in_flight = 256, 4 * workers
    with multiprocessing.get_context("spawn").Pool(workers, _start_worker, (tokenizer_path,)) as pool:
        pending: deque = deque()
        while True:
            chunk = list(islice(texts, chunk_size))
            if chunk:
                pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if pending and (len(pending) >= in_flight or not chunk):
                yield from pending.popleft().get()
            elif not chunk:
                return


DESCRIBE_CHUNK_TOKENS = 1 << 24
"""Token ids read at a time by --describe (64 MiB of int32)."""


def describe(prefix: str, cfg) -> str:
    """Check every token id of an existing PREFIX pair against cfg's tokenizer and write PREFIX.json
    naming it; returns the summary line. TrainerError/DataError for anything wrong, before writing."""
    from torchtitan_like.components.tokenizer import build_tokenizer, check_vocab, tokenizer_key
    from torchtitan_like.data.indexed import IndexedTokens
    from torchtitan_like.models import MODELS

    data = IndexedTokens(prefix, section="--out", label=f"--out {prefix}")
    record = Path(data.prefix + ".json")
    if record.exists():
        raise TrainerError(f"--out {prefix}: {record} exists already (a record of these files): delete it to "
                           "describe them again")
    tokenizer = build_tokenizer(cfg.model.tokenizer_path, key=tokenizer_key(cfg.model))
    check_vocab(tokenizer, MODELS[cfg.model.name].flavors[cfg.model.flavor].vocab_size, cfg.model.flavor)
    largest, bos, eos = -1, 0, 0
    for start in range(0, data.n_tokens, DESCRIBE_CHUNK_TOKENS):
        ids = data.read(start, min(DESCRIBE_CHUNK_TOKENS, data.n_tokens - start))
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= tokenizer.vocab_size:
            bad = int(((ids < 0) | (ids >= tokenizer.vocab_size)).nonzero()[0, 0])
            raise TrainerError(
                f"--out {prefix}: token {start + bad} is id {int(ids[bad])}, outside the vocabulary of "
                f"model.tokenizer_path ({tokenizer.vocab_size} ids): these files were tokenized with another tokenizer"
            )
        largest = max(largest, high)
        bos += int((ids == tokenizer.bos_id).sum())
        eos += int((ids == tokenizer.eos_id).sum())
    meta = {"written_by": "tools/pretokenize.py --describe (files written elsewhere; the tokenizer is the user's word)",
            "tokenizer": cfg.model.tokenizer_path or "(the embedded one)", "tokenizer_sha256": tokenizer.fingerprint(),
            "source": f"{data.bin_path} (described)", "records": data.n_sequences, "tokens": data.n_tokens}
    tmp = f"{record}.tmp{os.getpid()}"
    try:
        Path(tmp).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, record)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return (f"{record}: {data.n_sequences} sequences, {data.n_tokens} tokens, largest id {largest}, {bos} bos and {eos} "
            f"eos tokens; training with another model.tokenizer_path is now refused")


def main(argv: list[str] | None = None) -> int:
    """Exit status 0, or 2 with one error line (a bad argument or config, unreadable data, an unwritable output)."""
    parser = argparse.ArgumentParser(
        prog="tools/pretokenize.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every other argument is the trainer's: --job.config_file FILE and --section.key VALUE overrides.")
    parser.add_argument("--out", required=True, help="PREFIX: writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--section", choices=("training", "validation"), default="training",
                        help="whose dataset settings name the source (default training)")
    parser.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens (default: all)")
    parser.add_argument("--workers", type=int, default=1, help="processes that tokenize (default 1)")
    parser.add_argument("--describe", action="store_true",
                        help="only write PREFIX.json for an existing pair (e.g. Megatron's), naming model.tokenizer_path")
    args, rest = parser.parse_known_args(argv)
    if args.describe:
        from torchtitan_like.config.loader import load_config

        unused = [f"--{k.replace('_', '-')}" for k, default in (("max_tokens", None), ("workers", 1), ("section", "training"))
                  if getattr(args, k) != default]
        if unused:
            parser.error(f"{', '.join(unused)}: not used with --describe, which tokenizes nothing; leave "
                         f"{'it' if len(unused) == 1 else 'them'} out")

        try:
            print(describe(args.out, load_config(rest)))
        except TrainerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            print(f"error: {e.strerror or e}: {e.filename} (no record written)", file=sys.stderr)
            return 2
        return 0
    if args.max_tokens is not None and args.max_tokens < 1:
        parser.error(f"--max-tokens {args.max_tokens} must be >= 1 (leave it out for the whole dataset)")
    if args.workers < 1:
        parser.error(f"--workers {args.workers} must be >= 1 (e.g. the machine's cores)")
    prefix = args.out.removesuffix(".bin").removesuffix(".idx")
    from torchtitan_like.components.tokenizer import build_tokenizer, check_vocab, tokenizer_key
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.data.indexed import write_indexed
    from torchtitan_like.models import MODELS

    try:
        for suffix in (".bin", ".idx"):  # before the tokenizing (minutes) rather than after
            check_output_file(Path(prefix + suffix), f"--out {args.out}", example="data/train")
        cfg = load_config(rest)
        data = getattr(cfg, args.section)
        if data.dataset in ("synthetic", "indexed"):
            raise TrainerError(f"{args.section}.dataset={data.dataset!r} has no documents to tokenize: set it to "
                               "embedded, local or hf (with its dataset_path)")
        vocab_size = MODELS[cfg.model.name].flavors[cfg.model.flavor].vocab_size
        tokenizer = build_tokenizer(cfg.model.tokenizer_path, key=tokenizer_key(cfg.model))
        check_vocab(tokenizer, vocab_size, cfg.model.flavor)
        source = source_of(cfg, args.section)
        # PREFIX.json: the trainer refuses a model.tokenizer_path with another vocabulary.
        meta = {"written_by": "tools/pretokenize.py", "tokenizer": cfg.model.tokenizer_path or "(the embedded one)",
                "tokenizer_sha256": tokenizer.fingerprint(), "source": source.label}
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        tokens = records(source, cfg.model.tokenizer_path, args.max_tokens, args.workers)
        n_records, n_tokens = write_indexed(prefix, tokens, vocab_size=vocab_size, meta=meta)
    except (TrainerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a permission (reading the source or writing --out)
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where} (an earlier PREFIX.bin / .idx pair, if any, is untouched)",
              file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    print(f"{prefix}.bin + .idx + .json: {n_records} records, {n_tokens} tokens (vocab {vocab_size}), {seconds:.1f} s "
          f"({n_tokens / max(seconds, 1e-9):,.0f} tokens/s); {'train' if args.section == 'training' else 'validate'} "
          f"on it with {args.section}.dataset = \"indexed\", {args.section}.dataset_path = \"{prefix}\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
