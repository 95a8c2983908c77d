#!/usr/bin/env python3
"""Plan a training job's parallel layout before spending a GPU on it.

    tools/plan.py --model llama3:8B --ngpu 8 --hardware H100 --seq-len 8192 --global-batch 64 --out plan.toml
    tools/plan.py --config train_configs/llama3_8b.toml --ngpu 16 --global-batch 64 --explain 1

It enumerates every layout (data parallel replicate/shard, TP with or without async TP, CP, PP
with schedule and microbatch, AC mode, float8 with or without FSDP float8 all-gather) that the
trainer's own config checks accept, predicts each one's peak memory per GPU (itemized) and step
time (compute, exposed communication, pipeline bubble),
ranks the ones that fit by tokens/s per GPU, prints the top of the table, and writes the winner as
a TOML that run_train.sh accepts. Unless --no-verify, the winner then goes through the dry run at
the planned world size (every model pass on the meta device), so the TOML is known to build.

Exit status: 0 planned; 2 bad input or no layout fits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

from torchtitan_like.errors import ConfigError, TrainerError  # noqa: E402

FEATURE_HELP = ("comma-separated: fsdp, hsdp, ddp, tp, async_tp, pp, cp, float8, ac (default: all but float8 unless "
                "--precision fp8; async_tp only for compiled jobs on a CUDA profile; hsdp and cp shard the "
                "parameters, so they bring fsdp with them)")


def _parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="tools/plan.py", description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="name:flavor, e.g. llama3:8B")
    src.add_argument("--config", type=Path, help="a job TOML (its model, optimizer, ... are kept)")
    ap.add_argument("--ngpu", type=int, required=True, help="GPUs in the job (all nodes)")
    ap.add_argument("--gpus-per-node", type=int, default=None, help="default: the hardware profile's (8)")
    ap.add_argument("--hardware", default="H100", help="H100, H200, B200, A100, H100-GT, or a profile JSON")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the config's training.seq_len")
    ap.add_argument("--global-batch", type=int, default=None, help="sequences per step (default: the config's)")
    ap.add_argument("--precision", choices=("bf16", "fp8"), default="bf16", help="fp8 lets layouts use float8")
    ap.add_argument("--allow", default=None, help=FEATURE_HELP)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="plan compiled or eager (default: the --config's compile.enable; compiled for --model)")
    ap.add_argument("--max-local-batch", type=int, default=8)
    ap.add_argument("--top", type=int, default=10, help="rows of the table")
    ap.add_argument("--explain", type=int, default=None, metavar="N", help="print the full breakdown of row N")
    ap.add_argument("--out", type=Path, default=None, help="write the winning layout's TOML here")
    ap.add_argument("--json", type=Path, default=None, help="write the ranked predictions as JSON")
    ap.add_argument("--no-verify", action="store_true", help="skip the dry run of the winner")
    return ap.parse_args(argv)


def _compiled(args: argparse.Namespace, cfg) -> bool:
    """--compile / --no-compile, else what the job's TOML says (a --model job is planned compiled)."""
    if args.compile is not None:
        return args.compile
    return cfg.compile.enable if args.config else True


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        return _run(args)
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.models import MODELS
    from torchtitan_like.planner.hardware import load_profile
    from torchtitan_like.planner.layout import FEATURES, PlanInputs
    from torchtitan_like.planner.plan import GIB, explain, make_plan, table, winner_toml

    from torchtitan_like.output_files import check_output_file, write_text_atomically

    if args.ngpu < 1:
        raise ConfigError(f"--ngpu {args.ngpu} must be >= 1")
    for flag, path, example in (("--out", args.out, "plan.toml"), ("--json", args.json, "plan.json")):
        if path is not None:  # (before planning, which takes a while)
            check_output_file(path, f"{flag} {path}", example=example)
    if args.model:
        name, _, flavor = args.model.partition(":")
        if name not in MODELS or flavor not in MODELS[name].flavors:
            known = ", ".join(f"{n}:{f}" for n, spec in MODELS.items() for f in spec.flavors)
            raise ConfigError(f"--model {args.model!r} is not a known model: use one of {known}")
        base = ["--model.name", name, "--model.flavor", flavor]
    else:
        if not args.config.is_file():
            raise ConfigError(f"--config {args.config}: no such file")
        base = ["--job.config_file", str(args.config)]
    cfg = load_config(base)
    hw = load_profile(args.hardware)
    if args.gpus_per_node is not None:
        hw = dataclasses.replace(hw, gpus_per_node=args.gpus_per_node)
    allow = set(FEATURES) - ({"float8"} if args.precision == "bf16" else set())
    if args.allow is not None:
        allow = {f.strip() for f in args.allow.split(",") if f.strip()}
        if not allow:
            raise ConfigError(f"--allow {args.allow!r} names no feature: choose from {', '.join(FEATURES)}")
        unknown = sorted(allow - set(FEATURES))
        if unknown:
            raise ConfigError(f"--allow: unknown features {unknown}; choose from {', '.join(FEATURES)}")
        if "float8" in allow and args.precision != "fp8":
            raise ConfigError("--allow float8 needs --precision fp8")
        if "float8" not in allow and args.precision == "fp8":
            # (It would plan bf16 layouts only, while the request says float8.)
            raise ConfigError(f"--precision fp8 with --allow {args.allow}: add float8 to --allow, or drop --precision fp8")
        if allow & {"hsdp", "cp"}:
            allow.add("fsdp")  # both shard the parameters (over dp_shard, or over cp)
    if args.precision == "fp8" and hw.peak_fp8_tflops is None:
        raise ConfigError(f"--precision fp8: {hw.name} has no float8 matmuls (its profile has no peak_fp8_tflops; "
                          "the trainer refuses float8 there unless quantize.linear.float8.emulate): use --precision bf16")
    for flag, value in (("--seq-len", args.seq_len), ("--global-batch", args.global_batch),
                        ("--gpus-per-node", args.gpus_per_node), ("--max-local-batch", args.max_local_batch),
                        ("--top", args.top), ("--explain", args.explain)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value} must be >= 1")
    if args.ngpu > hw.gpus_per_node and args.ngpu % hw.gpus_per_node:
        raise ConfigError(f"--ngpu {args.ngpu} is not a whole number of nodes of {hw.gpus_per_node} GPUs "
                          "(--gpus-per-node, or the hardware profile's): use a multiple, or set --gpus-per-node")
    seq = args.seq_len if args.seq_len is not None else cfg.training.seq_len
    if args.global_batch is not None:
        gbs = args.global_batch
    elif cfg.training.global_batch_size > 0:
        gbs = cfg.training.global_batch_size
    else:
        where = (f"--config {args.config} leaves training.global_batch_size at -1 (derived from the layout)"
                 if args.model is None else f"--model {args.model} comes with no batch")
        raise ConfigError(f"--global-batch N is needed: {where}; give the global batch in sequences")
    inputs = PlanInputs(
        base_argv=tuple(base), world_size=args.ngpu, hardware=hw, seq_len=seq, global_batch_size=gbs,
        compile=_compiled(args, cfg), allow=frozenset(allow), max_local_batch_size=args.max_local_batch,
    )
    model_args = MODELS[cfg.model.name].args(cfg.model.flavor, n_layers=cfg.model.n_layers)
    layers = f" ({model_args.n_layers} layers: model.n_layers)" if cfg.model.n_layers is not None else ""
    print(f"planning {cfg.model.name} {cfg.model.flavor}{layers} on {args.ngpu} x {hw.name} "
          f"({hw.gpus_per_node} per node), "
          f"seq {seq}, global batch {gbs} sequences, {'compiled' if inputs.compile else 'eager'}, "
          f"features: {', '.join(sorted(allow))}")
    plan = make_plan(inputs, model_args.n_layers)
    print(table(plan, args.top))
    if plan.refused:
        print("refused by the trainer's checks (count, reason):")
        for reason, n in plan.refused.most_common(5):
            print(f"  {n:5d}  {reason}")
    # Nothing is written until every check has passed, the dry run of the winner included: a refused command
    # leaves no --json or --out behind.
    if not plan.ranked and not plan.too_big:
        reasons = "; ".join(f"{n} x {reason}" for reason, n in plan.refused.most_common(3))
        raise ConfigError(
            f"no layout of {args.ngpu} GPUs passes the trainer's checks for this job"
            + (f" ({reasons})" if reasons else f" (global batch {gbs} has no divisor that is a data-parallel degree here)")
            + ": change --global-batch (a multiple of the data-parallel degrees you want), --ngpu or --allow"
        )
    if not plan.ranked:
        smallest = plan.too_big[0] if plan.too_big else None
        hint = (f"; the smallest valid layout needs {smallest.memory.total / GIB:.1f} GiB ({smallest.layout.describe()})"
                if smallest else "")
        # (The usable memory, not the GPU's: a layout needing less than hbm_gib may still not fit.)
        raise ConfigError(f"no layout fits in {hw.hbm_gib:.0f} GiB per GPU ({hw.hbm_gib - hw.reserved_gib:.1f} GiB "
                          f"usable after {hw.reserved_gib:g} GiB reserved){hint}: add GPUs, allow more features, "
                          "or lower --seq-len / --global-batch")
    if args.explain is not None:
        if not 1 <= args.explain <= len(plan.ranked):
            raise ConfigError(f"--explain {args.explain}: the table has rows 1..{len(plan.ranked)}")
        print(explain(plan.ranked[args.explain - 1], hw))
    best = plan.ranked[0]
    verified = None
    if args.out and not args.no_verify:
        from torchtitan_like.dry_run import dry_run

        # The rank whose memory the plan reports: the first of the pipeline rank that peaks.
        rank = best.memory.pp_rank * (args.ngpu // best.layout.pp)
        # The layout is what is verified here, from a copy of the TOML (--out is written once it passed); the data
        # files are the run's (its own dry run checks them).
        with tempfile.TemporaryDirectory(prefix="torchtitan_like_plan_") as folder:
            toml = Path(folder) / args.out.name
            toml.write_text(winner_toml(best))
            report = dry_run(["--job.config_file", str(toml)], world_size=args.ngpu, rank=rank, device=hw.device,
                             files=False)
        got, predicted = report["state_bytes"], best.memory.state.as_dict()
        if got != predicted:
            raise RuntimeError(f"planner state bytes {predicted} != dry run {got} for rank {rank}: a planner bug")
        verified = (f"dry run of {args.out} on {args.ngpu} ranks: OK; rank {rank} state {got['total'] / GIB:.2f} "
                    "GiB, exactly as planned")
    if args.json:
        rows = [{"rank": i, "layout": p.layout.describe(), "overrides": p.layout.overrides(),
                 "tokens_per_s_per_gpu": p.speed.tokens_per_s_per_gpu, "tflops_per_gpu": p.speed.tflops_per_gpu,
                 "mfu": p.speed.mfu, "memory_bytes": p.memory.items(), "step_s": p.step.items()}
                for i, p in enumerate(plan.ranked, 1)]
        write_text_atomically(args.json, json.dumps(rows, indent=2) + "\n", f"--json {args.json}", example="plan.json")
    if args.out:
        write_text_atomically(args.out, winner_toml(best), f"--out {args.out}", example="plan.toml")
        print(f"wrote {args.out}: {best.layout.describe()}")
        if verified:
            print(verified)
    return 0


if __name__ == "__main__":
    sys.exit(main())
