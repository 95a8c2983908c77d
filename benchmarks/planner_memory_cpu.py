"""The planner's memory predictions against measured peaks of real training steps on CPU.

    python benchmarks/planner_memory_cpu.py [--json benchmarks/planner_memory_cpu.json]

Each case trains the real Trainer (one process, fp32, eager) for two steps under torch's
MemTracker (torch.distributed._tools.mem_tracker: it tracks every tensor's storage through a
dispatch mode, by category), and takes the peak of the second step (the optimizer state exists by
then). The planner predicts the same job (world 1, float32). Compared: the total without the
planner's fragmentation margin (a caching-allocator effect that CPU memory does not have), and the
activations (+ logits) item against MemTracker's activation + temporary categories.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = [
    # (flavor, activation_checkpoint mode, local batch, seq)
    ("debugmodel", "none", 8, 256),
    ("debugmodel", "full", 8, 256),
    ("debugmodel", "selective_op", 8, 256),
    ("debugmodel_w512", "none", 4, 512),
    ("debugmodel_w512", "full", 4, 512),
    ("debugmodel_w1024", "none", 4, 512),
    ("debugmodel_w1024", "selective_op", 4, 512),
]


def _argv(flavor: str, lbs: int, seq: int, dump: str) -> list[str]:
    return [
        "--job.config_file", str(ROOT / "train_configs" / "debug_model.toml"),
        "--job.dump_folder", dump,
        "--model.flavor", flavor,
        "--training.dataset", "synthetic",
        "--training.steps", "2",
        "--training.mixed_precision_param", "float32",
        "--metrics.no_enable_tensorboard",
        "--optimizer.implementation", "foreach",
    ]


def measure(flavor: str, ac: str, lbs: int, seq: int) -> dict:
    """Measured peak (MemTracker categories, bytes) and the planner's items for one case."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from torchtitan_like.config.loader import load_config
    from torchtitan_like.planner.hardware import load_profile
    from torchtitan_like.planner.layout import Layout, PlanInputs
    from torchtitan_like.planner.plan import predict_layout
    from torchtitan_like.trainer import Trainer

    layout = Layout(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, local_batch_size=lbs, microbatch_size=lbs, ac=ac)
    with tempfile.TemporaryDirectory() as dump:
        argv = _argv(flavor, lbs, seq, dump)
        inputs = PlanInputs(base_argv=tuple(argv), world_size=1, hardware=load_profile("H100"), seq_len=seq,
                            global_batch_size=lbs, compile=False)
        predicted = predict_layout(inputs, layout)
        trainer = Trainer(load_config(inputs.argv(layout)))
        tracker = MemTracker()
        tracker.track_external(*trainer.model_parts, *trainer.optimizers)
        first = trainer.train_step
        calls = []

        def step(batches):
            if calls:  # the second step: state exists; measure its peak only
                tracker.reset_mod_stats()
            calls.append(1)
            return first(batches)

        trainer.train_step = step
        try:
            with tracker:
                trainer.train()
        finally:
            trainer.close()
        peak = tracker.get_tracker_snapshot("peak")
    (by_cat,) = [v for k, v in peak.items() if str(k) == "cpu"]
    measured = {str(k).split(".")[-1].lower(): int(v) for k, v in by_cat.items()}
    items = predicted.memory.items()
    pred_total = items["total"] - items["margin"]
    pred_act = items["activations"] + max(items["logits"], items["recompute"])
    meas_act = measured.get("act", 0) + measured.get("temp", 0)
    return {
        "case": f"{flavor} ac={ac} lbs{lbs} seq{seq}",
        "measured": measured,
        "predicted": items,
        "total_error": round(pred_total / measured["total"] - 1, 4),
        "activation_error": round(pred_act / meas_act - 1, 4),
    }


def main() -> int:
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "planner_memory_cpu.json")
    args = ap.parse_args()
    results = []
    mib = 2**20
    print(f"{'case':<46} {'measured MiB':>12} {'predicted':>10} {'error':>7} {'act meas':>9} {'act pred':>9} {'error':>7}")
    for case in CASES:
        r = measure(*case)
        results.append(r)
        m, p = r["measured"], r["predicted"]
        print(f"{r['case']:<46} {m['total'] / mib:>12.1f} {(p['total'] - p['margin']) / mib:>10.1f} "
              f"{r['total_error']:>+7.1%} {(m.get('act', 0) + m.get('temp', 0)) / mib:>9.1f} "
              f"{(p['activations'] + max(p['logits'], p['recompute'])) / mib:>9.1f} {r['activation_error']:>+7.1%}")
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
