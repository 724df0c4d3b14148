"""The load the live-traffic bench puts on the model beside classification: single-pair edits, and the background
threads that issue them at a fixed rate, take snapshots back to back, or run a compaction."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from asif.serving.live import LiveModel
from asif.state.metadata import NewPair
from asif.tuning.synthetic import SyntheticWorld
from bench.live_meters import LockTimer
from bench.measure import percentiles

FRESH_PAIRS = 4_096  # pre-generated pairs the adds draw from (cycled)


# -- traffic ---------------------------------------------------------------------------------------------
class Editor:
    """Alternating single-pair edits: add a fresh pair, delete a random existing id."""

    def __init__(self, live: LiveModel, lock: LockTimer, n: int, world: SyntheticWorld, seed: int) -> None:
        self.live = live
        self.lock = lock
        self.alive = list(range(n))  # the ids held (swap-removed on delete)
        self.rng = np.random.default_rng(seed)
        self.fresh_img, self.fresh_txt = world.anchors(FRESH_PAIRS)
        self.fresh = 0
        self.count = 0

    def add(self) -> tuple[float, float]:
        i = self.fresh % FRESH_PAIRS
        self.fresh += 1
        pair = NewPair(
            f"live{self.fresh}.jpg", [f"live caption {self.fresh}"], None, self.fresh_img[i], self.fresh_txt[i]
        )
        t = time.perf_counter()
        ids = self.live.add_pairs([pair])
        took = time.perf_counter() - t
        self.alive.extend(ids)
        return took, self.lock.last_write_wait()

    def delete(self) -> tuple[float, float]:
        j = int(self.rng.integers(len(self.alive)))
        victim = self.alive[j]
        self.alive[j] = self.alive[-1]
        self.alive.pop()
        t = time.perf_counter()
        done = self.live.delete_pairs([victim])
        took = time.perf_counter() - t
        assert done == [victim], (done, victim)
        return took, self.lock.last_write_wait()

    def step(self) -> tuple[str, float, float]:
        """One edit (add on even counts, delete on odd); returns (op, seconds, seconds waiting for the lock)."""
        op = "add" if self.count % 2 == 0 else "delete"
        self.count += 1
        took, wait = self.add() if op == "add" else self.delete()
        return op, took, wait


class Background(threading.Thread):
    """A daemon loop run until stop(); its first exception is re-raised by stop()."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def body(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        try:
            self.body()
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> None:
        self.halt.set()
        self.join()
        if self.error is not None:
            raise RuntimeError(f"{self.name} failed") from self.error


class EditStream(Background):
    """Edits at a fixed rate (a late edit is issued at once, then the schedule resumes)."""

    def __init__(self, editor: Editor, rate: float) -> None:
        super().__init__("edits")
        self.editor = editor
        self.rate = rate
        self.intervals: list[tuple[float, float]] = []
        self.latency: dict[str, list[float]] = {"add": [], "delete": []}
        self.lock_wait: list[float] = []

    def body(self) -> None:
        t0 = time.perf_counter()
        i = 0
        while not self.halt.is_set():
            delay = t0 + i / self.rate - time.perf_counter()
            if delay > 0 and self.halt.wait(delay):
                break
            s = time.perf_counter()
            op, took, wait = self.editor.step()
            self.intervals.append((s, time.perf_counter()))
            self.latency[op].append(took)
            self.lock_wait.append(wait)
            i += 1

    @staticmethod
    def pooled(streams: Sequence[EditStream]) -> dict[str, Any]:
        """Edit counts, rate and latencies over several streams (the rounds of one phase)."""
        gaps = sum(len(s.intervals) - 1 for s in streams if len(s.intervals) > 1)
        span = sum(s.intervals[-1][1] - s.intervals[0][0] for s in streams if len(s.intervals) > 1)
        return {
            "edits": sum(len(s.intervals) for s in streams),
            "rate_per_s": gaps / span if span > 0 else float("nan"),
            "add": percentiles([t for s in streams for t in s.latency["add"]]),
            "delete": percentiles([t for s in streams for t in s.latency["delete"]]),
            "write_lock_wait": percentiles([t for s in streams for t in s.lock_wait]),
        }


class SnapshotLoop(Background):
    """``live.snapshot()`` back to back whenever an edit is pending (polling every millisecond otherwise: an
    empty snapshot spun in a tight loop would only measure a busy Python thread)."""

    def __init__(self, live: LiveModel) -> None:
        super().__init__("snapshots")
        self.live = live
        self.took: list[float] = []
        self.written: list[float] = []  # durations of the snapshots that wrote a delta
        self.edits = 0
        self.compacted = 0

    def body(self) -> None:
        while not self.halt.is_set():
            if self.live.pending_edits() == 0:
                self.halt.wait(0.001)
                continue
            t = time.perf_counter()
            info = self.live.snapshot()
            took = time.perf_counter() - t
            self.took.append(took)
            if info.edits:
                self.written.append(took)
                self.edits += info.edits
            self.compacted += int(info.compacted)

    @staticmethod
    def pooled(loops: Sequence[SnapshotLoop]) -> dict[str, Any]:
        """Snapshot counts and durations over several loops (the rounds of one phase)."""
        return {
            "snapshots": sum(len(s.took) for s in loops),
            "snapshots_writing_a_delta": sum(len(s.written) for s in loops),
            "edits_written": sum(s.edits for s in loops),
            "compactions": sum(s.compacted for s in loops),
            "all": percentiles([t for s in loops for t in s.took]),
            "writing": percentiles([t for s in loops for t in s.written]),
        }


class Compaction(Background):
    def __init__(self, live: LiveModel) -> None:
        super().__init__("compaction")
        self.live = live
        self.took = float("nan")

    def body(self) -> None:
        t = time.perf_counter()
        self.live.compact()
        self.took = time.perf_counter() - t
