"""torch.compile per transformer block (and of the loss), and the compile time / recompile report.

Each block is compiled on its own, with fullgraph=True: the blocks share one code object, so after
the first block every other one reuses its graph (one compile, not n_layers), and a graph break is
an error instead of a silent slowdown. Compile comes after tensor parallel and activation
checkpointing (it traces the checkpointed block) and before FSDP, whose per-block hooks then stay
outside the compiled region.

`CompileMonitor` measures wall time spent compiling and counts recompilations (a compile of a frame
that already had a graph: its guards failed, e.g. a new shape or dtype), through dynamo's
compile-start/-end callbacks. The trainer logs both with every metrics line. Validation runs under
`expected_recompiles()`: its forward-only pass (eval mode, no grad) compiles its own graph of each
block once, which is not a training recompile to warn about.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from torchtitan_like.models.llama3.model import Transformer

logger = logging.getLogger(__name__)


def apply_compile(model: Transformer, *, backend: str, under_checkpoints: bool = False) -> None:
    """Replace every block of `model` by its torch.compile'd module (fullgraph), in place.

    The compiled module wraps the block as `_orig_mod`; state dicts and init_weights strip that
    part of the names again.

    under_checkpoints: a block that an activation checkpoint wraps is compiled inside the wrapper
    instead (`nn.Module.compile`, in place), so the checkpoint runs, and recomputes, the compiled
    block. The names stay the block's: a checkpoint wrapper around a compiled module would put
    `_orig_mod` into them (torch strips it only from a compiled module's own children), and the
    checkpoints saved would read `layers.0._orig_mod.attention.wq.weight`.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    inside = 0
    for layer_id, block in list(model.layers.items()):
        if under_checkpoints and isinstance(block, CheckpointWrapper):
            block._checkpoint_wrapped_module.compile(backend=backend, fullgraph=True)
            inside += 1
        else:
            model.layers.register_module(layer_id, torch.compile(block, backend=backend, fullgraph=True))
    logger.info("compiling each of the %d transformer blocks with torch.compile (backend %s, fullgraph%s)",
                len(model.layers), backend, f"; {inside} inside their activation checkpoint" if inside else "")


CACHE_KEY_TAG_ENV = "TORCH_COMPILE_CACHE_KEY_TAG"
"""torch's own variable for torch.compiler.config.cache_key_tag; a user's value is kept in front of ours."""


def separate_compile_caches(group_names: dict[str, str]) -> str:
    """Key torch.compile's on-disk caches by this process's process-group names; returns the tag.

    Compiled collectives (TP's all-reduces, float8's amax all-reduce, ...) name their process group
    in the generated code, and these names differ between ranks: the TP group of ranks 0-1 is "3",
    that of ranks 2-3 is "4". torch 2.13 leaves the group out of its FX graph and AOTAutograd cache
    keys, so once a run has filled the cache (/tmp/torchinductor_$USER, shared by every rank on a
    node), the next run on that node, a resume, loads one rank's code into every rank: "Could not
    resolve the process group registered under the name 3" on the others, or a collective over another
    group of that name. Adding {mesh dim: group name} to torch.compiler.config.cache_key_tag (part of
    both keys) shares a cached graph only between processes whose groups have the same names."""
    import torch.compiler.config

    base = os.environ.get(CACHE_KEY_TAG_ENV, "")
    ours = "process groups " + ",".join(f"{dim}={name}" for dim, name in sorted(group_names.items()))
    torch.compiler.config.cache_key_tag = f"{base};{ours}" if base else ours
    return torch.compiler.config.cache_key_tag


def compile_loss(loss_fn: Callable[..., torch.Tensor], *, backend: str) -> Callable[..., torch.Tensor]:
    """The loss function, compiled (the float32 upcast and log-softmax over the vocab fuse into one kernel)."""
    logger.info("compiling the loss with torch.compile (backend %s)", backend)
    return torch.compile(loss_fn, backend=backend)


# "0/1", "[0/1]", "0/1_1", "!0/1" ...: frame id / compile count of that frame (0 = first compile).
_COMPILE_ID = re.compile(r"(\d+)/(\d+)")


class CompileMonitor:
    """Wall time spent compiling and the number of recompilations, from when it is created.

    Dynamo calls the start callback when a compile begins (only the outermost one when compiles
    nest) and the end callback when it ends; a compile whose id says it is not the first of its
    frame is a recompile. Call `close()` to remove the callbacks.
    """

    def __init__(self) -> None:
        from torch._dynamo.callback import callback_handler

        self._handler = callback_handler
        self._lock = threading.Lock()
        self._started: float | None = None
        self.compile_s = 0.0
        """Seconds spent compiling so far (forward and, lazily, backward graphs)."""
        self.compiles = 0
        """Compilations so far (dynamo frames and lazily compiled backward graphs)."""
        self.recompiles = 0
        """Compilations of a frame that had been compiled before (its guards failed)."""
        self.expected = 0
        """Compilations of an already compiled frame inside `expected_recompiles()` (not in `recompiles`)."""
        self._expecting = False
        self._reported = 0
        self._handler.register_start_callback(self._on_start)
        self._handler.register_end_callback(self._on_end)

    def _on_start(self, args: Any) -> None:
        with self._lock:
            self._started = time.perf_counter()

    def _on_end(self, args: Any) -> None:
        with self._lock:
            if self._started is not None:
                self.compile_s += time.perf_counter() - self._started
                self._started = None
            self.compiles += 1
            m = _COMPILE_ID.search(str(getattr(args, "compile_id", "")))
            trigger = getattr(getattr(args, "callback_trigger", None), "name", "DYNAMO")
            if m is not None and int(m.group(2)) > 0 and trigger == "DYNAMO":
                if self._expecting:
                    self.expected += 1
                else:
                    self.recompiles += 1

    @contextlib.contextmanager
    def expected_recompiles(self) -> Iterator[None]:
        """Compiles of already compiled frames inside are counted in `expected`, not as recompiles (they
        still count in compile_s): for a pass known to need graphs of its own, like validation's."""
        with self._lock:
            self._expecting = True
        try:
            yield
        finally:
            with self._lock:
                self._expecting = False

    def metrics(self, across_ranks: Callable[[int], int] | None = None) -> dict[str, float]:
        """{"compile_s", "recompiles"} for the metrics line; warns once per new recompile.

        across_ranks: maps this rank's recompile count to the job's (the largest over the ranks; a
        collective), so a recompile on a rank that does not log (another pipeline stage) is seen too.
        """
        with self._lock:
            mine, compile_s = self.recompiles, self.compile_s
        total = across_ranks(mine) if across_ranks is not None else mine
        new = total - self._reported
        self._reported = total
        if new > 0:
            logger.warning(
                "torch.compile recompiled %d time(s) since the last log (%d in all%s): a guard failed, e.g. a "
                "new input shape or dtype; run with TORCH_LOGS=recompiles to see why", new, total,
                ", on the rank with the most" if across_ranks is not None else "",
            )
        return {"compile_s": compile_s, "recompiles": total}

    def close(self) -> None:
        for remove, cb in ((self._handler.remove_start_callback, self._on_start),
                           (self._handler.remove_end_callback, self._on_end)):
            try:
                remove(cb)
            except ValueError:  # already removed
                pass
