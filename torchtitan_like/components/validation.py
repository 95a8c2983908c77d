"""[validation]: the loss and perplexity on held-out data, every `freq` steps, under any parallel layout.

The validation data has its own dataset and iterator, restarted from the beginning at every
validation: the training loader, its position and its checkpointed state are never touched. Global
batches are dealt out to data-parallel ranks exactly as in training (layout-independent), each rank
sums the token losses of its slice, and the sum and the token count are all-reduced over the loss
group (dp x cp): val_loss = total token loss / total tokens, the same number as one process gets.
The model runs under `torch.no_grad()` in eval mode, and each model part gets its mode back after.
Under context parallel each cp rank takes its shards of the sequences, as in training (ring
attention), so a sequence length that needs CP to fit in training fits in validation too; with
`training.loss_chunk_size` the loss is chunked over the sequence as in training, so the full logits
of a long sequence never exist at once.
Under pipeline parallel the batches go through the training schedule forward only (`eval()`), the
last stage's rank sums the token losses and the sums are all-reduced over the pp group first.

Held-out sources: `embedded` reads the standard library's own tests and tools (test/, idlelib/,
lib2to3/, turtledemo/, whichever this Python has), which the training corpus leaves out;
`synthetic` draws random tokens from another seed; `local` and `hf` read what they name.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import IterableDataset

from torchtitan_like.components.loss import IGNORE_INDEX, mask_after_eos, model_token_loss
from torchtitan_like.components.tokenizer import Tokenizer
from torchtitan_like.config.schema import Training, Validation
from torchtitan_like.config.validate import resolve_global_batch
from torchtitan_like.data.dataset import BatchLayout, PackedDataset, SyntheticDataset
from torchtitan_like.data.indexed import IndexedDataset, IndexedTokens
from torchtitan_like.data.sources import EMBEDDED_EXCLUDED_DIRS, DocumentSource, HFSource, LocalSource
from torchtitan_like.distributed.pipeline import Pipeline, schedule_switches_modes
from torchtitan_like.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

HELD_OUT_DIRS = tuple(sorted(EMBEDDED_EXCLUDED_DIRS - {"site-packages", "__pycache__"}))
"""Standard-library folders the embedded training corpus skips: the embedded validation set."""
PROGRESS_EVERY_S = 60.0
"""A long validation logs how far it got this often (the whole held-out embedded set takes minutes on a CPU)."""
SYNTHETIC_SEED_OFFSET = 1_000_003
"""Synthetic validation tokens come from seed + this, so they are not the training samples."""


class HeldOutEmbeddedSource:
    """The .py files under the standard library's HELD_OUT_DIRS, in one fixed (seeded) order."""

    label = "validation.dataset='embedded'"
    BYTES_PER_TOKEN = 2.7
    """Measured with the embedded tokenizer on these files (Llama 3's larger vocabulary packs more)."""

    def __init__(self, seed: int) -> None:
        self.root = Path(sysconfig.get_paths()["stdlib"])
        files = []
        for name in HELD_OUT_DIRS:
            folder = self.root / name
            if folder.is_dir():
                files.extend(p.relative_to(self.root).as_posix() for p in folder.rglob("*.py"))
        if not files:
            raise DataError(
                f"validation.dataset = 'embedded' reads the standard library's {', '.join(HELD_OUT_DIRS)} folders, "
                f"and this Python has none of them under {self.root}: use validation.dataset = 'local' or 'synthetic'"
            )
        self.files = sorted(files)
        random.Random(seed).shuffle(self.files)

    def documents(self, epoch: int, start: int) -> Iterator[str]:
        for rel in self.files[start:]:
            try:
                yield (self.root / rel).read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                yield ""

    def total_bytes(self) -> int:
        return sum((self.root / rel).stat().st_size for rel in self.files)


def build_validation_source(cfg: Validation, *, text_field: str, seed: int) -> DocumentSource:
    if cfg.dataset == "embedded":
        return HeldOutEmbeddedSource(seed)
    if not cfg.dataset_path:
        raise ConfigError(f"validation.dataset = {cfg.dataset!r} needs validation.dataset_path")
    if cfg.dataset == "local":
        return LocalSource(cfg.dataset_path, text_field, section="validation")
    if cfg.dataset == "hf":
        return HFSource(cfg.dataset_path, cfg.dataset_split, text_field, config=cfg.dataset_config, section="validation")
    raise ConfigError(f"validation.dataset = {cfg.dataset!r} has no document source")


def build_validation_dataset(
    cfg: Validation,
    *,
    tokenizer: Tokenizer | None,
    vocab_size: int,
    text_field: str,
    dp_rank: int,
    dp_degree: int,
    seed: int,
) -> IterableDataset:
    """Finite (except synthetic) dataset of this DP rank's (local_batch_size, seq_len) microbatches of
    global batches of validation_global_batch(cfg, dp_degree) sequences."""
    layout = BatchLayout(
        global_batch_size=validation_global_batch(cfg, dp_degree),
        local_batch_size=cfg.local_batch_size,
        dp_rank=dp_rank,
        dp_degree=dp_degree,
    )
    if cfg.dataset == "synthetic":
        return SyntheticDataset(seed=seed + SYNTHETIC_SEED_OFFSET, seq_len=cfg.seq_len, vocab_size=vocab_size, layout=layout)
    if cfg.dataset == "indexed":
        assert cfg.dataset_path  # (config validation)
        tokens = IndexedTokens(cfg.dataset_path, section="validation")
        return IndexedDataset(sources=[tokens], seq_len=cfg.seq_len, layout=layout, infinite=False,
                              vocab_size=vocab_size, tokenizer=tokenizer)
    assert tokenizer is not None, f"validation.dataset={cfg.dataset!r} needs a tokenizer"
    source = build_validation_source(cfg, text_field=text_field, seed=seed)
    return PackedDataset(source=source, tokenizer=tokenizer, seq_len=cfg.seq_len, layout=layout, infinite=False)


def validation_global_batch(cfg: Validation, dp_degree: int, *, pp: int = 1) -> int:
    """validation.global_batch_size resolved (-1 = local_batch_size x dp_degree) and checked: a whole
    number of microbatches of local_batch_size on every data-parallel rank (pp: the pipeline degree,
    under which local_batch_size is training's and not a fix to offer)."""
    return resolve_global_batch("validation", cfg.local_batch_size, cfg.global_batch_size, dp_degree, offer_local=pp == 1)


def check_layout(
    cfg: Validation, *, tp: int, cp: int, pp: int = 1, dp: int = 1, training: Training | None = None
) -> None:
    """validation.seq_len obeys the rule training.seq_len does under tensor / context parallel, and
    under CP equals it (CP shards the RoPE table, which covers exactly one training sequence, along
    with each sequence). Under pipeline parallel the held-out batches go through the training
    schedule, forward only: they must have the training batches' shape, and torch's schedules must be
    able to switch modes."""
    if cp > 1 and training is not None and cfg.seq_len != training.seq_len:
        raise ConfigError(
            f"validation.seq_len={cfg.seq_len} must equal training.seq_len={training.seq_len} with "
            f"parallelism.context_parallel_degree={cp}: validation runs under CP as training does, and CP "
            f"shards the RoPE table (one training sequence long) with each sequence; set validation.seq_len="
            f"{training.seq_len}"
        )
    if pp > 1:
        where = f"validation.enable=true with parallelism.pipeline_parallel_degree={pp}"
        if not schedule_switches_modes():
            raise ConfigError(
                f"{where} needs pipeline schedules that switch between training and forward-only steps, which torch "
                f"{torch.__version__} lacks (torch 2.12 and later have them): set validation.enable=false, or "
                f"validate the checkpoints in a separate run without pipeline parallel"
            )
        if training is not None and (cfg.seq_len, cfg.local_batch_size) != (training.seq_len, training.local_batch_size):
            raise ConfigError(
                f"{where}: validation.seq_len={cfg.seq_len} and validation.local_batch_size={cfg.local_batch_size} "
                f"must equal training.seq_len={training.seq_len} and training.local_batch_size="
                f"{training.local_batch_size} (the pipeline stages exchange activations of one microbatch shape)"
            )
    validation_global_batch(cfg, dp, pp=pp)
    unit = tp * 2 * cp
    if (tp > 1 or cp > 1) and cfg.seq_len % unit:
        raise ConfigError(
            f"validation.seq_len={cfg.seq_len} must be divisible by tensor_parallel_degree({tp}) x 2 x "
            f"context_parallel_degree({cp}) = {unit}; try {-(-cfg.seq_len // unit) * unit}"
        )


class Validator:
    """Runs validation every `cfg.freq` steps; `validate()` returns {"val_loss", "val_ppl"} on every rank."""

    def __init__(
        self,
        cfg: Validation,
        dataset: IterableDataset,
        *,
        device: torch.device,
        loss_group: dist.ProcessGroup | None,
        loss_context: Callable[[], contextlib.AbstractContextManager],
        amp_context: Callable[[], contextlib.AbstractContextManager],
        cp_context: Callable[[torch.Tensor, torch.Tensor], contextlib.AbstractContextManager] | None = None,
        loss_chunk_size: int = 0,
        loss_mask_eos: int | None = None,
        stop_requested: Callable[[], bool] | None = None,
    ) -> None:
        """cp_context(inputs, labels): the training step's context parallel context, which leaves both
        tensors as this rank's sequence shards; None without CP. loss_chunk_size: training's (0 = off).
        loss_mask_eos: the eos id whose next position the loss leaves out (training.eod_mask_loss), or None.
        stop_requested: a collective every rank calls after each global batch (the pre-emption check);
        True ends the validation there, without a result, so a signal is not kept waiting for a long
        validation (the launcher kills workers that do not stop within its shutdown timeout)."""
        self.cfg = cfg
        self.dataset = dataset
        self.device = device
        self.loss_group = loss_group
        self.loss_context = loss_context
        self.amp_context = amp_context
        self.cp_context = cp_context or (lambda inputs, labels: contextlib.nullcontext())
        self.loss_chunk_size = loss_chunk_size
        self.loss_mask_eos = loss_mask_eos
        self.stop_requested = stop_requested
        # Global batches are read as microbatches of local_batch_size on each data-parallel rank (a plain
        # iterable without a BatchLayout yields whole global batches of local_batch_size).
        layout = getattr(dataset, "layout", None)
        self.global_batch_size = cfg.local_batch_size if layout is None else layout.global_batch_size
        self.microbatches_per_batch = (
            1 if layout is None else layout.global_batch_size // (layout.local_batch_size * layout.dp_degree)
        )
        self.pipeline: Pipeline | None = None
        self.pp_group: dist.ProcessGroup | None = None
        self._warned_short = False

    def use_pipeline(self, pipeline: Pipeline, pp_group: dist.ProcessGroup) -> None:
        """Validate through the training schedule, forward only (the pipeline is built after the data)."""
        self.pipeline, self.pp_group = pipeline, pp_group

    def should_run(self, step: int) -> bool:
        return step % self.cfg.freq == 0

    def check_data(self) -> None:
        """Raise DataError now, at start-up, if the held-out data has less than one global batch (it would
        otherwise surface at the first validation, validation.freq steps into the run). Reads one batch."""
        if next(iter(self.dataset), None) is None:
            raise DataError(self._too_small())

    def _too_small(self) -> str:
        return (
            f"validation: the {self.cfg.dataset} dataset holds less than one global batch of "
            f"{self.global_batch_size} sequences of {self.cfg.seq_len + 1} tokens: lower "
            f"validation.global_batch_size, validation.local_batch_size or validation.seq_len, or use more data"
        )

    def validate(self, model_parts: Sequence[nn.Module], *, interruptible: bool = True) -> dict[str, float]:
        """Held-out loss (mean over every token of every global batch taken) and perplexity; {} when a
        pre-emption signal ended it early (see stop_requested; never when not `interruptible`)."""
        t0 = time.perf_counter()
        modes = [m.training for m in model_parts]
        for m in model_parts:
            m.eval()
        try:
            with torch.no_grad():
                totals, batches = self._token_loss_sums(model_parts, t0, interruptible=interruptible)
        finally:
            for m, mode in zip(model_parts, modes, strict=True):
                m.train(mode)
        if totals is None:
            logger.warning(
                "validation: stopped after %d global batches (%.0f s) for a pre-emption signal; no val_loss this step",
                batches, time.perf_counter() - t0,
            )
            return {}
        loss_sum, n_tokens = totals.tolist()
        if n_tokens == 0:
            raise DataError(self._too_small())
        if 0 < batches < self.cfg.steps and not self._warned_short:
            self._warned_short = True
            logger.warning(
                "validation.steps=%d, but the %s dataset holds only %d global batches: each validation uses those "
                "%d (set validation.steps=-1 to say so, or use more data)",
                self.cfg.steps, self.cfg.dataset, batches, batches,
            )
        loss = loss_sum / n_tokens
        ppl = math.inf if loss >= 700 else math.exp(loss)  # exp overflows a float past ~709; NaN stays NaN
        logger.info(
            "validation: loss %.4f, perplexity %.2f over %d batches (%d tokens) in %.2f s",
            loss, ppl, batches, int(n_tokens), time.perf_counter() - t0,
        )
        return {"val_loss": loss, "val_ppl": ppl}

    def _token_loss_sums(
        self, model_parts: Sequence[nn.Module], t0: float, *, interruptible: bool = True
    ) -> tuple[torch.Tensor | None, int]:
        """(sum of token losses, token count) over every rank of the loss group, and batches taken; None
        for the sums when stop_requested ended the validation."""
        stop_requested = self.stop_requested if interruptible else None
        model = model_parts[0]
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        batches = micro = 0
        reported = t0
        for inputs, labels in self.dataset:  # a fresh iterator: every validation starts at the beginning
            # Between two global batches (checked once the next one exists, so a validation that read its
            # last batch is never thrown away): a collective, every rank agrees.
            if micro and micro % self.microbatches_per_batch == 0 and stop_requested is not None and stop_requested():
                return None, batches
            inputs = inputs.to(self.device, non_blocking=True)  # (local_bs, seq_len)
            labels = labels.to(self.device, non_blocking=True)
            if self.loss_mask_eos is not None:  # as the training step's labels
                labels = mask_after_eos(inputs, labels, self.loss_mask_eos)
            # Under CP, inputs and labels are this rank's sequence shards from here on (labels are counted
            # below as shards: the loss group's all-reduce adds the cp ranks' counts up).
            with self.cp_context(inputs, labels):
                if self.pipeline is not None:
                    loss, counted = self._pipeline_loss_sum(inputs, labels), self.pipeline.has_last
                else:
                    with self.loss_context(), self.amp_context():  # as the training step computes it
                        loss = model_token_loss(model, inputs, labels, chunk_size=self.loss_chunk_size)
                    counted = True
            if isinstance(loss, DTensor):
                loss = loss.to_local()  # replicated over the TP ranks
            totals[0] += loss.to(torch.float64)
            if counted:
                totals[1] += (labels != IGNORE_INDEX).sum().to(torch.float64)
            del loss
            micro += 1
            if micro % self.microbatches_per_batch == 0:
                batches += 1  # a global batch ends (the finite stream only yields whole ones)
                if batches == self.cfg.steps:
                    break
                if time.perf_counter() - reported >= PROGRESS_EVERY_S:
                    reported = time.perf_counter()
                    total = "global batches of the whole set" if self.cfg.steps == -1 else f"{self.cfg.steps} global batches"
                    logger.info("validation: %d of %s in %.0f s", batches, total, reported - t0)
        if self.pp_group is not None:
            dist.all_reduce(totals, group=self.pp_group)  # only the last stage's rank holds the sums
        if self.loss_group is not None:
            dist.all_reduce(totals, group=self.loss_group)
        return totals, batches

    def _pipeline_loss_sum(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training schedule, forward only; the token-loss sum on the last stage's rank, else 0."""
        assert self.pipeline is not None
        losses: list[torch.Tensor] = []
        with self.loss_context(), self.amp_context():
            self.pipeline.eval(inputs, labels, losses)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for loss in losses:
            total += (loss.to_local() if isinstance(loss, DTensor) else loss).to(torch.float64)
        return total
