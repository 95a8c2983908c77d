"""val_loss is the same number under every parallel layout as in one process (before and after
training), over a small local validation set read to its end (steps = -1, so the last, incomplete
global batch is dropped the same way everywhere); validating does not change the training."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from harness import run_on_ranks

ROOT = Path(__file__).resolve().parents[2]
STEPS = 2
GLOBAL_BATCH = 8

# name: (world size, data-parallel degree, layout overrides)
LAYOUTS = {
    "one": (1, 1, ()),
    "fsdp2xtp2": (4, 2, ("--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2")),
    "ddp2": (2, 2, ("--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "1")),
    # validation.global_batch_size: each rank reads its 4 sequences of a global batch as 4 microbatches of 1.
    "ddp2_micro": (
        2, 2,
        (
            "--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "1",
            "--validation.local_batch_size", "1", "--validation.global_batch_size", str(GLOBAL_BATCH),
        ),
    ),
    # The held-out batches go through the 1F1B / interleaved schedule forward only; 4 microbatches.
    # The last stage's loss is chunked over the sequence, in training and in validation.
    "pp2xfsdp2": (
        4, 2,
        (
            "--parallelism.pipeline_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "2",
            "--training.loss_chunk_size", "16",
        ),
    ),
    # Validation runs under CP as training does: each cp rank takes its shards of the sequences.
    "cp2": (2, 1, ("--parallelism.context_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1")),
    "cp2xpp2": (
        4, 1,
        (
            "--parallelism.pipeline_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1",
            "--parallelism.context_parallel_degree", "2",
        ),
    ),
    "pp2xtp2": (
        4, 1,
        (
            "--parallelism.pipeline_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1",
            "--parallelism.tensor_parallel_degree", "2",
        ),
    ),
    "pp2_interleaved": (
        2, 1,
        (
            "--parallelism.pipeline_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1",
            "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
            "--parallelism.pipeline_parallel_microbatch_size", "2",
        ),
    ),
}


def argv(dump: Path, layout: str, data: Path) -> list[str]:
    _, dp, overrides = LAYOUTS[layout]
    local = str(GLOBAL_BATCH // dp)
    return [
        "--job.config_file", str(ROOT / "train_configs" / "debug_model.toml"),
        "--job.dump_folder", str(dump),
        "--model.n_layers", "4",  # a layer for each of pp2_interleaved's 4 stages
        "--training.seq_len", "64",
        "--training.local_batch_size", local,
        "--training.global_batch_size", str(GLOBAL_BATCH),
        "--training.steps", str(STEPS),
        "--metrics.no_enable_tensorboard",
        "--debug.deterministic",
        "--validation.enable",
        "--validation.freq", str(STEPS),
        "--validation.dataset", "local",
        "--validation.dataset_path", str(data),
        "--validation.steps", "-1",
        "--validation.seq_len", "64",
        "--validation.local_batch_size", local,
        *overrides,
    ]


def validate_run(args: list[str]) -> dict:
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.trainer import Trainer

    trainer = Trainer(load_config(args))
    # The sequence length each model part is called with while validating (this rank's shard under CP).
    seq_lens: set[int] = set()
    projected: set[int] = set()  # positions per call of the output projection while validating
    hooks = [
        part.register_forward_pre_hook(lambda _, inputs: seq_lens.add(inputs[0].shape[1]) if not torch.is_grad_enabled() else None)
        for part in trainer.model_parts
    ] + [
        part.output.register_forward_hook(lambda _m, _i, out: projected.add(out.shape[1]) if not torch.is_grad_enabled() else None)
        for part in trainer.model_parts if part.output is not None
    ]
    try:
        before = trainer.validator.validate(trainer.model_parts)
        trainer.train()  # validates after the last step on the way
        after = trainer.validator.validate(trainer.model_parts)
        modes = [m.training for m in trainer.model_parts]
    finally:
        for h in hooks:
            h.remove()
        trainer.close()
    return {
        "before": before, "after": after, "losses": [h["loss"] for h in trainer.history], "training": modes,
        "val_seq_lens": sorted(seq_lens), "val_output_positions": sorted(projected),
    }


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    """About 2.5 global batches of 8 x 65 tokens: two whole ones are validated, the rest dropped."""
    source = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()[:4000]
    path = tmp_path_factory.mktemp("data") / "held_out.jsonl"
    path.write_text("".join(json.dumps({"text": source[i : i + 2000]}) + "\n" for i in range(0, 4000, 2000)))
    return path


@pytest.fixture(scope="module")
def one(tmp_path_factory, held_out) -> dict:
    """The reference: one plain process (no process group), run inside pytest."""
    tmp = tmp_path_factory.mktemp("one")
    try:
        return validate_run(argv(tmp / "out", "one", held_out))
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("layout", ["fsdp2xtp2", "ddp2", "ddp2_micro", "cp2", "pp2xfsdp2", "pp2xtp2", "pp2_interleaved", "cp2xpp2"])
def test_val_loss_matches_one_process(tmp_path, layout, one, held_out):
    from torchtitan_like.distributed.pipeline import schedule_switches_modes

    if "pp" in layout and not schedule_switches_modes():
        pytest.skip(f"torch {torch.__version__}'s pipeline schedules cannot switch to forward-only (refused at start)")
    world, _, _ = LAYOUTS[layout]
    ranks = run_on_ranks(validate_run, world_size=world, tmp_path=tmp_path, args=(argv(tmp_path / "out", layout, held_out),))
    for r in ranks:
        for when in ("before", "after"):
            assert r[when]["val_loss"] == pytest.approx(one[when]["val_loss"], rel=1e-6, abs=1e-6), (layout, when)
            assert r[when]["val_ppl"] == pytest.approx(one[when]["val_ppl"], rel=1e-5)
        assert r["losses"] == pytest.approx(one["losses"], rel=1e-6, abs=1e-6)
        assert all(r["training"])
        # Under CP each rank validates on its shards of the sequences, as it trains.
        assert r["val_seq_lens"] == [64 // 2 if "cp2" in layout else 64], layout
    if layout == "pp2xfsdp2":  # the last stage's ranks project 16 positions at a time, in validation too
        assert [r["val_output_positions"] for r in ranks] == [[], [], [16], [16]]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and [("val_loss" in row) for row in rows] == [False, True]
