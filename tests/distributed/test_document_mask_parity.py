"""Document masking (model.attn_mask_type = "block_causal") trains the same model under every kind of
parallelism as in one process: loss and grad norm per step, the final weights, and the held-out loss.

The data are many short documents (a few to 40 tokens each), so every 64-token sequence holds several
and the mask changes the result: the one-process reference is checked to differ from causal attention.
Under pipeline parallel the document ids reach the later stages through the schedule (they have no
token ids), in training and in the forward-only validation schedule (torch 2.12 and later: before, the
trainer refuses validation under PP, and those runs compare the training alone).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from harness import run_on_ranks
from trainer_runs import LAYOUTS, assert_same_training, full_params, merged_params, trainer_argv

STEPS = 4
N_LAYERS = 2


def _write_docs(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    words = ("alpha beta gamma delta token model layer mask document batch shard stage rank loss grad "
             "sequence attention pipeline tensor data").split()
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(2, 30)))}) + "\n"
                            for _ in range(n)))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("docs")
    return _write_docs(folder / "train.jsonl", 600, seed=1), _write_docs(folder / "val.jsonl", 40, seed=2)


def _validates(layout: str) -> bool:
    """Whether a run of this layout validates: everywhere, but under PP only where torch's schedules can
    switch to forward-only (2.12 and later; the trainer refuses validation under PP before)."""
    from torchtitan_like.distributed.pipeline import schedule_switches_modes

    return not layout.startswith("pp") or schedule_switches_modes()


def _argv(
    dump: Path, layout: str, data: tuple[Path, Path], *extra: str, mask: str = "block_causal", n_layers: int = N_LAYERS
) -> list[str]:
    train, val = data
    _, layout_args = LAYOUTS[layout]
    local = layout_args[layout_args.index("--training.local_batch_size") + 1]
    validation = (
        "--validation.enable", "--validation.freq", str(STEPS), "--validation.steps", "-1",
        "--validation.dataset", "local", "--validation.dataset_path", str(val),
        "--validation.local_batch_size", local, "--validation.seq_len", "64",
    ) if _validates(layout) else ()
    return trainer_argv(
        dump, layout,
        "--model.attn_mask_type", mask,
        "--training.dataset", "local", "--training.dataset_path", str(train),
        *validation,
        *extra,
        steps=STEPS, n_layers=n_layers,
    )


def doc_mask_run(argv: list[str]) -> dict:
    """Rank function: train, then validate once more where the run validates; the history, val_loss (None
    without validation) and full weights."""
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.trainer import Trainer

    trainer = Trainer(load_config(argv))
    try:
        starts = [int(p.args.bos_id is not None) for p in trainer.model_parts]
        trainer.train()
        assert (trainer.validator is not None) == ("--validation.enable" in argv)
        val = trainer.validator.validate(trainer.model_parts)["val_loss"] if trainer.validator is not None else None
        params = full_params(trainer.model_parts)
    finally:
        trainer.close()
    return {"history": list(trainer.history), "val_loss": val, "params": params, "ids_set": starts}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> dict:
    tmp = tmp_path_factory.mktemp("reference")
    (ref,) = run_on_ranks(doc_mask_run, world_size=1, tmp_path=tmp, args=(_argv(tmp / "run", "one", data),))
    assert ref["ids_set"] == [1]
    return ref


def test_the_mask_changes_training(reference: dict, data, tmp_path: Path) -> None:
    (causal,) = run_on_ranks(
        doc_mask_run, world_size=1, tmp_path=tmp_path, args=(_argv(tmp_path / "run", "one", data, mask="causal"),)
    )
    # Step 1 is the same model on the same batch: only the attention differs.
    first = abs(causal["history"][0]["loss"] - reference["history"][0]["loss"])
    assert first > 1e-4, f"block_causal and causal give the same first loss ({first}): the mask did nothing"
    assert abs(causal["val_loss"] - reference["val_loss"]) > 1e-4


# name: (layout, blocks, overrides)
RUNS: dict[str, tuple[str, int, tuple[str, ...]]] = {
    # TP shards the heads; each rank's attention sees the whole sequence and the same mask.
    "fsdp2xtp2": ("fsdp2xtp2", N_LAYERS, ()),
    # 1F1B with 8 microbatches: each stage gets each microbatch's document ids through the schedule.
    "pp2xtp2": ("pp2xtp2", 4, ()),
    # A runtime (zero-bubble) schedule, 2 stages per rank: the ids as keyword inputs of every stage. (Not a V
    # schedule: torch cannot run one forward only, for validation.)
    "pp2_zero_bubble": ("pp2", 4, ("--parallelism.pipeline_parallel_schedule", "InterleavedZeroBubble")),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_block_causal_matches_one_process(run: str, reference: dict, data, tmp_path: Path) -> None:
    layout, n_layers, extra = RUNS[run]
    ref = reference
    if n_layers != N_LAYERS:  # (a pipeline of 4 stages needs a block each: a reference of that depth)
        ref_argv = _argv(tmp_path / "ref", "one", data, n_layers=n_layers)
        (ref,) = run_on_ranks(doc_mask_run, world_size=1, tmp_path=tmp_path, args=(ref_argv,))
    argv = _argv(tmp_path / "run", layout, data, *extra, n_layers=n_layers)
    _assert_trains_like(ref, layout, argv, tmp_path, what=run)


def _assert_trains_like(ref: dict, layout: str, argv: list[str], tmp_path: Path, *, what: str) -> None:
    """`argv` run under `layout` trains as the one-process `ref` did, and validates to its val_loss."""
    world, _ = LAYOUTS[layout]
    ranks = run_on_ranks(doc_mask_run, world_size=world, tmp_path=tmp_path, args=(argv,), timeout_s=300)
    params = merged_params(ranks) if layout.startswith("pp") else ranks[0]["params"]
    for r, out in enumerate(ranks):
        assert_same_training(out, ref, f"{what} rank {r}", params=params if r == 0 else None)
        if _validates(layout):
            assert out["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5), f"{what} rank {r}"
        else:
            assert out["val_loss"] is None


# training.eod_mask_loss under the layouts that move the labels: TP's loss parallel (vocab-sharded logits),
# CP's sequence shards and PP's microbatches (the loss on the last stage). Causal attention, so context
# parallel can run (it refuses block_causal); the mask does not depend on the attention.
EOD_LAYOUTS = ("fsdp2xtp2", "cp2", "pp2")


@pytest.fixture(scope="module")
def eod_reference(tmp_path_factory, data) -> dict:
    tmp = tmp_path_factory.mktemp("eod_reference")
    argv = _argv(tmp / "run", "one", data, "--training.eod_mask_loss", mask="causal")
    (ref,) = run_on_ranks(doc_mask_run, world_size=1, tmp_path=tmp, args=(argv,))
    return ref


@pytest.mark.parametrize("layout", EOD_LAYOUTS)
def test_eod_mask_loss_matches_one_process(layout: str, eod_reference: dict, data, tmp_path: Path) -> None:
    argv = _argv(tmp_path / "run", layout, data, "--training.eod_mask_loss", mask="causal")
    _assert_trains_like(eod_reference, layout, argv, tmp_path, what=f"eod_mask_loss {layout}")
