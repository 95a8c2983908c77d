"""Tokenize ahead: the training loader runs on a background thread, a few microbatches in front.

Every data-parallel rank tokenizes and packs the whole global batch (that is what makes the batch
order independent of the layout; data/dataset.py), on the main thread by default: at 8B scale with
many ranks that is seconds of main-thread work per step. `PrefetchingLoader` moves it to one
background thread that keeps up to `depth` microbatches ready, in the same order.

Checkpoints stay exact: each prefetched batch travels with the loader's state right after it, and
`state_dict()` returns the state after the last batch *handed out*, which is what the loader itself
would report without prefetching. Batches prefetched but not handed out are dropped when iteration
restarts or a state is loaded; the loader is rewound to the handed-out position first. An error in
the loader (a bad record, StopIteration at the end of a finite dataset) is raised by `__next__` in the
order it happened.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from torch.distributed.checkpoint.stateful import Stateful
from torchdata.stateful_dataloader import StatefulDataLoader


logger = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 30.0
"""How long close() waits for the background thread to leave the loader."""


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


class PrefetchingLoader(Stateful):
    """Iterate `loader` on a background thread, up to `depth` (>= 1) batches ahead."""

    def __init__(self, loader: StatefulDataLoader, depth: int):
        if depth < 1:
            raise ValueError(f"depth={depth} must be >= 1")
        self.loader = loader
        self.depth = depth
        self._state = loader.state_dict()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None  # what ended the stream, raised again by later calls

    def __iter__(self) -> PrefetchingLoader:
        self._halt()
        self._error = None
        self._queue = None
        self.loader.load_state_dict(self._state)  # rewind past what was prefetched and not handed out
        it = iter(self.loader)  # (if this raises, there is no half-started iteration to wait on)
        self._queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(it, self._queue, self._stop), name="data-prefetch", daemon=True
        )
        self._thread.start()
        return self

    def __next__(self) -> Any:
        if self._error is not None:
            raise self._error
        if self._queue is None:
            raise TypeError("call iter() on the PrefetchingLoader first (again after close() or load_state_dict())")
        item = self._queue.get()
        if isinstance(item, _Raised):
            self._halt()
            self._error = item.error
            raise item.error
        batch, self._state = item
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._halt()
        self.loader.load_state_dict(state_dict)
        self._state = state_dict
        self._queue = None
        self._error = None

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Stop the background thread (also safe when it never started).

        A thread stuck inside the loader (a streaming read that never returns) is left behind after
        `timeout_s`, with a warning: it is a daemon, so it cannot keep the finished process alive.
        A later next() raises instead of waiting on a queue nothing fills any more.
        """
        self._halt(timeout_s)
        self._queue = None

    def _halt(self, timeout_s: float | None = None) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                logger.warning(
                    "the data-prefetch thread is still inside the data loader after %g s (a read that does not "
                    "return?); leaving it behind", timeout_s,
                )

    def _produce(self, it: Any, q: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item: Any = (next(it), self.loader.state_dict())
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
                item = _Raised(e)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Raised):
                return
