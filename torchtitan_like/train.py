"""Entry point: `python -m torchtitan_like.train --job.config_file FILE [--section.key value ...]`.

Normally started by run_train.sh through torchrun. `--help` prints every config key with its default
and doc. A user-facing error (TrainerError) prints one line and exits 2 (3 for a diverged run).
"""

from __future__ import annotations

import logging
import os
import sys

from torchtitan_like.errors import TrainerError, TrainingError

logger = logging.getLogger("torchtitan_like")

EXIT_CONFIG_OR_DATA = 2
EXIT_TRAINING = 3


def _setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO,
        format=f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        from torchtitan_like.config.reference import help_text

        print(help_text())
        return 0
    _setup_logging()
    trainer = None
    try:
        from torchtitan_like.config.loader import load_config

        cfg = load_config(argv)
        if cfg.job.print_config:
            from torchtitan_like.config.loader import to_toml

            logger.info("resolved config:\n%s", to_toml(cfg))
        if cfg.job.description:
            logger.info("job: %s", cfg.job.description)
        from torchtitan_like.trainer import Trainer

        trainer = Trainer(cfg)
        trainer.train()
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_TRAINING if isinstance(e, TrainingError) else EXIT_CONFIG_OR_DATA
    finally:
        if trainer is not None:
            trainer.close()
    logger.info("training finished")
    return 0


def _exit(code: int) -> None:
    """Leave the process group cleanly, then exit without interpreter teardown.

    gloo sometimes aborts ("terminate called without an active exception") while Python tears down a
    finished rank, which makes torchrun fail a successful job (see CPU_NOTES). A barrier, an explicit
    destroy, a flush and os._exit avoid it.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
