"""Pair metadata in SQLite: id, image reference, captions, and one small thumbnail per image."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY,
    image TEXT NOT NULL,
    captions TEXT NOT NULL  -- JSON list: one caption, or all captions of a per-image anchor
);
-- Which pairs show an image: deleting a pair drops its image's thumbnail only when no other pair uses it.
CREATE INDEX IF NOT EXISTS pairs_image ON pairs (image);
CREATE TABLE IF NOT EXISTS thumbnails (
    image TEXT PRIMARY KEY,
    jpeg BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- Edit log: every live add/delete since the last snapshot, with the vectors, replayed on load.
CREATE TABLE IF NOT EXISTS edits (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL CHECK (op IN ('add', 'delete')),
    pair_id INTEGER NOT NULL,
    image_vec BLOB,
    text_vec BLOB
);
CREATE TABLE IF NOT EXISTS label_sets (
    name TEXT PRIMARY KEY,
    classes TEXT NOT NULL,
    templates TEXT NOT NULL,
    embeddings BLOB NOT NULL
);
"""


@dataclass(frozen=True)
class NewPair:
    """A pair to add live: its reference, captions, thumbnail and embeddings."""

    image: str
    captions: list[str]
    thumbnail: bytes | None
    image_vec: np.ndarray
    text_vec: np.ndarray


@dataclass(frozen=True)
class Edit:
    seq: int
    op: str
    pair_id: int
    image_vec: np.ndarray | None
    text_vec: np.ndarray | None


@dataclass(frozen=True)
class StoredLabelSet:
    name: str
    classes: list[str]
    templates: list[str]
    embeddings: np.ndarray
    version: int = 0  # shared (Milvus) label sets: which write of the set these rows are


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

    # -- live edits (the edit log) ----------------------------------------------------------------
    def log_add(self, pairs: Sequence[NewPair]) -> list[int]:
        """Assign ids and durably record new pairs (rows, thumbnails, edit log) in one transaction."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT value FROM meta WHERE key = 'next_pair_id'").fetchone()
            first = int(row[0]) if row else 0
            ids = list(range(first, first + len(pairs)))
            for pid, pair in zip(ids, pairs, strict=True):
                self._db.execute(
                    "INSERT INTO pairs (id, image, captions) VALUES (?, ?, ?)",
                    (pid, pair.image, json.dumps(list(pair.captions), ensure_ascii=False)),
                )
                if pair.thumbnail:
                    self._db.execute(
                        "INSERT OR REPLACE INTO thumbnails (image, jpeg) VALUES (?, ?)", (pair.image, pair.thumbnail)
                    )
                self._db.execute(
                    "INSERT INTO edits (op, pair_id, image_vec, text_vec) VALUES ('add', ?, ?, ?)",
                    (pid, _blob(pair.image_vec), _blob(pair.text_vec)),
                )
            self._db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('next_pair_id', ?)", (str(first + len(pairs)),)
            )
        return ids

    def log_delete(self, ids: Sequence[int]) -> None:
        """Durably delete pairs (rows, orphaned thumbnails) and record the deletes in the edit log."""
        self._remove_pairs(ids, "INSERT INTO edits (op, pair_id) VALUES ('delete', ?)")

    def revert_add(self, ids: Sequence[int]) -> None:
        """Undo a logged add whose apply failed: its pair rows and edit-log entries go (ids stay used)."""
        self._remove_pairs(ids, "DELETE FROM edits WHERE op = 'add' AND pair_id = ?")

    def _remove_pairs(self, ids: Sequence[int], edit_log_sql: str) -> None:
        """In one transaction: delete the pairs' rows, run ``edit_log_sql`` (one ``?``: the pair id) per pair, and
        drop the thumbnails no remaining pair shows."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            images = self._images_of(ids)
            for pid in ids:
                self._db.execute("DELETE FROM pairs WHERE id = ?", (int(pid),))
                self._db.execute(edit_log_sql, (int(pid),))
            self._drop_orphan_thumbnails(images)

    def _images_of(self, ids: Sequence[int]) -> set[str]:
        rows = (self._db.execute("SELECT image FROM pairs WHERE id = ?", (int(i),)).fetchone() for i in ids)
        return {row[0] for row in rows if row}

    def _drop_orphan_thumbnails(self, images: set[str]) -> None:
        """Thumbnails of these images that no pair shows any more (indexed lookups: no scan of the pairs)."""
        for image in images:
            if self._db.execute("SELECT 1 FROM pairs WHERE image = ? LIMIT 1", (image,)).fetchone() is None:
                self._db.execute("DELETE FROM thumbnails WHERE image = ?", (image,))

    def edits_after(self, seq: int, upto: int | None = None) -> list[Edit]:
        """Edit-log entries with ``seq < s <= upto`` (no upper bound when ``upto`` is None), in order."""
        top = 2**63 - 1 if upto is None else int(upto)
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, op, pair_id, image_vec, text_vec FROM edits WHERE seq > ? AND seq <= ? ORDER BY seq",
                (int(seq), top),
            ).fetchall()
        return [Edit(r[0], r[1], r[2], _array(r[3]), _array(r[4])) for r in rows]

    def last_seq(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(seq) FROM edits").fetchone()
            if row[0] is not None:
                return int(row[0])
            # All edits compacted away: AUTOINCREMENT keeps counting in sqlite_sequence.
            seq = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'edits'").fetchone()
        return int(seq[0]) if seq else 0

    def compact_log(self, upto_seq: int) -> None:
        """Drop edits already contained in a committed snapshot."""
        with self._lock:
            self._db.execute("DELETE FROM edits WHERE seq <= ?", (int(upto_seq),))

    # -- stored label sets -------------------------------------------------------------------------
    def put_label_set(self, stored: StoredLabelSet) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO label_sets (name, classes, templates, embeddings) VALUES (?, ?, ?, ?)",
                (
                    stored.name,
                    json.dumps(stored.classes, ensure_ascii=False),
                    json.dumps(stored.templates, ensure_ascii=False),
                    _blob(np.ascontiguousarray(stored.embeddings, dtype=np.float32)),
                ),
            )

    def label_sets(self) -> list[StoredLabelSet]:
        with self._lock:
            rows = self._db.execute("SELECT name, classes, templates, embeddings FROM label_sets ORDER BY name")
            out = []
            for name, classes, templates, emb in rows.fetchall():
                cls = json.loads(classes)
                out.append(StoredLabelSet(name, cls, json.loads(templates), _array(emb).reshape(len(cls), -1)))
        return out

    def delete_label_set(self, name: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM label_sets WHERE name = ?", (name,)).rowcount > 0


def _blob(vec: np.ndarray) -> bytes:
    return np.ascontiguousarray(vec, dtype=np.float32).tobytes()


def _array(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, dtype=np.float32).copy()
