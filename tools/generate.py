"""Generate text from a trained checkpoint, to see what a run has learned.

    .venv/bin/python tools/generate.py --job.config_file train_configs/debug_model.toml \\
        --prompt "def fibonacci(n):" --max-new-tokens 64 [--temperature 0.8 --top-k 50] [--out gen.json]

The config arguments are the trainer's (the job's TOML and any --section.key overrides): they name the
model (model.flavor, model.n_layers, model.tokenizer_path) and where its checkpoints are (job.dump_folder,
checkpoint.folder; checkpoint.load_step picks one). The newest complete checkpoint of that run is loaded,
with the checks of a resume; --checkpoint PATH loads another step folder (ours or torchtitan's) or Hugging
Face safetensors instead (with the tokenizer such a folder ships, where model.tokenizer_path is unset).
One process, one device (--device; default cuda when there is one), the weights in
training.mixed_precision_param's dtype (auto: bfloat16 on CUDA, float32 on CPU); parallelism, compile,
float8 and activation checkpointing settings do not apply. Each prompt is encoded as training packs a
document ([bos] text) and continued until a stop token or --max-new-tokens; temperature 0 (the default)
is greedy. The stop tokens: the eos ids of the generation_config.json of the Hugging Face weights loaded
(else of model.hf_assets_path), where there is one (Llama 3 instruct: <|eot_id|> too), else the
tokenizer's eos; plus each --stop-token. The completions go to stdout, one speed line per prompt to the log (stderr), and
--out writes them all as JSON. Exit status: 0, or 2 with one error line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

from torchtitan_like.errors import TrainerError  # noqa: E402


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="tools/generate.py", description=__doc__.splitlines()[0],
                                 epilog="Any other --section.key VALUE is a config override, as for run_train.sh.")
    ap.add_argument("--prompt", action="append", default=[], help="text to continue (repeat for several)")
    ap.add_argument("--prompt-file", help="a UTF-8 file whose whole text is one more prompt (a leading byte-order "
                                          "mark is dropped, as training drops a document's)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="tokens to add to each prompt at most (default 64)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); e.g. 0.8 to sample")
    ap.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0 = all)")
    ap.add_argument("--stop-token", action="append", default=[],
                    help="also stop at this special token, e.g. '<|eot_id|>' (repeat for several)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the sampling (default debug.seed)")
    ap.add_argument("--checkpoint", help="a step-N folder (ours or torchtitan's) or Hugging Face safetensors to load "
                                         "instead of the job's newest checkpoint")
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    ap.add_argument("--out", help="also write the prompts, completions and speeds as JSON here")
    return ap.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, rest = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)
    try:
        return _run(args, rest)
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, rest: list[str]) -> int:
    import torch

    from torchtitan_like.config.loader import load_config
    from torchtitan_like.config.validate import SEED_RANGE
    from torchtitan_like.errors import ConfigError
    from torchtitan_like.generation import Sampling, generate, load_model
    from torchtitan_like.output_files import check_output_file, write_text_atomically

    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            # utf-8-sig: a leading byte-order mark (Windows editors write one) is no text, as for the .txt
            # documents training reads (data/sources.py); kept, it was three more prompt tokens.
            prompts.append(Path(args.prompt_file).read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--prompt-file {args.prompt_file}: {getattr(e, 'strerror', None) or e}") from None
    if not prompts:
        raise ConfigError("no prompt: give --prompt TEXT (one or more) or --prompt-file FILE")
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
    sampling.check()
    rule, ok = SEED_RANGE  # (debug.seed's; torch raised a traceback)
    if args.seed is not None and not ok(args.seed):
        raise ConfigError(f"--seed {args.seed} must be {rule}")
    if args.out:
        check_output_file(Path(args.out), f"--out {args.out}", example="generate.json")  # before the load
    cfg = load_config(rest)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:  # (not a device string torch knows)
        raise ConfigError(f"--device {args.device}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: this machine has no CUDA device; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {args.device}: use cpu, cuda or cuda:N")
    loaded = load_model(cfg, device=device, checkpoint=args.checkpoint, stop_tokens=args.stop_token)
    logging.getLogger("generate").info("loaded %s (step %s), %s on %s", loaded.source, loaded.step,
                                       next(loaded.model.parameters()).dtype, device)
    seed = cfg.debug.seed if args.seed is None else args.seed
    results = []
    for i, prompt in enumerate(prompts, 1):
        r = generate(loaded, prompt, sampling, seed=seed)
        results.append(r)
        end = (f"stopped at {loaded.tokenizer.decode([r['stop_token_id']])}" if r["stopped_at_eos"]
               else f"reached --max-new-tokens {sampling.max_new_tokens}")
        logging.getLogger("generate").info(
            "prompt %d: %d tokens + %d new in %.2f s (%s tokens/s), %s", i, r["prompt_tokens"],
            len(r["new_token_ids"]), r["seconds"], r["tokens_per_s"], end,
        )
        print(f"=== prompt {i} ===\n{prompt}{r['completion']}", flush=True)
    if args.out:
        report = {
            "checkpoint": loaded.source, "step": loaded.step,
            "model": {"name": cfg.model.name, "flavor": cfg.model.flavor, "n_layers": loaded.model.args.n_layers},
            "device": str(device), "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
            "sampling": {"max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                         "top_k": sampling.top_k, "seed": seed, "stop_token_ids": list(loaded.stop_ids)},
            "results": results,
        }
        write_text_atomically(Path(args.out), json.dumps(report, indent=1) + "\n", f"--out {args.out}",
                              example="generate.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
