"""How long a checkpoint save blocks training, per `checkpoint.async_mode`, and how long it takes in all.

    python benchmarks/bench_checkpoint.py                                   # 1B, every mode, on the GPU
    python benchmarks/bench_checkpoint.py --modes async_with_pinned_mem --ngpu 8
    python benchmarks/bench_checkpoint.py --flavor debugmodel --seq-len 64 --saves 2 --interval 2   # CPU smoke

Each mode runs in a fresh `torchrun --standalone --nproc_per_node=NGPU` process: our trainer on
synthetic tokens with `checkpoint.enable`, a save every `--interval` steps (`--saves` of them, full
state: model, optimizer, data loader, scheduler), `keep_latest_k=1` so the disk holds one or two
saves at a time. Measured on rank 0, around the trainer's own calls:

- `call_s`: the time inside `Checkpointer.maybe_save`;
- `previous_wait_s`: the part of it spent waiting for the previous save to finish (one save in
  flight at a time): non-zero means `--interval` steps take less time than one save;
- `staging_wait_s`: the time the next optimizer step waited for the save's device-to-host staging
  (async_with_pinned_mem stages in the background; the optimizer must not change the weights first);
- `blocking_s` = call_s - previous_wait_s + staging_wait_s: the training time the save itself cost;
- `total_s`: from the start of the save until its manifest is written and the folder published.

The first save pays one-time costs (process groups, pinned buffers), so the summary gives the first
save and the median of the others. Issue 4's goal: under 1 s blocking for the 1B flavor on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (ROOT, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_train import StepTimer, _fmt, _git_version, _launch, _torchrun  # noqa: E402

MODES = ("disabled", "async", "async_with_pinned_mem")


def trainer_args(a: argparse.Namespace, mode: str, *, dump: str) -> list[str]:
    steps = a.interval * a.saves
    return [
        "--model.flavor", a.flavor,
        "--training.seq_len", str(a.seq_len),
        "--training.local_batch_size", "1",
        "--training.steps", str(steps),
        "--training.dataset", "synthetic",
        "--training.mixed_precision_param", a.dtype,
        "--lr_scheduler.warmup_steps", "1",
        "--metrics.log_freq", str(steps),
        "--metrics.no_enable_tensorboard",
        "--job.dump_folder", dump,
        "--checkpoint.enable",
        "--checkpoint.folder", str(Path(dump) / "checkpoint"),
        "--checkpoint.interval", str(a.interval),
        "--checkpoint.async_mode", mode,
        "--checkpoint.keep_latest_k", "1",
        # The run ends on a save: without this the last one would hold only the model
        # (last_save_model_only), not the full state every save is meant to measure.
        "--checkpoint.no_last_save_model_only",
        *a.extra,
    ]


# ------------------------------------------------------------------------------------------------
# Worker: inside torchrun
# ------------------------------------------------------------------------------------------------


class ComputeStreamTimer(StepTimer):
    """Waits for the compute stream only. With async_with_pinned_mem, DCP's stager copies to host on a
    side stream of its own from a background thread; a device-wide synchronize would wait for that copy
    too, charging part of it to the save's blocking time and the rest to the next step, where training
    itself overlaps it."""

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


def run_worker(a: argparse.Namespace) -> None:
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.trainer import Trainer

    saves: list[dict[str, Any]] = []
    total_s: dict[int, float] = {}
    trainer = Trainer(load_config(trainer_args(a, a.mode, dump=a.dump)))
    ckpt = trainer.checkpointer
    timer = ComputeStreamTimer(trainer.device)
    train_step, maybe_save, wait, wait_for_staging, finish = (
        timer.wrap(trainer.train_step), ckpt.maybe_save, ckpt.wait, ckpt.wait_for_staging, ckpt._finish
    )
    in_step = False
    previous_wait_s = 0.0

    def step_with_staging_waits(*args: Any, **kwargs: Any) -> Any:
        nonlocal in_step
        in_step = True
        try:
            return train_step(*args, **kwargs)
        finally:
            in_step = False

    def timed_save(step: int, **kwargs: Any) -> None:
        nonlocal previous_wait_s
        before, previous_wait_s = ckpt._saves, 0.0
        timer._sync()
        t0 = time.perf_counter()
        maybe_save(step, **kwargs)
        timer._sync()
        if ckpt._saves != before:
            saves.append({"step": step, "call_s": time.perf_counter() - t0, "previous_wait_s": previous_wait_s,
                          "staging_wait_s": 0.0})

    def timed_wait() -> None:
        # maybe_save first waits for the save still in flight, if any: the interval was too short.
        nonlocal previous_wait_s
        t0 = time.perf_counter()
        wait()
        previous_wait_s += time.perf_counter() - t0

    def timed_staging_wait() -> None:
        # Counted only where training waits: the optimizer's pre-step hook (inside maybe_save the
        # wait is already in call_s; at close() training is over).
        t0 = time.perf_counter()
        wait_for_staging()
        if in_step and saves:
            saves[-1]["staging_wait_s"] += time.perf_counter() - t0

    def timed_finish(step: int, *rest: Any) -> None:
        # Inline in maybe_save (disabled) or on the checkpointer's finishing thread (async modes);
        # CheckpointManager._finish(step, tmp, contents, model_only, model_dtype, t0): t0 comes last.
        finish(step, *rest)
        total_s[step] = time.perf_counter() - rest[-1]

    trainer.train_step = step_with_staging_waits  # type: ignore[method-assign]
    ckpt.maybe_save = timed_save  # type: ignore[method-assign]
    ckpt.wait = timed_wait  # type: ignore[method-assign]
    ckpt.wait_for_staging = timed_staging_wait  # type: ignore[method-assign]
    ckpt._finish = timed_finish  # type: ignore[method-assign]
    try:
        trainer.train()
    finally:
        trainer.close()  # waits for the last save
    if trainer.rank != 0:
        return
    for save in saves:
        if save["step"] in total_s:
            save["total_s"] = total_s[save["step"]]
    folder = Path(a.dump, "checkpoint")
    raw = timer.raw()
    raw.update(
        mode=a.mode,
        saves=saves,
        checkpoint_bytes_on_disk=sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
        checkpoint_folders=sorted(p.name for p in folder.iterdir()),
        world_size=trainer.world_size,
        version=_git_version(),
        final_loss=trainer.history[-1]["loss"] if trainer.history else None,
    )
    Path(a.raw_out).write_text(json.dumps(raw, indent=1))


# ------------------------------------------------------------------------------------------------
# Orchestration
# ------------------------------------------------------------------------------------------------


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    saves = raw["saves"]
    for s in saves:
        s["blocking_s"] = s["call_s"] - s["previous_wait_s"] + s["staging_wait_s"]
    missing = [s["step"] for s in saves if "total_s" not in s]
    if missing:
        raise SystemExit(f"the saves of steps {missing} never finished (see the log)")
    rest = saves[1:] or saves

    def stat(key: str) -> dict[str, float]:
        return {"first": saves[0][key], "median_after_first": statistics.median(s[key] for s in rest),
                "max": max(s[key] for s in saves)}

    step_times = raw["step_times_s"][1:] or raw["step_times_s"]
    return {
        "mode": raw["mode"],
        "device": raw["device"],
        "world_size": raw["world_size"],
        "torch": raw["torch"],
        "version": raw["version"],
        "saves": saves,
        "blocking_s": stat("blocking_s"),
        "total_s": stat("total_s"),
        "staging_wait_s": stat("staging_wait_s"),
        "previous_wait_s": stat("previous_wait_s"),
        "median_step_s": statistics.median(step_times),
        "checkpoint_gb_on_disk": raw["checkpoint_bytes_on_disk"] / 1e9,
        "checkpoint_folders": raw["checkpoint_folders"],
        "peak_memory_gib": {
            "allocated": raw["peak_allocated_bytes"] / 2**30, "reserved": raw["peak_reserved_bytes"] / 2**30
        },
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| mode | device x world | blocking s (first / median / max) | total s (first / median / max) | "
        "staging wait s (median) | waited for the previous save s (max) | step s (median) | on disk GB |",
        "|" + "---|" * 8,
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['error']} | | | | | | |")
            continue
        b, t = r["blocking_s"], r["total_s"]
        lines.append(
            f"| {r['mode']} | {r['device']} x {r['world_size']} | {_fmt(b['first'], '.2f')} / "
            f"{_fmt(b['median_after_first'], '.2f')} / {_fmt(b['max'], '.2f')} | {_fmt(t['first'], '.2f')} / "
            f"{_fmt(t['median_after_first'], '.2f')} / {_fmt(t['max'], '.2f')} | "
            f"{_fmt(r['staging_wait_s']['median_after_first'], '.3f')} | {_fmt(r['previous_wait_s']['max'], '.2f')} | "
            f"{_fmt(r['median_step_s'], '.3f')} | "
            f"{_fmt(r['checkpoint_gb_on_disk'], '.2f')} |"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated checkpoint.async_mode values (default all: {','.join(MODES)})")
    p.add_argument("--flavor", default="1B", help="model.flavor (default 1B)")
    p.add_argument("--seq-len", type=int, default=2048, help="training.seq_len (default 2048)")
    p.add_argument("--dtype", default="bfloat16", help="training.mixed_precision_param (default bfloat16)")
    p.add_argument("--saves", type=int, default=3, help="saves per mode (default 3)")
    p.add_argument("--interval", type=int, default=4, help="steps between saves (default 4)")
    p.add_argument("--ngpu", type=int, default=1, help="processes (GPUs) per run (default 1)")
    p.add_argument("--checkpoint-root", default=None,
                   help="where the checkpoints are written (default: the system temp folder)")
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench_checkpoint"), help="folder for the JSON and logs")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--raw-out", help=argparse.SUPPRESS)
    p.add_argument("--dump", help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*",
                   help="more trainer options, after --, e.g. -- --parallelism.data_parallel_shard_degree 2")
    return p


def leave_process_group() -> None:
    """The worker made its Trainer directly (not through train.py, which does this on exit): leave the group,
    or NCCL warns at exit that destroy_process_group() was never called (seen on an H200)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        p.error(f"--modes: {bad[0] if bad else '(empty)'!r} is not one of {', '.join(MODES)}")
    if a.saves < 2 or a.interval < 2:
        p.error("--saves and --interval must be >= 2 (the first save pays one-time costs; a step between saves)")

    if a.worker:
        try:
            run_worker(a)
        finally:
            leave_process_group()
        return 0

    out_dir = Path(a.out).resolve()  # the workers run from the repo root: pass them absolute paths
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    results: list[dict[str, Any]] = []
    for mode in modes:
        print(f"== checkpoint.async_mode={mode}: {a.flavor}, seq {a.seq_len}, {a.saves} saves every {a.interval} steps",
              flush=True)
        raw_out = out_dir / f"checkpoint_{mode}.raw.json"
        raw_out.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory(dir=a.checkpoint_root, prefix="bench_checkpoint_") as dump:
            cmd = [*_torchrun(a.ngpu), str(Path(__file__).resolve()), "--worker", "--mode", mode, "--raw-out",
                   str(raw_out), "--dump", dump, "--flavor", a.flavor, "--seq-len", str(a.seq_len), "--dtype", a.dtype,
                   "--saves", str(a.saves), "--interval", str(a.interval), "--", *a.extra]
            rc = _launch(cmd, env=env, log=out_dir / f"checkpoint_{mode}.log")
        if rc == 0:
            result = summarize(json.loads(raw_out.read_text()))
        else:
            result = {"mode": mode, "error": f"see {out_dir}/checkpoint_{mode}.log"}
        (out_dir / f"checkpoint_{mode}.json").write_text(json.dumps(result, indent=1))
        results.append(result)
        print(table(results[-1:]), flush=True)
    summary = {"flavor": a.flavor, "seq_len": a.seq_len, "runs": results, "table": table(results)}
    (out_dir / "checkpoint_summary.json").write_text(json.dumps(summary, indent=1))
    print("\n" + summary["table"])
    print(f"\nJSON: {out_dir}/checkpoint_<mode>.json and {out_dir}/checkpoint_summary.json")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
