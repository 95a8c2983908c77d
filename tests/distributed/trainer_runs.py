"""The real Trainer on N ranks, for parity and resume tests: one rank function, the layouts, the config.

    ranks = run_on_ranks(train_run, world_size=4, tmp_path=tmp_path, args=(trainer_argv(dump, "fsdp2xtp2"),))
    ranks[0]["history"], ranks[0]["params"]

Every run is the debug model, cut to 2 blocks unless a test asks for more (`n_layers`: model.n_layers), in
fp32 with deterministic algorithms, seq_len 64 and a global batch of 8 sequences, so every layout trains on
the same global batches (the loader deals them out independently of the layout) and must give the same
training. A layout only says how the batch is split: `local_batch_size` per layout, with gradient
accumulation where it is smaller than the layout's share of the global batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from torchtitan_like.distributed.utils import plain_name

ROOT = Path(__file__).resolve().parents[2]
STEPS = 10

# name: (world size, CLI overrides). Global batch 8 everywhere; "accumulates" = microbatches per step.
LAYOUTS: dict[str, tuple[int, tuple[str, ...]]] = {
    "one": (1, ("--training.local_batch_size", "8")),
    # FSDP(2) and DDP(2) take 2 microbatches of 2 per rank: accumulation under data parallelism.
    "fsdp2": (2, ("--parallelism.data_parallel_shard_degree", "2", "--training.local_batch_size", "2")),
    # FSDP(2) with the sharded parameters, gradients and optimizer states on the CPU (CPUOffloadPolicy).
    "fsdp2_offload": (2, ("--parallelism.data_parallel_shard_degree", "2", "--training.local_batch_size", "2",
                          "--training.enable_cpu_offload")),
    "fsdp4": (4, ("--parallelism.data_parallel_shard_degree", "4", "--training.local_batch_size", "2")),
    "hsdp2x2": (
        4,
        (
            "--parallelism.data_parallel_replicate_degree", "2",
            "--parallelism.data_parallel_shard_degree", "2",
            "--training.local_batch_size", "2",
        ),
    ),
    "ddp2": (
        2,
        (
            "--parallelism.data_parallel_replicate_degree", "2",
            "--parallelism.data_parallel_shard_degree", "1",
            "--training.local_batch_size", "2",
        ),
    ),
    # DDP(2) x TP(2): replicated across the data-parallel pair, sharded inside each TP pair.
    "ddp2xtp2": (
        4,
        (
            "--parallelism.data_parallel_replicate_degree", "2",
            "--parallelism.data_parallel_shard_degree", "1",
            "--parallelism.tensor_parallel_degree", "2",
            "--training.local_batch_size", "4",
        ),
    ),
    "tp2": (
        2,
        (
            "--parallelism.data_parallel_shard_degree", "1",
            "--parallelism.tensor_parallel_degree", "2",
            "--training.local_batch_size", "8",
        ),
    ),
    "fsdp2xtp2": (
        4,
        (
            "--parallelism.data_parallel_shard_degree", "2",
            "--parallelism.tensor_parallel_degree", "2",
            "--training.local_batch_size", "4",
        ),
    ),
    # HSDP(2x2) x TP(2) on 8 ranks: replicated across the pair of FSDP groups, sharded inside each, TP inside.
    "hsdp2x2xtp2": (
        8,
        (
            "--parallelism.data_parallel_replicate_degree", "2",
            "--parallelism.data_parallel_shard_degree", "2",
            "--parallelism.tensor_parallel_degree", "2",
            "--training.local_batch_size", "2",
        ),
    ),
    # Pipeline parallel (schedule 1F1B unless overridden): 8 microbatches of 1 per step.
    "pp2": (
        2,
        (
            "--parallelism.pipeline_parallel_degree", "2",
            "--parallelism.data_parallel_shard_degree", "1",
            "--training.local_batch_size", "8",
        ),
    ),
    "pp2xfsdp2": (
        4,
        (
            "--parallelism.pipeline_parallel_degree", "2",
            "--parallelism.data_parallel_shard_degree", "2",
            "--training.local_batch_size", "4",
        ),
    ),
    "pp2xtp2": (
        4,
        (
            "--parallelism.pipeline_parallel_degree", "2",
            "--parallelism.data_parallel_shard_degree", "1",
            "--parallelism.tensor_parallel_degree", "2",
            "--training.local_batch_size", "8",
        ),
    ),
    # 3D: two pipeline stages, each FSDP(2) x TP(2).
    "pp2xfsdp2xtp2": (
        8,
        (
            "--parallelism.pipeline_parallel_degree", "2",
            "--parallelism.data_parallel_shard_degree", "2",
            "--parallelism.tensor_parallel_degree", "2",
            "--training.local_batch_size", "4",
            "--parallelism.pipeline_parallel_microbatch_size", "2",
        ),
    ),
    # Context parallel: the cp ranks of a data-parallel group share their batch.
    "cp2": (
        2,
        (
            "--parallelism.context_parallel_degree", "2",
            "--parallelism.data_parallel_shard_degree", "1",
            "--training.local_batch_size", "8",
        ),
    ),
    "cp4": (
        4,
        (
            "--parallelism.context_parallel_degree", "4",
            "--parallelism.data_parallel_shard_degree", "1",
            "--training.local_batch_size", "8",
        ),
    ),
    "cp2xfsdp2": (
        4,
        (
            "--parallelism.context_parallel_degree", "2",
            "--parallelism.data_parallel_shard_degree", "2",
            "--training.local_batch_size", "4",
        ),
    ),
    "cp2xtp2": (
        4,
        (
            "--parallelism.context_parallel_degree", "2",
            "--parallelism.tensor_parallel_degree", "2",
            "--parallelism.data_parallel_shard_degree", "1",
            "--training.local_batch_size", "8",
        ),
    ),
    # CP(2) x FSDP(2) x TP(2) on 8 ranks: FSDP shards over dp_shard x cp, TP inside.
    "cp2xfsdp2xtp2": (
        8,
        (
            "--parallelism.context_parallel_degree", "2",
            "--parallelism.data_parallel_shard_degree", "2",
            "--parallelism.tensor_parallel_degree", "2",
            "--training.local_batch_size", "4",
        ),
    ),
    "cp2xpp2": (
        4,
        (
            "--parallelism.context_parallel_degree", "2",
            "--parallelism.pipeline_parallel_degree", "2",
            "--parallelism.data_parallel_shard_degree", "1",
            "--training.local_batch_size", "8",
        ),
    ),
}


# Blocks of the debug model in these runs: every per-block pass (TP plan, FSDP unit, AC, compile) still
# runs on more than one block, at a third of the 6-block model's CPU time per step (DTensor dispatch
# dominates on CPU). Pipeline tests that need a block per stage, or several per stage, ask for more.
N_LAYERS = 2


def trainer_argv(
    dump_folder: Path, layout: str, *overrides: str, steps: int = STEPS, n_layers: int = N_LAYERS
) -> list[str]:
    """The command line (as run_train.sh passes it) of a debug-model run under `layout`."""
    _, layout_args = LAYOUTS[layout]
    return [
        "--job.config_file", str(ROOT / "train_configs" / "debug_model.toml"),
        "--job.dump_folder", str(dump_folder),
        "--model.n_layers", str(n_layers),
        "--training.seq_len", "64",
        "--training.global_batch_size", "8",
        "--training.steps", str(steps),
        "--metrics.no_enable_tensorboard",
        "--debug.deterministic",
        *layout_args,
        *overrides,
    ]


# Another layout of the same training: the same up to fp32 summation order (reasons and values seen:
# test_trainer_parity.py).
RTOL = 1e-4
NORM_RTOL = 1e-4
PARAM_ATOL = 2e-5


def series(history: list[dict], key: str) -> torch.Tensor:
    return torch.tensor([h[key] for h in history], dtype=torch.float64)


def assert_same_training(got: dict, ref: dict, what: str, *, params: dict | None = None) -> None:
    """Per-step loss and grad norm (and the final weights, if given) of `got` match `ref` (a run's result),
    and the optimizer saw every gradient in its parameter's layout."""
    assert got.get("misplaced_grads", []) == [], f"{what}: gradient layouts {got['misplaced_grads']}"
    assert [h["step"] for h in got["history"]] == [h["step"] for h in ref["history"]], what
    assert [h["lr"] for h in got["history"]] == [h["lr"] for h in ref["history"]], what
    torch.testing.assert_close(
        series(got["history"], "loss"), series(ref["history"], "loss"), rtol=RTOL, atol=0,
        msg=lambda m: f"{what}: loss: {m}",
    )
    torch.testing.assert_close(
        series(got["history"], "grad_norm"), series(ref["history"], "grad_norm"), rtol=NORM_RTOL, atol=0,
        msg=lambda m: f"{what}: grad norm: {m}",
    )
    if params is not None:
        want = ref["params"]
        assert params.keys() == want.keys(), f"{what}: parameter names differ"
        for name, w in want.items():
            torch.testing.assert_close(params[name], w, rtol=0, atol=PARAM_ATOL, msg=lambda m: f"{what}: {name}: {m}")


class SimulatedCrash(Exception):
    """Raised inside train_step at the step a run is told to die at."""


def full_params(model_parts: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every parameter as a whole plain tensor (a collective under DTensor: call it on every rank),
    named as in the plain model: the activation-checkpoint and compile wrappers' name parts are
    dropped so runs with and without them compare name for name."""
    out = {}
    for part in model_parts:
        for name, p in part.named_parameters():
            t = p.full_tensor() if isinstance(p, DTensor) else p
            out[plain_name(name)] = t.detach().clone()
    return out


def train_run(argv: list[str], crash_at_step: int | None = None) -> dict:
    """Rank function: build a Trainer from `argv` (resuming if its dump folder holds a checkpoint) and
    train. With `crash_at_step`, the step of that number raises SimulatedCrash before it touches any
    weight or collective, on every rank: the process then ends as after a crash (close() runs, as in
    train.main's `finally`), with the checkpoints written before it.

    Returns {"history", "crashed", "output_positions"} on every rank (the sequence lengths the output
    projection ran on: [] where no stage of this rank has it), plus "params" (full, after the run) on rank 0 when
    the run did not crash; with pipeline parallel on every rank (each holds only its stages' names:
    merge them with `merged_params`).
    """
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.trainer import Trainer

    trainer = Trainer(load_config(argv))
    grad_bytes, misplaced_grads = _record_grad_bytes(trainer.optimizers)
    projected: set[int] = set()  # positions per call of the output projection (a chunk with loss_chunk_size)
    for part in trainer.model_parts:
        if part.output is not None:
            part.output.register_forward_hook(lambda _module, _inputs, logits: projected.add(logits.shape[1]))
    if crash_at_step is not None:
        train_step = trainer.train_step

        def crashing_train_step(batches):
            if trainer.step == crash_at_step:
                raise SimulatedCrash(f"simulated crash at step {crash_at_step}")
            return train_step(batches)

        trainer.train_step = crashing_train_step
    crashed = False
    try:
        trainer.train()
    except SimulatedCrash:
        crashed = True
    finally:
        trainer.close()
    out: dict = {
        "history": list(trainer.history), "crashed": crashed, "misplaced_grads": sorted(misplaced_grads),
        "output_positions": sorted(projected),
    }
    out["state"] = {
        "params": sum(_local_bytes(p) for part in trainer.model_parts for p in part.parameters()),
        "grads": grad_bytes[0],
        "optimizer": sum(_local_bytes(t) for o in trainer.optimizers for st in o.state.values() for t in st.values()),
    }
    if not crashed:
        params = full_params(trainer.model_parts)
        if not dist.is_initialized() or dist.get_rank() == 0 or trainer.parallel_dims.pp_enabled:
            out["params"] = params
    return out


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def _record_grad_bytes(optimizers: list[torch.optim.Optimizer]) -> tuple[list[int], set[str]]:
    """Make each optimizer step first record the bytes of the gradients it is about to apply (the
    moment they all exist) and any gradient whose DTensor layout is not its parameter's; returns the
    one-element list the latest step's total lands in, and the set of "param -> grad" layouts seen."""
    total = [0]
    misplaced: set[str] = set()
    for opt in optimizers:
        step = opt.step

        def recording_step(*args, _opt=opt, _step=step, **kwargs):
            if _opt is optimizers[0]:
                total[0] = 0
            grads = [(p, p.grad) for g in _opt.param_groups for p in g["params"] if p.grad is not None]
            total[0] += sum(_local_bytes(grad) for _, grad in grads)
            misplaced.update(
                f"{p.placements} -> {grad.placements}" for p, grad in grads
                if isinstance(grad, DTensor) and grad.placements != p.placements
            )
            return _step(*args, **kwargs)

        opt.step = recording_step
    return total, misplaced


def assert_state_matches_dry_run(argv: list[str], world: int, ranks: list[dict], *, check_ranks: list[int]) -> None:
    """The parameter / gradient / optimizer bytes each rank in `check_ranks` held in the real run
    equal what the dry run builds for that rank and what the planner predicts without building."""
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.dry_run import dry_run
    from torchtitan_like.planner.state import predicted_state_bytes, state_itemsize
    from torchtitan_like.trainer import check_job

    cfg = load_config(argv)
    checked = check_job(cfg, world)
    for rank in check_ranks:
        report = dry_run(argv, world_size=world, rank=rank, device="cpu")
        dry = report["state_bytes"]
        real = ranks[rank]["state"]
        assert {k: dry[k] for k in real} == real, f"rank {rank}: dry run {dry} != real run {real}"
        plan = checked.pp_plan
        stages = None if plan is None else [plan.fqns_per_stage[s] for s in report["stages"]]
        predicted = predicted_state_bytes(checked.model_args, report["layout"], rank=rank, stage_fqns=stages,
                                          param_itemsize=state_itemsize(cfg.training))
        assert predicted.as_dict() == dry, f"rank {rank}: planner {predicted.as_dict()} != dry run {dry}"


def merged_params(ranks: list[dict]) -> dict[str, torch.Tensor]:
    """The whole model from the ranks' "params" (pipeline stages hold disjoint names)."""
    out: dict[str, torch.Tensor] = {}
    for r in ranks:
        out.update(r.get("params", {}))
    return out
