"""Check, look into and convert torchtitan_like checkpoints (and convert torchtitan's: their model weights).

    python tools/checkpoint.py verify  outputs/checkpoint/step-100
    python tools/checkpoint.py inspect outputs/checkpoint/step-100
    python tools/checkpoint.py convert outputs/checkpoint/step-100 model.pt [--model-only]
    python tools/checkpoint.py convert outputs/checkpoint/step-100 model.safetensors [--dtype bfloat16]
    python tools/checkpoint.py convert outputs/checkpoint/step-100 hf_out/ --hf --flavor 8B
    python tools/checkpoint.py convert model.pt dcp_out/                   (and .safetensors, or an HF
    python tools/checkpoint.py convert hf_folder/ dcp_out/ --hf --flavor 8B  folder or HF-named .pt with --hf)

A DCP source is verified against its manifest first. A DCP destination is written like a training
save: into a temp folder, manifest last, then renamed. Exit status: 0 ok, 2 a checkpoint problem
(one line on stderr naming the file).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from torchtitan_like.components.checkpoint import (
    EXPORT_DTYPES,
    _describe,
    dcp_contents,
    flat_model_keys,
    is_flat_model_layout,
)
from torchtitan_like.components.manifest import (
    MANIFEST,
    STEP_RE,
    CheckpointError,
    build_manifest,
    hash_files,
    list_files,
    read_manifest,
    verify,
    write_manifest,
)


def _is_dcp(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def cmd_verify(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    if folder.is_file():
        raise CheckpointError(f"{folder} is a file: verify checks a step folder against its {MANIFEST} (a .pt or "
                              ".safetensors file has none)")
    unmarked = folder.is_dir() and not (folder / MANIFEST).exists() and not (folder / ".metadata").exists()
    # A run's checkpoint folder, or its dump folder (checkpoint/ under it): name a step folder to verify.
    steps = sorted((p for p in (*folder.glob("step-*"), *folder.glob("*/step-*")) if STEP_RE.match(p.name) and p.is_dir()),
                   key=lambda p: int(p.name.split("-")[1])) if unmarked else []
    if steps:
        names = ", ".join(p.name for p in steps[:4]) + (", ..." if len(steps) > 4 else "")
        raise CheckpointError(f"{folder} holds step folders ({names}), not a checkpoint: verify one of them, e.g. "
                              f"{steps[-1]}")
    if unmarked and not STEP_RE.match(folder.name) and not any(folder.glob("*.distcp")):
        # (A step folder without its manifest is a save that never finished: verify says so below.)
        raise CheckpointError(f"{folder} is not a checkpoint: it has no {MANIFEST}, no .metadata and no step folders")
    if is_flat_model_layout(folder):
        raise CheckpointError(f"{folder} is in torchtitan's layout, which has no {MANIFEST} to verify against "
                              "(torchtitan writes none): `inspect` lists what it holds, and checkpoint.initial_load_path "
                              "loads it")
    manifest = verify(args.folder)
    print(f"ok: {args.folder} (step {manifest['step']}, {len(manifest['files'])} files)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(args.folder)
    names = dcp_contents(folder)  # (a clear error when .metadata is missing)
    print(f"folder: {folder}")
    if (folder / MANIFEST).is_file():
        m = read_manifest(folder)
        print(f"step: {m['step']}")
        print(f"layout: {m.get('layout')}  world_size: {m.get('world_size')}")
        print(f"versions: torch {m.get('torch_version')}, torchtitan_like {m.get('torchtitan_like_version')}")
        print(f"saved: {m.get('time')}  config_hash: {m.get('config_hash')}")
        print(f"contents: {', '.join(m.get('contents', []))}  model_only: {m.get('model_only')}")
        print(f"files: {len(m['files'])} ({sum(f['size'] for f in m['files'].values()) / 1e6:.1f} MB)")
    elif is_flat_model_layout(folder):
        print(f"layout: torchtitan's (model weights at the top level, no {MANIFEST})")
        _print_torchtitan_progress(folder, names)
    else:
        print(f"manifest: none ({MANIFEST} missing: incomplete, or not written by torchtitan_like)")
    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    entries = sorted(metadata.state_dict_metadata.items())
    width = max((len(k) for k, _ in entries), default=0)
    print(f"entries: {len(entries)}")
    for name, md in entries:
        if isinstance(md, TensorStorageMetadata):
            shape = "(" + ", ".join(str(d) for d in md.size) + ")"
            print(f"  {name:<{width}}  {shape:<16} {str(md.properties.dtype).removeprefix('torch.')}")
        else:
            print(f"  {name:<{width}}  (bytes)")
    return 0


def _print_torchtitan_progress(folder: Path, names: set[str]) -> None:
    """The step and token count of a torchtitan checkpoint's train_state, and which states (`names`: its
    top-level ones) it holds."""
    import torch.distributed.checkpoint as dcp

    others = sorted(n for n in names if n in ("optimizer", "lr_scheduler", "dataloader", "train_state"))
    print(f"contents: {', '.join(['model', *others])}")
    if "train_state" in names:
        state = {"train_state": {"step": 0, "ntokens_seen": 0}}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=True)
        except Exception as e:  # (what is there is listed below all the same)
            print(f"train_state: unreadable ({_describe(e)})")
            return
        print(f"step: {state['train_state']['step']}  tokens seen: {state['train_state']['ntokens_seen']}")


# --- convert ---------------------------------------------------------------------------------------


def _model_args(flavor: str | None, n_layers: int | None = None):
    from torchtitan_like.models import MODELS

    spec = MODELS["llama3"]
    if flavor is None:
        raise CheckpointError("--hf needs --flavor (the llama3 flavor the weights belong to, e.g. debugmodel or 8B)")
    if flavor not in spec.flavors:
        raise CheckpointError(f"--flavor {flavor!r} is not a llama3 flavor ({', '.join(spec.flavors)})")
    if n_layers is not None and n_layers < 1:
        raise CheckpointError(f"--n-layers {n_layers} must be >= 1")
    return spec.args(flavor, n_layers=n_layers)


def _read_dcp(src: Path, *, model_only: bool) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    # Private, but exactly what torch's own dcp_to_torch_save uses (torch 2.13): rebuild the state dict
    # from the metadata alone. The public dcp.load copies the top-level dict, so it cannot fill an empty one.
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    if (src / MANIFEST).is_file():
        verify(src)
    else:
        print(f"warning: {src} has no {MANIFEST}; converting without an integrity check", file=sys.stderr)
    from torch.distributed.checkpoint.api import CheckpointException

    state: dict[str, Any] = {}
    keys = {"model"} if model_only else None
    flat = is_flat_model_layout(src)
    if flat:
        if not model_only:
            raise CheckpointError(
                f"{src} has its model weights at the top level (torchtitan's layout), and its other states in that "
                "trainer's formats: convert its weights only (--model-only)"
            )
        print(f"note: {src} is in torchtitan's layout (model weights at the top level): converting its weights",
              file=sys.stderr)
        names = dcp.FileSystemReader(str(src)).read_metadata().state_dict_metadata
        keys = set(flat_model_keys(names))
    try:
        _load_state_dict(
            state,
            storage_reader=dcp.FileSystemReader(str(src)),
            planner=_EmptyStateDictLoadPlanner(keys=keys),
            no_dist=True,
        )
    except (Exception, CheckpointException) as e:  # a damaged file of a folder without a manifest
        raise CheckpointError(f"{src}: cannot read its data ({_describe(e)})") from None
    if flat:
        state = {"model": state}
    if "model" not in state:
        raise CheckpointError(f"{src} holds no model weights (contents: {sorted(state)})")
    return state


def _load_pt(src: Path) -> Any:
    """torch.load, weights only; its errors (several lines, some asking for a PyTorch issue) as one line."""
    import re

    try:
        return torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or pickled objects weights_only refuses
        text = str(e)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        raise CheckpointError(
            f"{src} holds a pickled {refused.group(1)}, which weights-only loading refuses: save a plain state dict "
            "(parameter name -> tensor) with torch.save"
        )
    with open(src, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":  # torch.save's zip archive, damaged or cut short
        first = text.splitlines()[0].split(". ")[0] if text else "unreadable"
        raise CheckpointError(f"{src} is a damaged or truncated torch checkpoint ({first}): copy or save it again")
    what = "an empty file" if not head else "not a zip archive written by torch.save"
    raise CheckpointError(f"not a torch checkpoint: {src} ({what}): pass a .pt state dict saved with torch.save")


def _cast(sd: dict[str, torch.Tensor], dtype: str | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return sd
    return {k: v.to(EXPORT_DTYPES[dtype]) if v.is_floating_point() else v for k, v in sd.items()}


@contextlib.contextmanager
def _atomic(dst: Path) -> Iterator[Path]:
    """A temporary path beside `dst` (file or folder) to write into; renamed onto `dst` when the block
    succeeds, removed when it fails: a failed convert (a full disk) leaves nothing half-written at dst."""
    tmp = dst.parent / f"{dst.name}.tmp-{secrets.token_hex(4)}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        if dst.is_dir():
            dst.rmdir()  # an empty folder (checked by the caller): the output takes its place
        os.rename(tmp, dst)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _write_dcp(state: dict[str, Any], dst: Path, *, step: int, source: Path) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    with _atomic(dst) as tmp:  # a failed write (a full disk) leaves nothing at dst, and no temporary folder
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
                dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp)), no_dist=True)
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"writing {dst} failed: {_describe(e)}") from None
        model = state.get("model", {})
        tied = None  # (unknown without the embeddings)
        if isinstance(model.get("tok_embeddings.weight"), torch.Tensor):
            # The loader refuses to load an untied model's two matrices into a tied one (both would land in
            # the one matrix): it needs to know, as from a run's own manifest. A tied model's state dict
            # names its matrix twice (or only as tok_embeddings).
            out = model.get("output.weight")
            tied = out is None or (isinstance(out, torch.Tensor) and torch.equal(out, model["tok_embeddings.weight"]))
        manifest = build_manifest(
            step=step,
            files=hash_files(tmp, list_files(tmp)),
            fingerprint={"config_hash": "", "layout": {}, "world_size": 1},
            contents=list(state),
            extra={"model_only": list(state) == ["model"], "converted_from": str(source), "tie_word_embeddings": tied},
        )
        write_manifest(tmp, manifest)


def _special_tokens(tokenizer_path: str | None, margs: Any) -> tuple[int, int] | None:
    """bos/eos ids for config.json, from the tokenizer the run trained with (as the trainer's own export
    writes them): --tokenizer, else the built-in one when it fits the flavor's vocabulary, else None (the
    config then gets Llama 3's ids for a 128256 vocabulary, none otherwise)."""
    from torchtitan_like.components.tokenizer import build_tokenizer
    from torchtitan_like.errors import DataError

    try:
        tok = build_tokenizer(tokenizer_path or "", key="--tokenizer")
    except DataError as e:
        raise CheckpointError(str(e)) from None
    if tok.vocab_size > margs.vocab_size or (tokenizer_path is None and margs.vocab_size == 128256):
        if tokenizer_path is not None:
            raise CheckpointError(f"--tokenizer {tokenizer_path}: {tok.vocab_size} tokens do not fit the flavor's "
                                  f"vocabulary of {margs.vocab_size}")
        return None
    return tok.bos_id, tok.eos_id


def _other_tying_flavor(margs: Any) -> str:
    """The flavor that is `margs` with the other tie_word_embeddings, for a message's fix."""
    import dataclasses

    from torchtitan_like.models.llama3 import LLAMA3_FLAVORS

    other = dataclasses.replace(margs, tie_word_embeddings=not margs.tie_word_embeddings)
    for name, args in LLAMA3_FLAVORS.items():
        if args == other:
            return f"--flavor {name}"
    return f"a flavor with tie_word_embeddings={not margs.tie_word_embeddings}"


def _check_tying(sd: dict[str, torch.Tensor], margs: Any, *, src: Path, flavor: str, hf: bool = False) -> None:
    """Tied weights go with a tied flavor only, and an output head of its own with an untied one: a tied
    flavor would drop a trained output.weight, an untied one would turn the shared table into two (the
    loader refuses the same mismatch from a config.json's tie_word_embeddings)."""
    out, emb = sd.get("output.weight"), sd.get("tok_embeddings.weight")
    out_name, emb_name = "output.weight", "tok_embeddings.weight"
    if hf:
        out_name, emb_name = "lm_head.weight", "model.embed_tokens.weight"
    if emb is None:
        return  # the flavor check names the missing embedding
    tied = out is None or (out.shape == emb.shape and torch.equal(out, emb))
    if margs.tie_word_embeddings and not tied:
        raise CheckpointError(
            f"{src} has an output head of its own ({out_name} differs from {emb_name}), but --flavor "
            f"{flavor} ties them (tie_word_embeddings) and would drop the trained {out_name}: convert with "
            f"{_other_tying_flavor(margs)}"
        )
    if not margs.tie_word_embeddings and tied:
        how = f"has no {out_name}" if out is None else f"has {out_name} equal to {emb_name}"
        raise CheckpointError(
            f"{src} {how} (tied embeddings), but --flavor {flavor} has an output head of its own "
            f"(tie_word_embeddings=False): convert with {_other_tying_flavor(margs)}"
        )


def _check_flavor(sd: dict[str, torch.Tensor], margs: Any, *, src: Path, flavor: str, hf: bool = False,
                  n_layers_set: bool = False) -> None:
    """The weights are the flavor's, name for name and shape for shape: the config.json written next to
    them describes the flavor (a missing layer would be filled with random weights by transformers)."""
    from torchtitan_like.models.llama3.model import Transformer

    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in Transformer(margs).state_dict().items()}
    _check_tying(sd, margs, src=src, flavor=flavor, hf=hf)
    if margs.tie_word_embeddings:
        want.pop("output.weight", None)
        sd = {k: v for k, v in sd.items() if k != "output.weight"}
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    wrong = sorted(k for k in set(want) & set(sd) if tuple(sd[k].shape) != want[k])
    for what, names in (("lacks", missing), ("has weights the flavor does not have:", extra), ("has other shapes for", wrong)):
        if names:
            raise CheckpointError(
                f"{src} {what} {names[:3]}{' ...' if len(names) > 3 else ''} of --flavor {flavor}"
                f"{f' --n-layers {margs.n_layers}' if n_layers_set else ''}: pick the flavor these weights were "
                "trained as (and --n-layers N where the job set model.n_layers)"
            )


def cmd_convert(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    # A file by its suffix; anything else is a folder, dots included (Llama-3.2-1B-hf, export_v1.0).
    dst_suffix = dst.suffix.lower() if dst.suffix.lower() in (".pt", ".safetensors") else ""
    if args.step is not None and args.step < 0:
        raise CheckpointError(f"--step {args.step} is negative: give the training step of these weights (0 or more)")
    if not src.exists():
        raise CheckpointError(f"{src} does not exist")
    if args.n_layers is not None and not args.hf:
        raise CheckpointError("--n-layers applies with --hf (it sets the block count of --flavor): add --hf --flavor F")
    if args.step is not None and _is_dcp(src):
        raise CheckpointError(f"--step applies to a DCP destination; {src} is a DCP checkpoint and keeps its own step")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst} already exists: pick a new destination")
    if _is_dcp(src) and dst.resolve().is_relative_to(src.resolve()):
        # (A file there is "not listed in manifest.json": the checkpoint would no longer verify.)
        raise CheckpointError(f"{dst} is inside the source checkpoint {src}: write it elsewhere")
    if _is_dcp(src):
        if dst_suffix == ".pt":
            # (A torchtitan checkpoint converts its weights only: model-only unless --no-model-only says otherwise.)
            model_only = bool(args.model_only) or (args.model_only is None and is_flat_model_layout(src))
            if args.hf:
                raise CheckpointError("--hf applies to .safetensors files and folders, not .pt")
            state = _read_dcp(src, model_only=model_only)
            state["model"] = _cast(state["model"], args.dtype)
            with _atomic(dst) as tmp:
                torch.save(state["model"] if model_only else state, tmp)
        else:
            if args.model_only is False:
                raise CheckpointError("safetensors hold model weights only: drop --no-model-only or write a .pt")
            from torchtitan_like.models.llama3.state_dict_adapter import HF_SINGLE, save_hf_safetensors, to_hf

            sd = _cast(_read_dcp(src, model_only=True)["model"], args.dtype)
            margs = _model_args(args.flavor, args.n_layers) if args.hf else None
            if margs is not None:
                _check_flavor(sd, margs, src=src, flavor=args.flavor, n_layers_set=args.n_layers is not None)
                sd = to_hf(sd, margs)
            if dst_suffix == ".safetensors":
                from safetensors.torch import save_file

                with _atomic(dst) as tmp:
                    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata={"format": "pt"})
            else:
                tokens = _special_tokens(args.tokenizer, margs) if margs is not None else None
                with _atomic(dst) as tmp:
                    save_hf_safetensors(sd, tmp, args=margs, special_tokens=tokens)
                    if tokens is not None:  # (the tokenizer config.json names: its files too)
                        from torchtitan_like.components.hf_tokenizer import export_hf_tokenizer

                        export_hf_tokenizer(args.tokenizer or "", tmp, model_max_length=margs.max_seq_len)
                if margs is not None and tokens is None:
                    print(f"note: no tokenizer files in {dst}: pass --tokenizer (the run's model.tokenizer_path) to "
                          "write them", file=sys.stderr)
                if margs is None:
                    print(
                        f"note: wrote our parameter names into {dst / HF_SINGLE}; add --hf --flavor for HF names",
                        file=sys.stderr,
                    )
    else:
        # A file (or HF folder) -> a DCP folder.
        if dst_suffix in (".pt", ".safetensors"):
            raise CheckpointError(f"{src} is not a DCP checkpoint folder (no .metadata), and {dst} is not a folder")
        step = args.step
        if src.suffix.lower() == ".pt":
            loaded = _load_pt(src)
            state = loaded if isinstance(loaded, dict) and "model" in loaded else {"model": loaded}
            model = state["model"]
            if not (isinstance(model, dict) and model and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                            for k, v in model.items())):
                raise CheckpointError(
                    f"{src} holds a {type(model).__name__}, not a state dict (parameter name -> tensor, or a dict "
                    "with one under \"model\")"
                )
            if args.model_only or args.hf:
                state = {"model": state["model"]}
            if args.hf:  # a state dict under Hugging Face's names (its other states would be in its own formats)
                from torchtitan_like.models.llama3.state_dict_adapter import from_hf

                margs = _model_args(args.flavor, args.n_layers)
                state["model"] = from_hf(state["model"], margs)
                _check_flavor(state["model"], margs, src=src, flavor=args.flavor, hf=True,
                              n_layers_set=args.n_layers is not None)
            state["model"] = _cast(state["model"], args.dtype)
            if step is None and isinstance(state.get("train_state"), dict):
                saved = state["train_state"].get("step", 0)
                if isinstance(saved, torch.Tensor) and saved.numel() == 1:
                    saved = saved.item()
                if isinstance(saved, bool) or not isinstance(saved, int) or saved < 0:
                    raise CheckpointError(f"{src}: train_state step {saved!r} is not a step number: pass --step N")
                step = saved
        elif src.suffix.lower() == ".safetensors" or src.is_dir():
            from torchtitan_like.models.llama3.state_dict_adapter import from_hf, load_hf_safetensors

            sd = load_hf_safetensors(src)
            if args.hf:
                from torchtitan_like.models.llama3.state_dict_adapter import check_hf_config, read_hf_config

                margs = _model_args(args.flavor, args.n_layers)
                config = read_hf_config(src)
                if config is not None:
                    where = (src if src.is_dir() else src.parent) / "config.json"
                    check_hf_config(config, margs, where=str(where))
                sd = from_hf(sd, margs)
                # Without a config.json only the weights tell (shapes, tying): checked as an export's are.
                _check_flavor(sd, margs, src=src, flavor=args.flavor, hf=True, n_layers_set=args.n_layers is not None)
            state = {"model": _cast(sd, args.dtype)}
        else:
            raise CheckpointError(f"{src}: expected a DCP folder, a .pt or .safetensors file, or an HF folder")
        hf_names = sorted(k for k in state["model"] if k.startswith(("model.embed_tokens.", "model.layers.", "lm_head.")))
        if hf_names:
            # No run could load them under these names.
            raise CheckpointError(
                f"{src} holds Hugging Face names ({', '.join(hf_names[:2])}, ...): add --hf --flavor NAME to "
                "convert them to this trainer's names"
            )
        _write_dcp(state, dst, step=step or 0, source=src)
    print(f"ok: wrote {dst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/checkpoint.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="re-hash a step folder against its manifest")
    v.add_argument("folder")
    v.set_defaults(fn=cmd_verify)
    i = sub.add_parser("inspect", help="manifest summary and every entry's name, shape and dtype (nothing loaded)")
    i.add_argument("folder")
    i.set_defaults(fn=cmd_inspect)
    c = sub.add_parser("convert", help="DCP folder <-> .pt / .safetensors / HF folder")
    c.add_argument("src")
    c.add_argument("dst", help="a .pt or .safetensors file, or a folder: from a DCP source a safetensors folder "
                               "(HF names and config.json with --hf), from a file or HF folder a DCP checkpoint")
    c.add_argument(
        "--model-only",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep only the model weights (default: on for safetensors, off for .pt)",
    )
    c.add_argument("--hf", action="store_true", help="Hugging Face LlamaForCausalLM names (needs --flavor)")
    c.add_argument("--flavor", help="llama3 flavor of the weights, for --hf (e.g. debugmodel, 8B)")
    c.add_argument("--n-layers", type=int, default=None,
                   help="with --hf: the weights' block count, where the job set model.n_layers (default: the flavor's)")
    c.add_argument("--tokenizer", default=None,
                   help="with --hf: the tokenizer the run trained with (model.tokenizer_path), for config.json's "
                        "bos/eos ids and the folder's tokenizer.json + tokenizer_config.json (default: the built-in "
                        "tokenizer where it fits the flavor; none for a 128256 vocabulary: Llama 3's ids, no files)")
    c.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), help="cast the model weights")
    c.add_argument(
        "--step", type=int, help="step recorded in the manifest of a DCP destination (default: from the source, else 0)"
    )
    c.set_defaults(fn=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (CheckpointError, OSError) as e:  # (OSError: a full disk, a folder without permission)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
