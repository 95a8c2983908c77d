"""Dry run: one process stands in for any world size and builds what one rank of the job would build.

    COMM_MODE=fake_backend NGPU=512 CONFIG_FILE=train_configs/llama3_405b.toml ./run_train.sh
    python -m torchtitan_like.dry_run --world-size 512 [--rank R] [--device cuda] [--json FILE] \
        --job.config_file FILE [--section.key value ...]

It joins a fake process group of `--world-size` ranks as rank `--rank` (collectives return at once,
nothing is sent), then runs the trainer's own construction: every config check, the device mesh, the
float8 conversion, the pipeline split, TP / CP / AC / compile / FSDP on the meta device. It does not
touch the GPU, read weights or training data, or train. A config that would fail on the cluster for a
config reason fails here with the same error (exit 2). That includes the files the job opens first,
checked as the real run checks them: the tokenizer (and its vocab against the model), the dataset and
validation sources (paths, formats; an `hf` dataset is looked up on the hub), and
checkpoint.initial_load_path (a DCP folder, or HF safetensors whose config.json must match the
flavor). `--skip-files` (DRY_RUN_SKIP_FILES=1) skips those when this machine does not have the
cluster's files. Hardware checks (float8 capability, fused optimizer kernels present) are assumed to
pass for `--device`.

It reports the bytes of parameters, gradients and optimizer states this rank would hold, from the
local shapes of its (DTensor) parameters, and writes them as JSON with `--json`.

It never runs a step. `--step-check` (DRY_RUN_STEP_CHECK=1) then does: it trains the job's features
and layout, shrunk to at most `--step-check-ranks` CPU processes, for a few steps, saving and resuming
where the job does (`torchtitan_like/step_check.py`).

The fake process group is torch's own (`torch.testing._internal.distributed.fake_pg`, the one torch's
tests and torchtitan's dry run use): a private module, present in torch 2.4 through 2.13.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from torchtitan_like.errors import ConfigError, TrainerError
from torchtitan_like.output_files import check_output_file, write_text_atomically
from torchtitan_like.train import EXIT_CONFIG_OR_DATA, EXIT_INTERRUPTED, _setup_logging

logger = logging.getLogger("torchtitan_like")


def _json_name(path: Path) -> str:
    """How the user named the report: run_train.sh's DRY_RUN_JSON, or this module's --json."""
    env = os.environ.get("DRY_RUN_JSON")
    return f"DRY_RUN_JSON={env}" if env and Path(env) == path else f"--json {path}"


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m torchtitan_like.dry_run", add_help=True)
    parser.add_argument("--world-size", type=int, required=True, help="ranks the job would have (NGPU x NNODES)")
    parser.add_argument("--rank", type=int, default=0, help="the rank to stand in for (default 0)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="device type of the job's ranks")
    parser.add_argument("--json", type=Path, default=None, help="write the report to this JSON file")
    parser.add_argument("--skip-files", action="store_true",
                        help="do not check the tokenizer, dataset and initial checkpoint files (not on this machine)")
    parser.add_argument("--step-check", action="store_true",
                        help="then train the job's features and layout, shrunk, on CPU processes "
                             "(torchtitan_like.step_check)")
    parser.add_argument("--step-check-ranks", type=int, default=None,
                        help="CPU processes the step check may start (default 8)")
    parser.add_argument("--step-check-timeout", type=float, default=None,
                        help="seconds each step-check launch may take (default 1200)")
    return parser.parse_known_args(argv)


def dry_run(argv: list[str], *, world_size: int, rank: int = 0, device: str = "cuda", files: bool = True) -> dict:
    """Build rank `rank` of a `world_size` job from config `argv` on a fake process group; return the
    report ({"world_size", "rank", "layout", "coords", "state_bytes", "files_checked"}). `files`: also
    check the tokenizer, dataset and initial checkpoint files. Leaves no process group behind."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from torchtitan_like.config.loader import load_config
    from torchtitan_like.planner.state import measured_state_bytes
    from torchtitan_like.trainer import Trainer

    if world_size < 1:
        raise TrainerError(f"dry run: --world-size {world_size} must be >= 1 (the job's ranks, NGPU x NNODES)")
    if not 0 <= rank < world_size:
        raise TrainerError(f"dry run: --rank {rank} must be in 0..{world_size - 1} (--world-size {world_size})")
    cfg = load_config(argv)
    if dist.is_initialized():
        raise RuntimeError("dry_run() needs a process without a process group")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        trainer = Trainer(cfg, dry_run_device=device, dry_run_files=files)
        pd = trainer.parallel_dims
        coords = {}
        if pd.mesh is not None:
            for name in pd.mesh.mesh_dim_names or ():
                coords[name] = pd.get_mesh(name).get_local_rank()
        state = measured_state_bytes(trainer.model_parts)
        report = {
            "world_size": world_size,
            "rank": rank,
            "device": device,
            "model": f"{cfg.model.name} {cfg.model.flavor}"
            + (f" ({cfg.model.n_layers} layers)" if cfg.model.n_layers is not None else ""),
            "layout": {"dp_replicate": pd.dp_replicate, "dp_shard": pd.dp_shard, "cp": pd.cp, "tp": pd.tp,
                       "pp": pd.pp},
            "coords": coords,
            "stages": list(trainer.pp_plan.stage_ids(pd.pp_rank)) if trainer.pp_plan is not None else [0],
            "state_bytes": state.as_dict(),
            "files_checked": files,
        }
    finally:
        dist.destroy_process_group()
    return report


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


def main(argv: list[str] | None = None) -> int:
    args, rest = _parse(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    try:
        # (Checked before the dry run: 0 is not "the default", and a bad limit should not wait for it.)
        if args.step_check_ranks is not None and args.step_check_ranks < 1:
            raise TrainerError(f"--step-check-ranks {args.step_check_ranks} must be >= 1 (DRY_RUN_STEP_CHECK_RANKS: "
                               "the CPU processes the step check may start)")
        if args.step_check_timeout is not None and not args.step_check_timeout > 0:
            raise TrainerError(f"--step-check-timeout {args.step_check_timeout:g} must be > 0 seconds "
                               "(DRY_RUN_STEP_CHECK_TIMEOUT: each step-check launch's limit)")
        if args.json is not None:  # (before the dry run, which can take a while at large world sizes)
            check_output_file(args.json, _json_name(args.json))
        report = dry_run(rest, world_size=args.world_size, rank=args.rank, device=args.device,
                         files=not args.skip_files)
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG_OR_DATA
    except KeyboardInterrupt:
        print("error: dry run interrupted by SIGINT (Ctrl-C): nothing was written", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    s = report["state_bytes"]
    logger.info(
        "dry run OK: %s, rank %d of %d %s, stages %s: parameters %s, gradients %s, optimizer states %s, "
        "total state %s (%d tensors, %d local elements); %s",
        report["model"], args.rank, args.world_size, report["coords"] or "(no mesh)", report["stages"],
        _gib(s["params"]), _gib(s["grads"]), _gib(s["optimizer"]), _gib(s["total"]), s["n_tensors"], s["n_elements"],
        "tokenizer, data and initial checkpoint files checked" if report["files_checked"]
        else "files not checked (DRY_RUN_SKIP_FILES=1 / --skip-files)",
    )
    if args.json is not None:
        try:
            write_text_atomically(args.json, json.dumps(report, indent=2) + "\n", _json_name(args.json))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return EXIT_CONFIG_OR_DATA
    if args.step_check:
        from torchtitan_like.config.loader import load_config
        from torchtitan_like.step_check import DEFAULT_MAX_RANKS, DEFAULT_TIMEOUT_S, step_check

        try:
            max_ranks = DEFAULT_MAX_RANKS if args.step_check_ranks is None else args.step_check_ranks
            timeout_s = DEFAULT_TIMEOUT_S if args.step_check_timeout is None else args.step_check_timeout
            return step_check(load_config(rest), report["layout"], device=args.device, max_ranks=max_ranks,
                              timeout_s=timeout_s)
        except TrainerError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return EXIT_CONFIG_OR_DATA
    return 0


if __name__ == "__main__":
    sys.exit(main())
