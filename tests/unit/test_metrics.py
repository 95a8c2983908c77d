"""MetricsLogger: arithmetic, console line, metrics.jsonl, TensorBoard, disabled ranks, summary."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from torchtitan_like.components.metrics import MetricsLogger, RemainingTime, cpu_memory, format_duration
from torchtitan_like.config.schema import Metrics

LOGGER = "torchtitan_like.components.metrics"
REQUIRED_KEYS = {"step", "loss", "grad_norm", "lr", "tps", "tflops", "mfu", "mem_gib", "mem_peak_rss_gib", "step_time",
                 "data_wait_pct"}
# 8192 tokens in 2 s over 4 steps at 1 GFLOP/token on a 10 TFLOPS device.
INTERVAL: dict[str, Any] = dict(loss=6.1234, grad_norm=1.234, lr=8e-4, tokens=8192, elapsed_s=2.0,
                                data_wait_s=0.1, steps=4)


def make_logger(tmp_path: Path, *, enabled: bool = True, tb: bool = False, peak: float | None = 1e13,
                device: torch.device = torch.device("cpu"), world_size: int = 1) -> MetricsLogger:
    cfg = Metrics(log_freq=1, enable_tensorboard=tb, save_tb_folder="tb")
    return MetricsLogger(cfg, str(tmp_path), enabled=enabled, flops_per_token=1e9, peak_flops_per_s=peak,
                         device=device, world_size=world_size)


def read_jsonl(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_arithmetic_and_jsonl_keys(tmp_path: Path) -> None:
    m = make_logger(tmp_path)
    out = m.log(10, **INTERVAL)
    assert out["tps"] == pytest.approx(4096.0)
    assert out["tflops"] == pytest.approx(4.096)  # 4096 tok/s x 1e9 FLOPs/tok
    assert out["mfu"] == pytest.approx(40.96)  # 4.096e12 / 1e13, in percent
    assert out["step_time"] == pytest.approx(0.5)
    assert out["data_wait_pct"] == pytest.approx(5.0)
    assert out["mem_gib"] > 0  # this process's RSS
    (row,) = read_jsonl(tmp_path)
    assert set(row) == REQUIRED_KEYS
    assert row == pytest.approx(out)
    m.close()


def test_jsonl_appends_one_line_per_log_with_extra_keys(tmp_path: Path) -> None:
    m = make_logger(tmp_path, peak=None)
    m.log(1, **INTERVAL)
    m.log(2, **INTERVAL, extra={"val_loss": 5.5})
    rows = read_jsonl(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["mfu"] is None  # no peak -> MFU n/a, stored as null
    assert set(rows[1]) == REQUIRED_KEYS | {"val_loss"} and rows[1]["val_loss"] == 5.5


def test_extra_cannot_overwrite_builtin_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="loss"):
        make_logger(tmp_path).log(1, **INTERVAL, extra={"loss": 1.0})


def test_console_line_has_every_field(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        make_logger(tmp_path, peak=None).log(10, **INTERVAL)
    (record,) = caplog.records
    line = record.getMessage()
    assert line.startswith("step:   10  loss:  6.1234  grad_norm:  1.234  lr: 8.00e-04  tps: 4,096  tflops: 4.10")
    for field in ("mfu: n/a", "mem: ", "GiB rss", "step_time: 0.500s", "data_wait: 5.0%"):
        assert field in line


def test_remaining_time_shows_when_given(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    m = make_logger(tmp_path)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        m.log(1, **INTERVAL)
        m.log(2, **INTERVAL, eta_s=10800.0)
    first, second = (r.getMessage() for r in caplog.records)
    assert " eta:" not in first and second.endswith("  eta: 3.0 hours")
    rows = read_jsonl(tmp_path)
    assert "eta_s" not in rows[0] and rows[1]["eta_s"] == 10800.0


def test_remaining_time_is_the_pace_since_the_first_log_times_the_steps_left() -> None:
    eta = RemainingTime(last_step=100)
    assert eta.at(50.0, 10) is None  # the first log: its interval holds the compile
    assert eta.at(70.0, 20) == pytest.approx(2.0 * 80)  # 20 s for 10 steps, 80 steps left
    assert eta.at(150.0, 30) == pytest.approx(5.0 * 70)  # a slow interval (a checkpoint save) raises the pace
    assert eta.at(500.0, 100) is None  # nothing left


def test_console_mfu_percent_when_peak_known(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        make_logger(tmp_path).log(1, **INTERVAL)
    assert "mfu: 40.96%" in caplog.text


def test_nan_loss_does_not_break_logging(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = make_logger(tmp_path, tb=True).log(3, **{**INTERVAL, "loss": float("nan"), "grad_norm": math.inf})
    assert math.isnan(out["loss"])
    assert "loss:     nan" in caplog.text and "grad_norm:    inf" in caplog.text
    (row,) = read_jsonl(tmp_path)  # strict JSON: non-finite values become null
    assert row["loss"] is None and row["grad_norm"] is None


def test_tensorboard_scalars_read_back(tmp_path: Path) -> None:
    m = make_logger(tmp_path, tb=True)
    for step, loss in [(10, 6.0), (20, 5.0), (30, 4.5)]:
        m.log(step, **{**INTERVAL, "loss": loss}, extra={"val/loss": loss + 1})
    m.close()
    m.close()  # idempotent
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    losses = acc.Scalars("loss/global_avg")
    assert [e.step for e in losses] == [10, 20, 30]
    assert [e.value for e in losses] == pytest.approx([6.0, 5.0, 4.5])
    tags = set(acc.Tags()["scalars"])
    assert {"grad_norm", "lr", "throughput/tps", "throughput/tflops", "throughput/mfu_pct", "memory/gib",
            "time/step_s", "time/data_wait_pct", "val/loss"} <= tags
    assert acc.Scalars("throughput/mfu_pct")[0].value == pytest.approx(40.96)


def test_tensorboard_off_writes_no_events(tmp_path: Path) -> None:
    make_logger(tmp_path, tb=False).log(1, **INTERVAL)
    assert not (tmp_path / "tb").exists()
    assert (tmp_path / "metrics.jsonl").exists()


def test_disabled_rank_computes_but_writes_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dump = tmp_path / "dump"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        m = make_logger(dump, enabled=False, tb=True)
        out = m.log(1, **INTERVAL)
        m.summary(10**6, 10.0)
        m.close()
    assert out["tps"] == pytest.approx(4096.0)
    assert not dump.exists()
    assert caplog.records == []


def test_gpu_memory_peaks_are_reported_and_reset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gib = 1024**3
    resets: list[torch.device] = []
    stats = {"active_bytes.all.peak": int(12.3 * gib), "reserved_bytes.all.peak": 14 * gib}
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: stats)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))
    cuda0 = torch.device("cuda", 0)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = make_logger(tmp_path, device=cuda0).log(1, **INTERVAL)
    assert "mem: 12.3GiB active / 14.0GiB reserved" in caplog.text
    assert out["mem_gib"] == pytest.approx(12.3)
    assert out["mem_reserved_gib"] == pytest.approx(14.0) and "mem_peak_rss_gib" not in out
    assert resets == [cuda0]


def test_cpu_memory_reads_rss() -> None:
    mem = cpu_memory()
    assert mem.kind == "cpu"
    assert 0 < mem.primary_gib <= mem.secondary_gib  # current RSS never exceeds the high-water mark


def test_summary_estimates_time_to_train(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    m = make_logger(tmp_path, world_size=2)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        result = m.summary(10**6, 10.0)
    assert result["global_tps"] == pytest.approx(1e5)
    assert result["time_to_train_s"] == pytest.approx({"1B": 1e4, "100B": 1e6, "1T": 1e7})
    (record,) = caplog.records
    line = record.getMessage()
    assert "100,000 tokens/s global" in line and "50,000 per device" in line and "2 device(s)" in line
    assert "1B tokens: 2.8 hours" in line and "100B tokens: 11.6 days" in line and "1T tokens: 115.7 days" in line


def test_summary_of_an_empty_run(tmp_path: Path) -> None:
    result = make_logger(tmp_path).summary(0, 0.0)
    assert result["global_tps"] == 0.0 and result["time_to_train_s"]["1T"] == math.inf


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(42.0, "42.0 s"), (600.0, "10.0 min"), (3 * 3600.0, "3.0 hours"), (10 * 86400.0, "10.0 days"),
     (3 * 365 * 86400.0, "3.0 years"), (math.inf, "n/a")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_saving_a_checkpoint_is_not_counted_as_training_time(tmp_path: Path, monkeypatch, caplog) -> None:
    """A save's time was charged to the next step: its step_time, tps and MFU dipped after every save. Each
    save here takes 1000 s on the trainer's clock: no row's step_time holds it, the summary names it apart,
    and the remaining time (wall clock: saves ahead will take as long) counts it."""
    import time as real_time
    import types

    from feature_runs import train
    from torchtitan_like import trainer as trainer_module
    from torchtitan_like.components.checkpoint import CheckpointManager

    offset = [0.0]
    clock = types.SimpleNamespace(**{k: getattr(real_time, k) for k in dir(real_time) if not k.startswith("_")})
    clock.perf_counter = lambda: real_time.perf_counter() + offset[0]
    monkeypatch.setattr(trainer_module, "time", clock)
    save = CheckpointManager.maybe_save

    def slow_save(self, step, **kw):
        saved = save(self, step, **kw)
        if step % 2 == 0:
            offset[0] += 1000.0
        return saved

    monkeypatch.setattr(CheckpointManager, "maybe_save", slow_save)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        train(tmp_path, "--training.steps", "6", "--metrics.log_freq", "1", "--checkpoint.enable",
              "--checkpoint.interval", "2")
    rows = read_jsonl(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["step_time"] < 100 for r in rows), [r["step_time"] for r in rows]
    # At step 4's line: step 2's save (1000 s) in the 3 steps since the first line; 2 steps left.
    assert rows[3]["eta_s"] == pytest.approx(1000 / 3 * 2, rel=0.01)
    (summary,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("summary:")]
    assert "(plus 50.0 min saving checkpoints)" in summary  # 3 saves of 1000 s (steps 2, 4 and the last, 6)
