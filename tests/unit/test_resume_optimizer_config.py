"""Optimizer hyperparameters of the config apply when a run resumes.

The checkpoint restores the optimizer's param_groups (lr, initial_lr, weight_decay, betas, eps) and
the LambdaLR's base_lrs; the trainer puts the config's back (Trainer._apply_optimizer_config), so
`--optimizer.lr X` on a resumed run trains at X, as config.toml records and as the divergence error's
advice ("lower optimizer.lr") assumes. (It once had no effect.)
"""

from __future__ import annotations

import pytest
import torch

from torchtitan_like.config.loader import load_config
from torchtitan_like.trainer import Trainer


def _argv(dump, *overrides: str) -> list[str]:
    return [
        "--job.config_file", "train_configs/debug_model.toml",
        "--job.dump_folder", str(dump),
        "--training.seq_len", "32",
        "--training.local_batch_size", "2",
        "--training.prefetch_batches", "0",
        "--metrics.no_enable_tensorboard",
        "--checkpoint.enable",
        "--checkpoint.interval", "1",
        "--checkpoint.no_last_save_model_only",
        "--lr_scheduler.warmup_steps", "0",
        "--lr_scheduler.decay_ratio", "0",  # constant lr: lr == optimizer.lr at every step
        *overrides,
    ]


def test_lowered_lr_and_weight_decay_apply_after_resume(tmp_path):
    first = Trainer(load_config(_argv(tmp_path, "--training.steps", "1")))
    try:
        first.train()
    finally:
        first.close()
    assert first.history[0]["lr"] == pytest.approx(3e-3)

    # The user lowers the lr (as the divergence error advises) and reruns: it resumes from step-1.
    second = Trainer(load_config(_argv(
        tmp_path, "--training.steps", "2", "--optimizer.lr", "1e-5", "--optimizer.weight_decay", "0.0",
    )))
    try:
        assert second.step == 1
        assert (tmp_path / "config.toml").read_text().count("lr = 1e-05") == 1  # what the run claims to use
        second.train()
    finally:
        second.close()
    group = second.optimizers[0].param_groups[0]
    assert second.history[-1]["lr"] == pytest.approx(1e-5)
    assert group["lr"] == pytest.approx(1e-5)
    assert group["weight_decay"] == 0.0


def test_a_new_lr_keeps_the_schedule_position(tmp_path, caplog):
    # 4 steps of warm-up in a 4-step run: lr factor (step + 1) / 5 for the 0-based steps 0..3.
    argv = (*_argv(tmp_path, "--lr_scheduler.warmup_steps", "4", "--training.steps", "4"),)
    first = Trainer(load_config([*argv, "--debug.fail_at_step", "3"]))  # dies at the start of step 3
    try:
        with pytest.raises(Exception, match="fail_at_step"):
            first.train()
    finally:
        first.close()
    assert [h["lr"] for h in first.history] == pytest.approx([3e-3 * 1 / 5, 3e-3 * 2 / 5])
    with caplog.at_level("WARNING", logger="torchtitan_like.trainer"):
        second = Trainer(load_config([*argv, "--optimizer.lr", "1e-3"]))
    try:
        assert second.step == 2
        second.train()
    finally:
        second.close()
    # Steps 3 and 4 at the new lr times the warm-up factor where the run left off.
    assert [h["lr"] for h in second.history] == pytest.approx([1e-3 * 3 / 5, 1e-3 * 4 / 5])
    assert "optimizer.lr 0.003 -> 0.001" in caplog.text


def test_an_unchanged_optimizer_config_resumes_without_a_warning(tmp_path, caplog):
    first = Trainer(load_config(_argv(tmp_path, "--training.steps", "1")))
    try:
        first.train()
    finally:
        first.close()
    with caplog.at_level("WARNING", logger="torchtitan_like.trainer"):
        second = Trainer(load_config(_argv(tmp_path, "--training.steps", "2")))
    second.close()
    assert second.step == 1 and "resumed with this config's optimizer settings" not in caplog.text
