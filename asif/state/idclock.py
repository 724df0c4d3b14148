"""Ids without coordination, for pairs and label-set versions in a shared (Milvus) model.

**Pair ids without coordination**: ``ms << 22 | tag << 6 | counter`` (``IdClock``): the milliseconds since 2024, a
16-bit tag drawn at random by each process, and a counter (64 per millisecond). Only their uniqueness matters:
nothing is ordered by them, so a replica's clock may be off. ``asif build --store milvus`` numbers the pairs it
loads 0..n-1, below every clock id.
"""

from __future__ import annotations

import secrets
import threading
import time

from asif.state import faults

EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z


def now_ms() -> int:
    """Wall-clock milliseconds (with the offset a fault-injection test may set)."""
    return int((time.time() + faults.clock_offset_s()) * 1000)


class IdClock:
    """Time-ordered 63-bit ids: ``ms << 22 | tag << 6 | counter`` (see the module doc)."""

    def __init__(self, tag: int | None = None) -> None:
        self.tag = secrets.randbelow(1 << 16) if tag is None else int(tag) & 0xFFFF
        self._lock = threading.Lock()
        self._ms = 0
        self._count = 0

    def take(self, n: int) -> list[int]:
        out = []
        with self._lock:
            for _ in range(n):
                now = now_ms() - EPOCH_MS
                if now > self._ms:
                    self._ms, self._count = now, 0
                elif self._count >= 64:  # this millisecond is used up (or the clock went back): the next one
                    self._ms, self._count = self._ms + 1, 0
                out.append(self._ms << 22 | self.tag << 6 | self._count)
                self._count += 1
        return out

    @staticmethod
    def ms_of(ident: int) -> int:
        return int(ident) >> 22
