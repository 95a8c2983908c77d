"""Per-step metrics: one console line, TensorBoard scalars and metrics.jsonl, plus the end-of-run summary."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch

from torchtitan_like.config.schema import Metrics

logger = logging.getLogger(__name__)

_GIB = 1024**3

DROPPED_JSONL = "metrics.dropped.jsonl"
"""Where drop_after keeps the rows it takes out of metrics.jsonl (appended, attempt after attempt)."""
# Token budgets for the "time to train" estimates in the end-of-run summary.
_SUMMARY_BUDGETS: tuple[tuple[str, int], ...] = (("1B", 10**9), ("100B", 10**11), ("1T", 10**12))


@dataclass(frozen=True)
class MemoryStats:
    """Memory of this device: GPU peaks since the last log (active, reserved), or CPU RSS (current, and the
    process's peak since it started)."""

    kind: Literal["cuda", "cpu"]
    """Which device the numbers describe."""
    primary_gib: float
    """GPU: peak active GiB. CPU: current RSS GiB."""
    secondary_gib: float
    """GPU: peak reserved GiB. CPU: peak RSS (VmHWM, since the process started) GiB."""

    def console(self) -> str:
        """The `mem:` field of the console line."""
        if self.kind == "cuda":
            return f"{self.primary_gib:.1f}GiB active / {self.secondary_gib:.1f}GiB reserved"
        return f"{self.primary_gib:.2f}GiB rss"

    def scalars(self) -> dict[str, float]:
        """TensorBoard tags for this sample."""
        second = "memory/reserved_gib" if self.kind == "cuda" else "memory/peak_rss_gib"
        return {"memory/gib": self.primary_gib, second: self.secondary_gib}

    @property
    def secondary_key(self) -> str:
        """The metrics.jsonl key of secondary_gib."""
        return "mem_reserved_gib" if self.kind == "cuda" else "mem_peak_rss_gib"


def _proc_status_bytes(field: str) -> int | None:
    """A `kB` field of /proc/self/status in bytes (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_memory() -> MemoryStats:
    """Current and peak resident set size of this process."""
    peak = _proc_status_bytes("VmHWM")
    if peak is None:
        # ru_maxrss is KiB on Linux but bytes on macOS.
        unit = 1 if sys.platform == "darwin" else 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
    current = _proc_status_bytes("VmRSS")
    # Without /proc there is no portable current RSS in the standard library; the peak is an upper bound.
    current = peak if current is None else current
    return MemoryStats("cpu", current / _GIB, peak / _GIB)


def cuda_memory(device: torch.device) -> MemoryStats:
    """Peak active and reserved GiB since the last reset, then reset the peaks for the next interval."""
    stats = torch.cuda.memory_stats(device)
    active = stats.get("active_bytes.all.peak", 0)
    reserved = stats.get("reserved_bytes.all.peak", 0)
    torch.cuda.reset_peak_memory_stats(device)
    return MemoryStats("cuda", active / _GIB, reserved / _GIB)


def device_memory(device: torch.device) -> MemoryStats:
    """Memory sample for `device` (resets the GPU peaks)."""
    return cuda_memory(device) if device.type == "cuda" else cpu_memory()


def format_duration(seconds: float) -> str:
    """Human-readable duration: seconds, minutes, hours, days or years."""
    if not math.isfinite(seconds):
        return "n/a"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} hours"
    if seconds < 2 * 365 * 86400:
        return f"{seconds / 86400:.1f} days"
    return f"{seconds / (365 * 86400):.1f} years"


def _ratio(num: float, den: float) -> float:
    """num / den, 0 when den is not positive (an empty interval must not crash logging)."""
    return num / den if den > 0 else 0.0


def _json_safe(value: Any) -> Any:
    """NaN/inf become null: metrics.jsonl stays strict JSON (jq, pandas, JavaScript can read it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RemainingTime:
    """The wall-clock time a run still needs, from its average pace since its first log: compile and
    warm-up come before that point, and the checkpoints and validations since then are counted, as those
    ahead will be."""

    def __init__(self, last_step: int) -> None:
        self.last_step = last_step
        self._since: tuple[float, int] | None = None

    def at(self, now: float, step: int) -> float | None:
        """Seconds left after `step`, at time `now` (seconds, any clock); None at the first call (no pace
        yet) and at the last step."""
        if self._since is None:
            self._since = (now, step)
            return None
        t0, step0 = self._since
        if step >= self.last_step or step <= step0:
            return None
        return (now - t0) / (step - step0) * (self.last_step - step)


class MetricsLogger:
    """Computes the per-step metrics on every rank; the enabled rank prints them and writes TB + metrics.jsonl."""

    def __init__(
        self,
        cfg: Metrics,
        dump_folder: str,
        *,
        enabled: bool,
        flops_per_token: float,
        peak_flops_per_s: float | None,
        device: torch.device,
        world_size: int,
    ) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.flops_per_token = flops_per_token
        self.peak_flops_per_s = peak_flops_per_s
        self.device = device
        self.world_size = world_size
        self.jsonl_path = os.path.join(dump_folder, "metrics.jsonl")
        self._writer = None
        if enabled:
            os.makedirs(dump_folder, exist_ok=True)
            if cfg.enable_tensorboard:
                self._writer = self._open_tensorboard(os.path.join(dump_folder, cfg.save_tb_folder))

    @staticmethod
    def _open_tensorboard(log_dir: str, purge_step: int | None = None) -> Any:
        """A SummaryWriter under log_dir (imported here: only the writing rank pays for the import).
        purge_step: TensorBoard hides the events of earlier event files from that step on."""
        from torch.utils.tensorboard import SummaryWriter

        if purge_step is None:
            logger.info("TensorBoard events go to %s", log_dir)
        return SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def log(
        self,
        step: int,
        *,
        loss: float,
        grad_norm: float,
        lr: float,
        tokens: int,
        elapsed_s: float,
        data_wait_s: float,
        steps: int,
        extra: dict[str, float] | None = None,
        eta_s: float | None = None,
    ) -> dict[str, Any]:
        """Compute, print and record the metrics of the interval ending at `step`; returns the record.

        `tokens` is what this device processed since the last log (the trainer divides the global tokens by
        the world size, so tps x flops_per_token is this device's share of the work); `elapsed_s` leaves out
        the time spent validating and saving checkpoints.
        `eta_s`: the wall-clock seconds the run still needs, when the trainer has an estimate (recorded
        as eta_s, shown as eta).
        """
        extra = extra or {}
        tps = _ratio(tokens, elapsed_s)
        achieved = tps * self.flops_per_token
        mfu = None if self.peak_flops_per_s is None else 100.0 * achieved / self.peak_flops_per_s
        mem = device_memory(self.device)
        record: dict[str, Any] = {
            "step": step,
            "loss": float(loss),
            "grad_norm": float(grad_norm),
            "lr": float(lr),
            "tps": tps,
            "tflops": achieved / 1e12,
            "mfu": mfu,
            "mem_gib": mem.primary_gib,
            mem.secondary_key: mem.secondary_gib,
            "step_time": _ratio(elapsed_s, steps),
            "data_wait_pct": 100.0 * _ratio(data_wait_s, elapsed_s),
        }
        clash = set(record) & set(extra)
        if clash:
            raise ValueError(f"extra metrics {sorted(clash)} would overwrite the built-in keys of the same name")
        record.update(extra)
        if eta_s is not None:
            record["eta_s"] = eta_s
        if self.enabled:
            logger.info("%s", self._console_line(record, mem, extra))
            self._write_jsonl(record)
            self._write_tensorboard(record, mem, extra)
        return record

    def log_validation(self, step: int, values: dict[str, float], *, seconds: float) -> dict[str, Any]:
        """A row of validation alone (val_loss, val_ppl) for `step`, with no training interval: a loaded
        checkpoint's evaluation. Returns the record."""
        record: dict[str, Any] = {"step": step, **values, "validation_s": seconds}
        if self.enabled:
            logger.info("step: %4d  (evaluated, not trained)%s  validation_s: %.2f", step,
                        "".join(f"  {k}: {v:.4g}" for k, v in values.items()), seconds)
            self._write_jsonl(record)
            if self._writer is not None:
                for tag, value in values.items():
                    self._writer.add_scalar(tag, value, step)
                self._writer.flush()
        return record

    @staticmethod
    def _console_line(r: dict[str, Any], mem: MemoryStats, extra: dict[str, float]) -> str:
        """The one log line per step (NaN/inf format as nan/inf)."""
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.2f}%"
        line = (
            f"step: {r['step']:4d}  loss: {r['loss']:7.4f}  grad_norm: {r['grad_norm']:6.3f}  "
            f"lr: {r['lr']:.2e}  tps: {r['tps']:,.0f}  tflops: {r['tflops']:.2f}  mfu: {mfu}  "
            f"mem: {mem.console()}  step_time: {r['step_time']:.3f}s  data_wait: {r['data_wait_pct']:.1f}%"
        )
        line += "".join(f"  {k}: {v:.4g}" for k, v in extra.items())
        return line + (f"  eta: {format_duration(r['eta_s'])}" if "eta_s" in r else "")

    def _write_jsonl(self, record: dict[str, Any]) -> None:
        """Append one line and close the file, so a crash right after loses nothing."""
        line = json.dumps({k: _json_safe(v) for k, v in record.items()}, allow_nan=False)
        with open(self.jsonl_path, "a") as f:
            f.write(line + "\n")

    def _write_tensorboard(self, r: dict[str, Any], mem: MemoryStats, extra: dict[str, float]) -> None:
        """Scalars for this step; extra keys are used as tags as given."""
        if self._writer is None:
            return
        scalars = {
            "loss/global_avg": r["loss"],
            "grad_norm": r["grad_norm"],
            "lr": r["lr"],
            "throughput/tps": r["tps"],
            "throughput/tflops": r["tflops"],
            "time/step_s": r["step_time"],
            "time/data_wait_pct": r["data_wait_pct"],
            **mem.scalars(),
            **extra,
        }
        if r["mfu"] is not None:
            scalars["throughput/mfu_pct"] = r["mfu"]
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, r["step"])
        self._writer.flush()

    def drop_after(self, step: int) -> int:
        """Move metrics.jsonl rows of steps after `step` (the step a run resumes from) to the end of
        metrics.dropped.jsonl; returns how many.

        A run that died after logging steps its last checkpoint does not hold would otherwise list
        those steps twice once it resumes: the file keeps one row per step of the resumed timeline.
        TensorBoard's event files are append-only: the writer is reopened with purge_step, so its
        reader drops the earlier files' events after `step` in the same way.
        """
        if not self.enabled:
            return 0
        if self._writer is not None:
            log_dir = self._writer.log_dir
            self._writer.close()
            self._writer = self._open_tensorboard(log_dir, purge_step=step + 1)
        if not os.path.exists(self.jsonl_path):
            return 0
        with open(self.jsonl_path) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        kept = [line for line in lines if _step_of(line) <= step]
        dropped = len(lines) - len(kept)
        if dropped:
            # Kept aside, not deleted: they may be a whole earlier run's (a folder reused without checkpoints).
            aside = os.path.join(os.path.dirname(self.jsonl_path), DROPPED_JSONL)
            with open(aside, "a") as f:
                f.write("".join(line + "\n" for line in lines if _step_of(line) > step))
                f.flush()
                os.fsync(f.fileno())
            tmp = self.jsonl_path + ".tmp"
            with open(tmp, "w") as f:
                f.write("".join(line + "\n" for line in kept))
            os.replace(tmp, self.jsonl_path)
            logger.info(
                "metrics.jsonl: %d row(s) after step %d, of an earlier attempt past the step this run starts from, "
                "moved to %s", dropped, step, aside,
            )
        return dropped

    def summary(self, total_tokens_seen_global: int, elapsed_s: float, *, validation_s: float = 0.0,
                saving_s: float = 0.0) -> dict[str, Any]:
        """Log the run's global tokens/s and how long 1B / 100B / 1T tokens would take at that rate.
        elapsed_s: the training time (validation_s and saving_s, the time spent validating and saving
        checkpoints, are left out of it and named)."""
        global_tps = _ratio(total_tokens_seen_global, elapsed_s)
        etas = {name: budget / global_tps if global_tps > 0 else math.inf for name, budget in _SUMMARY_BUDGETS}
        result = {"global_tps": global_tps, "world_size": self.world_size, "time_to_train_s": etas}
        if self.enabled:
            eta_text = ", ".join(f"{name} tokens: {format_duration(s)}" for name, s in etas.items())
            besides = [f"{format_duration(t)} {what}" for t, what in ((validation_s, "validating"),
                                                                   (saving_s, "saving checkpoints")) if t > 0]
            validating = f" (plus {' and '.join(besides)})" if besides else ""
            logger.info(
                "summary: %s tokens in %s%s on %d device(s) = %s tokens/s global (%s per device); "
                "time to train at this rate: %s",
                f"{total_tokens_seen_global:,}", format_duration(elapsed_s), validating, self.world_size,
                f"{global_tps:,.0f}", f"{_ratio(global_tps, self.world_size):,.0f}", eta_text,
            )
        return result

    def close(self) -> None:
        """Flush and close the TensorBoard writer (safe to call twice)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl row; a row cut off by a crash (not JSON) counts as after any step."""
    try:
        row = json.loads(line)
    except ValueError:
        return math.inf
    return row.get("step", 0) if isinstance(row, dict) else math.inf
