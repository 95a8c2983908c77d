"""The tokenizer files of a Hugging Face export (tokenizer.json, tokenizer_config.json), so that the folder
loads as it is in transformers (AutoTokenizer), vLLM or lm-evaluation-harness.

A run that read a tokenizer.json exports that file unchanged (and its tokenizer_config.json, if one is
beside it). A tiktoken tokenizer.model (Meta's format, or the embedded one) is written as the byte-level
BPE tokenizer.json that gives the same ids: the vocabulary in GPT-2's byte alphabet, and for each token
of two or more bytes the one merge that tiktoken's BPE would make last to build it (replaying BPE on the
token with only lower-ranked merges), in rank order, so Hugging Face's first-merge-in-the-list rule and
tiktoken's lowest-rank rule agree; Llama 3's split pattern; its 256 special tokens; bos added in front,
as Llama 3's post-processor does and as training packs documents.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from torchtitan_like.components.tokenizer import (
    LLAMA3_PAT_STR,
    Tokenizer,
    bpe_parts,
    byte_alphabet,
    build_tokenizer,
    is_hf_tokenizer_json,
    tokenizer_file,
)

logger = logging.getLogger(__name__)

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


def export_hf_tokenizer(tokenizer_path: str, folder: str | Path, *, model_max_length: int) -> list[Path]:
    """Write the tokenizer files for `tokenizer_path` (model.tokenizer_path; "" = the embedded one) into
    `folder`; returns them ([] with a warning for a vocabulary that BPE merges cannot express)."""
    folder = Path(folder)
    src = tokenizer_file(tokenizer_path)
    tok = build_tokenizer(tokenizer_path)  # (a file the trainer would refuse is refused here too)
    written = [folder / TOKENIZER_JSON]
    if is_hf_tokenizer_json(src):
        shutil.copyfile(src, written[0])
        beside = src.parent / TOKENIZER_CONFIG
        if beside.is_file():
            shutil.copyfile(beside, folder / TOKENIZER_CONFIG)
            return [*written, folder / TOKENIZER_CONFIG]
    else:
        try:
            data = tokenizer_json(tok)
        except ValueError as e:
            logger.warning("no tokenizer files in the Hugging Face export %s: %s", folder, e)
            return []
        written[0].write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.decode([tok.bos_id]),
        "eos_token": tok.decode([tok.eos_id]),
        "model_max_length": model_max_length,
        # (True would change decoded text: it drops the space before punctuation.)
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    (folder / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    return [*written, folder / TOKENIZER_CONFIG]


def tokenizer_json(tok: Tokenizer) -> dict:
    """The tokenizer.json (as a dict) that encodes like `tok`."""
    ranks = tok.ranks
    chars = {b: ch for ch, b in byte_alphabet().items()}

    def text(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = bpe_parts(ranks, token, below=rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (id {rank}) is not the merge of two lower-ranked tokens, so no list "
                             "of BPE merges reproduces this vocabulary")
        merges.append(f"{text(parts[0])} {text(parts[1])}")
    bos = tok.decode([tok.bos_id])
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": True}
            for name, i in tok.special_tokens.items()
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_PAT_STR}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            # A piece that is itself a token stays whole, as tiktoken looks it up before merging.
            "ignore_merges": True,
            "vocab": {text(token): rank for token, rank in ranks.items()},
            "merges": merges,
        },
    }
