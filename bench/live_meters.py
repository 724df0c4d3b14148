"""What the live-traffic bench measures: the classify requests (read-lock wait, thread CPU time) and their
per-phase summary, and meters of the model's background jobs and of the interpreter's garbage collections."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from asif.serving.labels import CachedLabels
from asif.serving.live import LiveModel
from asif.serving.rwlock import RWLock
from bench.measure import percentiles
from bench.synthetic_index import K, P

Sample = tuple[float, float, float, float]  # classify request: start, end, read-lock wait, thread CPU seconds


class LockTimer:
    """Records, per thread, how long the last acquisition of a readers-writer lock waited.

    It wraps the read and write methods of the lock instance itself, so every holder of the lock (including
    references to its methods taken earlier, such as the model's guard) keeps using the one lock.
    """

    def __init__(self, lock: RWLock) -> None:
        self.local = threading.local()
        read, write = lock.read, lock.write

        @contextmanager
        def timed_read() -> Iterator[None]:
            t = time.perf_counter()
            with read():
                self.local.read_wait = time.perf_counter() - t
                yield

        @contextmanager
        def timed_write() -> Iterator[None]:
            t = time.perf_counter()
            with write():
                self.local.write_wait = time.perf_counter() - t
                yield

        lock.read = timed_read  # type: ignore[method-assign]
        lock.write = timed_write  # type: ignore[method-assign]

    def last_read_wait(self) -> float:
        return float(getattr(self.local, "read_wait", 0.0))

    def last_write_wait(self) -> float:
        return float(getattr(self.local, "write_wait", 0.0))


class BackgroundMeter:
    """Counts and times the jobs the model hands to its background executor (registered label sets catching
    up with edits, label-scorer rebuilds)."""

    def __init__(self, live: LiveModel) -> None:
        self.took: list[float] = []
        self._inner = live.model.schedule
        live.model.schedule = self.schedule

    def schedule(self, job: Callable[[], None]) -> None:
        def timed() -> None:
            t = time.perf_counter()
            try:
                job()
            finally:
                self.took.append(time.perf_counter() - t)

        if self._inner is None:
            timed()
        else:
            self._inner(timed)

    def since(self, mark: int) -> dict[str, float]:
        took = self.took[mark:]
        return {"jobs": len(took), "busy_s": float(sum(took)), "mean_ms": 1000 * float(np.mean(took)) if took else 0.0}


class GcMeter:
    """Times the interpreter's garbage collections (every thread waits while one runs: it holds the GIL)."""

    def __init__(self) -> None:
        self.events: list[tuple[int, float]] = []  # (generation, seconds)
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.events.append((int(info["generation"]), time.perf_counter() - self._start))

    def close(self) -> None:
        gc.callbacks.remove(self._callback)

    def since(self, mark: int) -> dict[str, dict[str, float]]:
        out = {}
        for g in (0, 1, 2):
            took = [t for gen, t in self.events[mark:] if gen == g]
            out[f"gen{g}"] = {
                "collections": len(took),
                "total_ms": 1000 * sum(took),
                "max_ms": 1000 * max(took, default=0),
            }
        return out


class Classifier:
    """Single-image classification against one stored label set, recording each request."""

    def __init__(self, live: LiveModel, lock: LockTimer, labels: CachedLabels, queries: np.ndarray) -> None:
        self.live = live
        self.lock = lock
        self.labels = labels
        self.queries = queries
        self.i = 0

    def once(self) -> Sample:
        """(start, end, read-lock wait, this thread's CPU time) of one request."""
        q = self.queries[self.i % len(self.queries)][None, :]
        self.i += 1
        cpu = time.thread_time()
        t = time.perf_counter()
        self.live.classify(q, self.labels, k=K, p=P, top=5)
        end = time.perf_counter()
        return t, end, self.lock.last_read_wait(), time.thread_time() - cpu

    def run(self, count: int, until: Callable[[], bool] | None = None) -> list[Sample]:
        """``count`` requests, or (with ``until``) requests until it returns True, at least one."""
        out = []
        while True:
            out.append(self.once())
            if (until is None and len(out) >= count) or (until is not None and until()):
                return out


def phase_summary(samples: list[Sample], edits: Sequence[tuple[float, float]] = ()) -> dict[str, Any]:
    """Latency percentiles split into read-lock wait, the thread's CPU time and the rest (off CPU: waiting for
    the GIL, another lock or a core), and the requests an edit overlapped against the others."""
    arr = np.asarray(samples, dtype=np.float64).reshape(-1, 4)
    lat, wait, cpu = arr[:, 1] - arr[:, 0], arr[:, 2], arr[:, 3]
    out: dict[str, Any] = {
        "latency": percentiles(lat),
        "read_lock_wait": percentiles(wait),
        "latency_minus_lock_wait": percentiles(lat - wait),
        "thread_cpu": percentiles(cpu),
        "off_cpu_minus_lock_wait": percentiles(np.maximum(lat - wait - cpu, 0.0)),
    }
    if len(edits):
        e = np.asarray(edits, dtype=np.float64)
        order = np.argsort(e[:, 0])
        starts, ends = e[order, 0], np.maximum.accumulate(e[order, 1])
        # A request [s, t] overlaps an edit iff some edit started before t and ended after s.
        last = np.searchsorted(starts, arr[:, 1], side="right") - 1
        hit = (last >= 0) & (ends[np.maximum(last, 0)] > arr[:, 0])
        out["overlapped_by_edit"] = {
            "fraction": float(hit.mean()),
            "overlapped": percentiles(lat[hit]),
            "clear": percentiles(lat[~hit]),
        }
    return out
