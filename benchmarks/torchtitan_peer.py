"""Run torchtitan (0.2.2, from --peer-site) on the same shape and features as ours, timed like ours.

Launched by bench_train.py inside torchrun, with torchtitan's own CLI after `--`:

    torchrun --standalone --nproc_per_node=1 benchmarks/torchtitan_peer.py --raw-out X.json -- \
        --model.name llama3_bench --model.flavor 1B --training.seq_len 8192 ...

It registers a train spec "llama3_bench": torchtitan's llama3 spec (its model, parallelize, float8
converter, optimizer, loss) with two changes, so it runs with no download and no tokenizer:
- flavors built from ours (torchtitan 0.2.2 has no Llama 3.2 1B and no 8B slice): the same dim,
  layers, heads, FFN size, vocab and RoPE (torchtitan's llama3 has no tied embeddings, so its 1B
  carries a separate output matrix: same FLOPs, 0.26B more parameters and their optimizer state);
- a synthetic data loader (random tokens), like ours with training.dataset = "synthetic".
torchtitan's Trainer.train_step is timed between two device synchronizations (StepTimer, shared
with bench_train.py), so both sides are measured the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)


def _peer_flavors() -> dict:
    from torchtitan.models.llama3.model.args import RoPEScalingArgs, TransformerModelArgs

    from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS

    out = {}
    for name, a in LLAMA3_FLAVORS.items():
        rope = a.rope_scaling
        # torchtitan applies its default Llama 3.1 scaling (factor 8) when given none; factor 1 is the
        # identity of that formula, for our flavors without scaling (the debug ones).
        kwargs = {"rope_scaling_args": RoPEScalingArgs(scaling_factor=1.0)}
        if rope is not None:
            kwargs["rope_scaling_args"] = RoPEScalingArgs(
                scaling_factor=rope.factor,
                low_freq_factor=rope.low_freq_factor,
                high_freq_factor=rope.high_freq_factor,
                original_max_position_embeddings=rope.original_max_position_embeddings,
            )
        out[name] = TransformerModelArgs(
            dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, vocab_size=a.vocab_size,
            multiple_of=a.multiple_of, ffn_dim_multiplier=a.ffn_dim_multiplier, norm_eps=a.norm_eps,
            rope_theta=a.rope_theta, max_seq_len=a.max_seq_len, depth_init=a.depth_init, **kwargs,
        )
    return out


def _synthetic_dataloader(dp_world_size: int, dp_rank: int, tokenizer, job_config):  # noqa: ANN001
    import torch
    from torch.utils.data import IterableDataset
    from torchtitan.components.dataloader import ParallelAwareDataloader
    from torchtitan.protocols.train_spec import get_train_spec

    vocab = get_train_spec("llama3_bench").model_args[job_config.model.flavor].vocab_size
    seq = job_config.training.seq_len

    class Synthetic(IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(1234 + dp_rank)
            while True:
                tokens = torch.randint(0, vocab, (seq + 1,), generator=g)
                yield {"input": tokens[:-1]}, tokens[1:]

        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, state: dict) -> None:
            pass

    return ParallelAwareDataloader(
        Synthetic(), dp_rank=dp_rank, dp_world_size=dp_world_size, batch_size=job_config.training.local_batch_size
    )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--raw-out", required=True)
    a, rest = p.parse_known_args()
    if rest and rest[0] == "--":
        rest = rest[1:]

    # Before importing torchtitan: its ConfigManager.parse_args binds sys.argv[1:] as a default
    # argument when torchtitan.config.manager is imported.
    sys.argv = [sys.argv[0], *rest]

    import torch
    import torchtitan
    from torchtitan.protocols.train_spec import get_train_spec, register_train_spec
    from torchtitan.train import Trainer, main as torchtitan_main

    from bench_train import StepTimer

    spec = get_train_spec("llama3")
    register_train_spec(
        "llama3_bench",
        dataclasses.replace(
            spec,
            model_args={**spec.model_args, **_peer_flavors()},
            build_tokenizer_fn=None,
            build_dataloader_fn=_synthetic_dataloader,
        ),
    )

    class TimedTrainer(Trainer):
        def __init__(self, job_config) -> None:  # noqa: ANN001
            super().__init__(job_config)
            self.timer = StepTimer(self.device)
            self.train_step = self.timer.wrap(self.train_step)  # type: ignore[method-assign]

        def close(self) -> None:
            if int(torch.distributed.get_rank() if torch.distributed.is_initialized() else 0) == 0:
                raw = self.timer.raw()
                raw.update(
                    implementation="torchtitan",
                    version=torchtitan.__version__,
                    torchao=_version("torchao"),
                    world_size=torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
                    final_loss=None,
                )
                Path(a.raw_out).write_text(json.dumps(raw, indent=1))
            super().close()

    torchtitan_main(TimedTrainer)
    return 0


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
