"""The model's journal of recent edits: what label sets replay to catch up with the pairs added and removed since
the version they reflect (the ids, and the caption vectors of adds), bounded in bytes."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

JOURNAL_BYTES = 64 << 20  # recent edits kept for label sets to catch up (ids + caption vectors)


@dataclass(frozen=True)
class JournalEntry:
    """One edit, as label sets need it to catch up."""

    version: int
    op: str  # "add" or "remove"
    ids: np.ndarray
    vectors: np.ndarray | None  # caption vectors (an add's; a remove's when the store holds them exactly)
    n_before: int  # pairs held before the edit
    followed: bool = False  # made by another process: a label row may already hold the ids (built after it)

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes + (self.vectors.nbytes if self.vectors is not None else 0))


class EditJournal:
    """The last edits, oldest first, as many as fit in ``max_bytes`` (the newest is always kept); ``version`` is the
    newest edit's (0 before any). Read without the model's read lock (label upkeep): it has a lock of its own."""

    def __init__(self, max_bytes: int = JOURNAL_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self.version = 0  # bumped by every edit
        self._entries: deque[JournalEntry] = deque()
        self._size = 0
        self._lock = threading.Lock()

    def append(self, entry: JournalEntry) -> None:
        """Record an edit (its version becomes the current one) and forget the oldest beyond ``max_bytes``."""
        with self._lock:
            self.version = entry.version
            self._entries.append(entry)
            self._size += entry.nbytes
            while len(self._entries) > 1 and self._size > self.max_bytes:
                self._size -= self._entries.popleft().nbytes

    def since(self, synced: int) -> list[JournalEntry] | None:
        """The entries after version ``synced``, oldest first; None when the journal no longer holds them all."""
        with self._lock:
            if synced == self.version:
                return []
            if synced > self.version or not self._entries or self._entries[0].version > synced + 1:
                return None
            missed = []
            for entry in reversed(self._entries):  # the newest first: costs the edits missed, not the journal
                if entry.version <= synced:
                    break
                missed.append(entry)
            return missed[::-1]
