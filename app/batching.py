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


class Overloaded(RuntimeError):
    """The encoder queue is full, or a request waited too long: the client should retry later."""


class MicroBatcher(Generic[T]):
    def __init__(
        self,
        encode: Callable[[Sequence[T]], np.ndarray],
        max_batch: int = 32,
        max_wait_s: float = 0.005,
        name: str = "encoder",
        on_batch: Callable[[int], None] | None = None,
        max_queue: int = 1024,
        timeout_s: float = 30.0,
    ) -> None:
        self._encode = encode
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, items: Sequence[T]) -> list[Future]:
        """Queue items; raises Overloaded instead of letting the queue grow past max_queue."""
        if self._queue.qsize() + len(items) > self.max_queue:
            raise Overloaded(f"encoder queue full ({self.max_queue} items waiting)")
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
        futures = self.submit(items)
        try:
            rows = await asyncio.wait_for(
                asyncio.gather(*(asyncio.wrap_future(f) for f in futures)), timeout=self.timeout_s
            )
        except TimeoutError as exc:
            for f in futures:
                f.cancel()  # not started yet: the worker skips it
            raise Overloaded(f"encoder did not answer within {self.timeout_s:g} s") from exc
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
