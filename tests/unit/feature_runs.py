"""Short in-process Trainer runs of the debug model, for the float8 / AC / compile tests.

Every run is the debugmodel flavor cut to 2 blocks (model.n_layers) in fp32 on CPU, 20 steps of 2 x 32 tokens from the
embedded corpus, deterministic algorithms on. `train(tmp_path, *overrides)` returns the Trainer
after training (history, model_parts, dump folder); `baseline_losses()` / `baseline_grad_norms()` are
plain eager fp32 with no overrides, computed once per test session.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from torchtitan_like.config.loader import load_config
from torchtitan_like.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
STEPS = 20


def argv(dump: Path, *overrides: str) -> list[str]:
    return [
        "--job.config_file", str(ROOT / "train_configs/debug_model.toml"),
        "--job.dump_folder", str(dump),
        "--model.n_layers", "2",  # per-block passes still see more than one block; a third of the CPU time
        "--training.seq_len", "32",
        "--training.local_batch_size", "2",
        "--training.steps", str(STEPS),
        "--lr_scheduler.warmup_steps", "2",
        "--metrics.no_enable_tensorboard",
        "--metrics.log_freq", "10",
        "--debug.deterministic",
        *overrides,
    ]


def train(dump: Path, *overrides: str) -> Trainer:
    """Train for STEPS steps and close; the Trainer keeps its history and model for inspection."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    trainer = Trainer(load_config(argv(dump, *overrides)))
    try:
        trainer.train()
    finally:
        trainer.close()
        torch.use_deterministic_algorithms(deterministic)
    return trainer


def losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.history]


def grad_norms(trainer: Trainer) -> list[float]:
    """Each step's gradient norm before clipping. Compare these too: the debug model's norm is above
    max_norm at every step, and under clipping + AdamW a gradient off by a constant factor trains
    exactly the same (losses and weights cannot show it)."""
    return [h["grad_norm"] for h in trainer.history]


@functools.cache
def _baseline() -> tuple[tuple[float, ...], tuple[float, ...]]:
    with tempfile.TemporaryDirectory() as d:
        trainer = train(Path(d))
        return tuple(losses(trainer)), tuple(grad_norms(trainer))


def baseline_losses() -> tuple[float, ...]:
    """Plain eager fp32, no converters, no AC, no compile."""
    return _baseline()[0]


def baseline_grad_norms() -> tuple[float, ...]:
    """The same run's gradient norms."""
    return _baseline()[1]
