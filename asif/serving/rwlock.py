"""A phase-fair readers-writer lock: many concurrent searches, one edit at a time, neither side starves.

- Readers share the lock; a writer holds it alone.
- A reader that arrives while a writer holds the lock or waits for it waits for that writer to finish
  (a stream of searches never holds an edit off).
- When a writer finishes, every reader waiting at that moment gets in before the next writer
  (a stream of edits never holds searches off: a search waits for at most one edit).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class RWLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0
        self._waiting_readers = 0
        self._admitted = 0  # readers let in by the last writer to finish that have not entered yet
        self._phase = 0  # bumped each time a writer finishes
        self.longest_read_s = 0.0  # the longest a reader has held the lock
        self.on_read_hold: Callable[[float], None] | None = None  # told how long each read hold lasted (s)

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            if self._writer or self._waiting_writers:
                phase = self._phase
                self._waiting_readers += 1
                while self._writer or (self._waiting_writers and self._phase == phase):
                    self._cond.wait()
                self._waiting_readers -= 1
                if self._phase != phase:
                    self._admitted -= 1
            self._readers += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            held = time.perf_counter() - start
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()
                self.longest_read_s = max(self.longest_read_s, held)
            if self.on_read_hold is not None:
                self.on_read_hold(held)

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers or self._admitted:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._phase += 1
                self._admitted = self._waiting_readers
                self._cond.notify_all()
