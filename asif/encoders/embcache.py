"""On-disk cache of embeddings, keyed by encoder identity and input (file path+size+mtime, or text).

One SQLite file per encoder identity under ``$ASIF_CACHE_DIR/embeddings`` (default
``~/.cache/asif/embeddings``), so an evaluation sweep costs one embedding pass.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from asif.encoders.base import EncoderIdentity, cache_root


def default_cache_dir() -> Path:
    """``$ASIF_CACHE_DIR/embeddings`` (default ``~/.cache/asif/embeddings``)."""
    return cache_root("embeddings")


def file_key(path: Path) -> str:
    st = path.stat()
    return f"file:{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def text_key(text: str) -> str:
    return "text:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    def __init__(self, identity: EncoderIdentity, root: Path | None = None) -> None:
        root = root or default_cache_dir()
        root.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(json.dumps(identity.to_dict(), sort_keys=True).encode()).hexdigest()[:20]
        self.dim = identity.dim
        self.path = root / f"{identity.name.replace('/', '_')}-{digest}.sqlite"
        self._db = sqlite3.connect(str(self.path))
        self._db.execute("CREATE TABLE IF NOT EXISTS emb (key TEXT PRIMARY KEY, vec BLOB NOT NULL)")

    def get(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, embeddings with zeros where missing)."""
        out = np.zeros((len(keys), self.dim), dtype=np.float32)
        found = np.zeros(len(keys), dtype=bool)
        pos = {k: i for i, k in enumerate(keys)}
        key_list = list(pos)
        for start in range(0, len(key_list), 500):
            chunk = key_list[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, blob in self._db.execute(f"SELECT key, vec FROM emb WHERE key IN ({marks})", chunk):
                i = pos[key]
                out[i] = np.frombuffer(blob, dtype=np.float32)
                found[i] = True
        # duplicated keys share the first occurrence's row
        for i, k in enumerate(keys):
            if not found[i] and found[pos[k]]:
                out[i], found[i] = out[pos[k]], True
        return found, out

    def put(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO emb (key, vec) VALUES (?, ?)",
                ((k, np.ascontiguousarray(v, dtype=np.float32).tobytes()) for k, v in zip(keys, vectors, strict=True)),
            )

    def embed(
        self,
        keys: Sequence[str],
        compute: Callable[[list[int]], np.ndarray],
        chunk: int = 256,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Embeddings for all keys; missing ones are computed (by index) in chunks and stored."""
        found, out = self.get(keys)
        if progress:
            progress(int(found.sum()))
        todo = [i for i in np.flatnonzero(~found)]
        for start in range(0, len(todo), chunk):
            idx = todo[start : start + chunk]
            vecs = compute(idx)
            out[idx] = vecs
            self.put([keys[i] for i in idx], vecs)
            if progress:
                progress(len(idx))
        return out

    def close(self) -> None:
        self._db.close()
