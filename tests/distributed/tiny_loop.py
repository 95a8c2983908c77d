"""A tiny training loop for parity tests: the same training, with or without a parallel layout.

It builds the model the way the trainer does (meta -> parallelize_llama -> to_empty ->
init_weights(seed)), then per step: the same global batch on every layout, each data-parallel rank
takes its own microbatches, loss = token-sum cross entropy / token count of the whole global batch,
backward per microbatch, clip_grad_norm_, AdamW step. With no process group it is the single-process
reference. Everything is fp32 with deterministic algorithms.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from torchtitan_like.config.schema import Parallelism, Training
from torchtitan_like.data.loader import grad_accum_steps
from torchtitan_like.distributed.parallel_dims import ParallelDims
from torchtitan_like.distributed.utils import clip_grad_norm_
from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS, TransformerArgs
from torchtitan_like.models.llama3.model import Transformer
from torchtitan_like.models.llama3.parallelize import parallelize_llama


@dataclass(frozen=True)
class LoopSpec:
    n_layers: int = 2
    seq_len: int = 16
    global_batch_size: int = 8
    local_batch_size: int = 2
    steps: int = 10
    seed: int = 0
    lr: float = 1e-3
    max_norm: float = 1.0
    tie_word_embeddings: bool = False
    parallelism: Parallelism = field(default_factory=Parallelism)

    def model_args(self) -> TransformerArgs:
        return replace(
            LLAMA3_FLAVORS["debugmodel"],
            n_layers=self.n_layers,
            max_seq_len=self.seq_len,
            tie_word_embeddings=self.tie_word_embeddings,
        )

    def training(self) -> Training:
        return Training(
            local_batch_size=self.local_batch_size,
            global_batch_size=self.global_batch_size,
            seq_len=self.seq_len,
            max_norm=self.max_norm,
            steps=self.steps,
        )

    def reference(self) -> LoopSpec:
        """The same training without parallelism (microbatches of 2: the split never changes the math)."""
        return replace(self, parallelism=Parallelism(data_parallel_shard_degree=1), local_batch_size=2)


def global_batch(spec: LoopSpec, step: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels) of shape (global_batch_size, seq_len); a few labels are ignore_index."""
    g = torch.Generator().manual_seed(10_000 + 7919 * step + spec.seed)
    tokens = torch.randint(0, vocab_size, (spec.global_batch_size, spec.seq_len + 1), generator=g)
    labels = tokens[:, 1:].clone()
    labels[torch.rand(labels.shape, generator=g) < 0.1] = -100
    return tokens[:, :-1].contiguous(), labels


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a whole plain tensor (a collective under DTensor: call it on every rank)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        out[name] = t.detach().clone()
    return out


def build(spec: LoopSpec) -> tuple[Transformer, ParallelDims, Training]:
    """The trainer's build order: meta -> parallelize_llama -> to_empty -> init_weights(seed)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    args = spec.model_args()
    pd = ParallelDims.from_config(spec.parallelism, world)
    training = spec.training()
    pd.validate(model_args=args, training=training)
    pd.build_mesh("cpu")
    with torch.device("meta"):
        model = Transformer(args)
    parallelize_llama(model, pd, parallelism=spec.parallelism, training=training, device_type="cpu")
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(spec.seed)
    return model, pd, training


def init_params(spec: LoopSpec) -> dict[str, torch.Tensor]:
    """The full parameters right after init_weights (every rank returns them)."""
    model, _, _ = build(spec)
    return full_params(model)


def train(spec: LoopSpec) -> dict:
    """Run the loop on this rank; returns the per-step losses and grad norms (every rank) and, on
    rank 0, the full parameters after the last step."""
    torch.use_deterministic_algorithms(True)
    rank = dist.get_rank() if dist.is_initialized() else 0
    model, pd, training = build(spec)
    args = spec.model_args()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.1, foreach=False)

    accum = grad_accum_steps(training, pd.dp_degree)
    lbs, dp, dp_rank = spec.local_batch_size, pd.dp_degree, pd.dp_rank
    losses, norms = [], []
    for step in range(spec.steps):
        tokens, labels = global_batch(spec, step, args.vocab_size)
        n_tokens = (labels != -100).sum()
        step_loss = torch.zeros(())
        for m in range(accum):
            rows = slice((m * dp + dp_rank) * lbs, (m * dp + dp_rank + 1) * lbs)
            ctx = loss_parallel() if pd.loss_parallel_enabled else contextlib.nullcontext()
            with ctx:
                logits = model(tokens[rows])
                loss = F.cross_entropy(
                    logits.flatten(0, 1).float(), labels[rows].flatten(), reduction="sum", ignore_index=-100
                ) / n_tokens
                loss.backward()
            step_loss += (loss.full_tensor() if isinstance(loss, DTensor) else loss).detach()
        if pd.loss_group is not None:
            dist.all_reduce(step_loss, group=pd.loss_group)
        norm = clip_grad_norm_(list(model.parameters()), spec.max_norm)
        opt.step()
        opt.zero_grad()
        losses.append(step_loss.item())
        norms.append(norm.item())

    final = full_params(model)
    out: dict = {"losses": losses, "grad_norms": norms, "loss_type": type(loss).__name__}
    if rank == 0:
        out["final"] = final
    return out


_REFERENCE_CACHE: dict[str, dict] = {}


def reference_run(spec: LoopSpec) -> dict:
    """The single-process run of `spec` (in this process, one thread; cached, as several layouts share
    one reference). The microbatch split differs from the parallel runs; the math does not."""
    key = repr(spec.reference())
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = _run_in_process(spec.reference())
    return _REFERENCE_CACHE[key]


def _run_in_process(spec: LoopSpec) -> dict:
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    try:
        return train(spec)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
