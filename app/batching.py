"""Dynamic micro-batching of encoder calls.

Requests submit items and await futures; one worker thread per encoder gathers whatever is
queued (up to ``max_batch``, waiting at most ``max_wait`` for more after the first item) and
runs ONE encoder call for all of them. The event loop never runs model code.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")
_STOP = object()


class MicroBatcher(Generic[T]):
    def __init__(
        self,
        encode: Callable[[Sequence[T]], np.ndarray],
        max_batch: int = 32,
        max_wait_s: float = 0.005,
        name: str = "encoder",
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._encode = encode
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, items: Sequence[T]) -> list[Future]:
        futures: list[Future] = []
        for item in items:
            fut: Future = Future()
            self._queue.put((item, fut))
            futures.append(fut)
        return futures

    async def encode(self, items: Sequence[T]) -> np.ndarray:
        """Encode items (batched with other requests' items); rows in input order."""
        if not items:
            raise ValueError("nothing to encode")
        rows = await asyncio.gather(*(asyncio.wrap_future(f) for f in self.submit(items)))
        return np.stack(rows)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                timeout = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=max(timeout, 0)) if timeout > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    self._queue.put(_STOP)
                    break
                batch.append(nxt)
            live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                out = self._encode([item for item, _ in live])
                if self._on_batch:
                    self._on_batch(len(live))
                for (_, fut), row in zip(live, out, strict=True):
                    fut.set_result(row)
            except BaseException as exc:  # hand the failure to every waiting request
                for _, fut in live:
                    fut.set_exception(exc)

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=5)
