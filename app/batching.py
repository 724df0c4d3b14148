"""Dynamic micro-batching of encoder calls.

Requests submit items and await futures; one worker thread per encoder gathers whatever is
queued (up to ``max_batch``) and runs ONE encoder call for all of them. The event loop never
runs model code.

With ``max_wait_s=0`` (the service's default) the worker never waits for a batch to fill: a
lone request is encoded at once, as fast as it would be alone, and requests that arrive while
the encoder is busy form the next batch together (continuous batching). A request's items are
queued at once, so the worker never splits a request that fits in a batch. A positive
``max_wait_s`` waits that long after the first item for more.

The worker survives any ``Exception`` from the encoder or the ``on_batch`` hook: the batch's
requests get the error and the next batch runs as usual. Anything that does end the thread
(a ``BaseException`` such as ``SystemExit``) fails its batch first; the next ``submit`` (or
``ensure_alive``, which ``/readyz`` calls) starts a new worker on the same queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")
_STOP = object()
log = logging.getLogger(__name__)


class _Queue:
    """A FIFO whose ``put_many`` adds several items in one step (a waiting ``get`` sees all of them)."""

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._ready = threading.Condition(threading.Lock())

    def qsize(self) -> int:
        return len(self._items)

    def put(self, item: Any) -> None:
        self.put_many([item])

    def put_many(self, items: Sequence[Any], cap: int | None = None) -> None:
        """Append all items, or none (``Overloaded``) when that would make more than ``cap`` waiting."""
        with self._ready:
            if cap is not None and len(self._items) + len(items) > cap:
                raise Overloaded(f"encoder queue full ({cap} items waiting)")
            self._items.extend(items)
            self._ready.notify()

    def get(self, timeout: float | None = None) -> Any:
        """The next item; waits up to ``timeout`` (None: forever, 0: not at all), else ``queue.Empty``."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._items, timeout):
                raise queue.Empty
            return self._items.popleft()

    def get_nowait(self) -> Any:
        return self.get(0)


class Overloaded(RuntimeError):
    """The encoder queue is full, or a request waited too long: the client should retry later."""


def _settle(fut: Future, row: Any = None, exc: BaseException | None = None) -> None:
    """Give a future its row or error, unless it is already finished."""
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(row)


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
        self.name = name
        self._on_batch = on_batch
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        # ``encode`` submits long item lists in chunks of this many: one request never fills the queue on
        # its own, other requests interleave between its chunks, and each chunk's timeout stays meaningful.
        self.chunk = max(1, min(max_queue // 2, max_batch * 8))
        self.restarts = 0
        self._queue = _Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._dying = False  # set by a worker on its way out, before it fails its batch
        self._thread = self._start_worker()

    @property
    def alive(self) -> bool:
        """Whether a worker thread is serving the queue."""
        return self._thread.is_alive() and not self._dying

    def _start_worker(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name=f"batcher-{self.name}", daemon=True)
        thread.start()
        return thread

    def ensure_alive(self) -> bool:
        """Restart a dead worker; False when closed or the restart failed."""
        with self._lock:
            if self._closed:
                return False
            if self.alive:
                return True
            log.error("%s encoder worker is dead: restarting it", self.name)
            try:
                thread = self._start_worker()
            except Exception:
                log.exception("could not restart the %s encoder worker", self.name)
                return False
            self._thread, self._dying = thread, False
            self.restarts += 1
            return True

    def submit(self, items: Sequence[T]) -> list[Future]:
        """Queue items; raises Overloaded instead of letting the queue grow past max_queue."""
        if self._closed:
            raise Overloaded(f"{self.name} encoder is shut down")
        if not self.ensure_alive():
            raise Overloaded(f"{self.name} encoder worker is not running")
        futures: list[Future] = [Future() for _ in items]
        self._queue.put_many(list(zip(items, futures, strict=True)), cap=self.max_queue)
        return futures

    async def encode(self, items: Sequence[T]) -> np.ndarray:
        """Encode items (batched with other requests' items); rows in input order.

        Long lists go in chunks of ``self.chunk``, each awaited (with its own timeout) before the next.
        """
        if not items:
            raise ValueError("nothing to encode")
        parts = [await self._encode_chunk(items[i : i + self.chunk]) for i in range(0, len(items), self.chunk)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def encode_blocking(self, items: Sequence[T]) -> np.ndarray:
        """``encode`` for a worker thread (never the event loop): it waits on the rows itself, so a request that
        prepares, encodes and scores in one worker thread pays no trips through the event loop in between."""
        if not items:
            raise ValueError("nothing to encode")
        parts = [self._wait_chunk(items[i : i + self.chunk]) for i in range(0, len(items), self.chunk)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _wait_chunk(self, items: Sequence[T]) -> np.ndarray:
        futures = self.submit(items)
        _, pending = concurrent.futures.wait(futures, timeout=self.timeout_s)
        if pending:
            for f in futures:
                f.cancel()
            raise Overloaded(f"encoder did not answer within {self.timeout_s:g} s")
        return np.stack([f.result() for f in futures])

    async def _encode_chunk(self, items: Sequence[T]) -> np.ndarray:
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
            batch = self._gather()
            if batch is None:
                return
            self._process(batch)

    def _gather(self) -> list[tuple[T, Future]] | None:
        """The next batch: the first queued item plus whatever arrives within max_wait_s; None on stop."""
        first = self._queue.get()
        if first is _STOP:
            return None
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            timeout = deadline - time.monotonic()
            try:
                nxt = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                self._queue.put(_STOP)
                break
            batch.append(nxt)
        return batch

    def _process(self, batch: list[tuple[T, Future]]) -> None:
        live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            out = self._encode([item for item, _ in live])
            if len(out) != len(live):
                raise RuntimeError(f"{self.name} encoder returned {len(out)} rows for {len(live)} inputs")
        except Exception as exc:  # hand the failure to every waiting request; the worker carries on
            log.exception("%s encoder failed on a batch of %d", self.name, len(live))
            for _, fut in live:
                _settle(fut, exc=exc)
            return
        except BaseException as exc:  # the thread ends: fail the batch first, so nobody waits for it
            self._dying = True
            died = Overloaded(f"{self.name} encoder worker died ({exc!r}); it restarts on the next request")
            for _, fut in live:
                _settle(fut, exc=died)
            raise
        if self._on_batch:
            try:
                self._on_batch(len(live))
            except Exception:
                log.exception("%s on_batch hook failed", self.name)
        for (_, fut), row in zip(live, out, strict=True):
            _settle(fut, row)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout=5)
