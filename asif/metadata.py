"""Pair metadata in SQLite: id, image reference, captions, and one small thumbnail per image."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY,
    image TEXT NOT NULL,
    captions TEXT NOT NULL  -- JSON list: one caption, or all captions of a per-image anchor
);
CREATE TABLE IF NOT EXISTS thumbnails (
    image TEXT PRIMARY KEY,
    jpeg BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class PairRecord:
    id: int
    image: str
    captions: list[str]

    @property
    def caption(self) -> str:
        """Display text: the caption, or a per-image anchor's captions joined by ' | '."""
        return " | ".join(self.captions)


class PairMetadata:
    """Thread-safe access to one metadata database file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def insert_pairs(self, rows: Iterable[tuple[int, str, Sequence[str]]]) -> None:
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO pairs (id, image, captions) VALUES (?, ?, ?)",
                ((int(i), img, json.dumps(list(caps), ensure_ascii=False)) for i, img, caps in rows),
            )

    def insert_thumbnails(self, rows: Iterable[tuple[str, bytes]]) -> None:
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO thumbnails (image, jpeg) VALUES (?, ?)", rows)

    def delete_pairs(self, ids: Sequence[int]) -> int:
        with self._lock, self._db:
            self._db.execute("BEGIN")
            cur = self._db.executemany("DELETE FROM pairs WHERE id = ?", ((int(i),) for i in ids))
            return cur.rowcount

    def get(self, pair_id: int) -> PairRecord | None:
        with self._lock:
            row = self._db.execute("SELECT id, image, captions FROM pairs WHERE id = ?", (int(pair_id),)).fetchone()
        return PairRecord(row[0], row[1], json.loads(row[2])) if row else None

    def captions(self, ids: Sequence[int]) -> dict[int, str]:
        """Display caption per id, for explanations (unknown ids are absent)."""
        out: dict[int, str] = {}
        ids = [int(i) for i in ids]
        with self._lock:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for pid, caps in self._db.execute(f"SELECT id, captions FROM pairs WHERE id IN ({marks})", chunk):
                    out[pid] = " | ".join(json.loads(caps))
        return out

    def thumbnail(self, image: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT jpeg FROM thumbnails WHERE image = ?", (image,)).fetchone()
        return bytes(row[0]) if row else None

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0])

    def ids(self) -> list[int]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT id FROM pairs ORDER BY id")]

    def page(self, after: int = -1, limit: int = 100) -> list[PairRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, image, captions FROM pairs WHERE id > ? ORDER BY id LIMIT ?", (int(after), int(limit))
            ).fetchall()
        return [PairRecord(r[0], r[1], json.loads(r[2])) for r in rows]

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None
