"""Exact anchor vectors by pair id, for re-ranking IVF-PQ candidates.

A dense table with a id -> row array (pair ids are assigned by the service, 0, 1, 2, ...), so
lookups of thousands of candidates are one vectorised gather, adds append, and removes move the
last row into the hole: O(dim) per removed id, never a shift of the whole table (FAISS's
IDMap2 over a Flat index moves every later vector on each removal: ~1 s per delete at 1M pairs).
"""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np

DTYPES = {"Flat": np.float32, "SQfp16": np.float16}


class VectorTable:
    def __init__(self, dim: int, kind: str = "Flat") -> None:
        if kind not in DTYPES:
            raise ValueError(f"unknown re-ranking store {kind!r}; choose one of {', '.join(DTYPES)}")
        self.dim = dim
        self.kind = kind
        self.vectors = np.zeros((0, dim), dtype=DTYPES[kind])
        self.ids = np.zeros(0, dtype=np.int64)
        self.row_of = np.full(0, -1, dtype=np.int64)  # pair id -> row, -1 when absent
        self.n = 0
        self.extra: dict[str, np.ndarray] = {}  # other arrays of the file read

    @property
    def ntotal(self) -> int:
        return self.n

    def nbytes(self) -> int:
        return int(self.vectors[: self.n].nbytes + self.ids[: self.n].nbytes + self.row_of.nbytes)

    def _reserve(self, rows: int, max_id: int) -> None:
        if rows > len(self.vectors):
            cap = max(rows, 2 * len(self.vectors), 1024)
            grown = np.zeros((cap, self.dim), dtype=self.vectors.dtype)
            grown[: self.n] = self.vectors[: self.n]
            ids = np.zeros(cap, dtype=np.int64)
            ids[: self.n] = self.ids[: self.n]
            self.vectors, self.ids = grown, ids
        if max_id >= len(self.row_of):
            cap = max(max_id + 1, 2 * len(self.row_of), 1024)
            row_of = np.full(cap, -1, dtype=np.int64)
            row_of[: len(self.row_of)] = self.row_of
            self.row_of = row_of

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        if ids.min() < 0:
            raise ValueError("pair ids must be non-negative")
        self._reserve(self.n + len(ids), int(ids.max()))
        rows = np.arange(self.n, self.n + len(ids))
        self.vectors[rows] = vectors
        self.ids[rows] = ids
        self.row_of[ids] = rows
        self.n += len(ids)

    def remove(self, ids: np.ndarray) -> None:
        for pid in np.asarray(ids, dtype=np.int64):
            if pid >= len(self.row_of) or self.row_of[pid] < 0:
                continue
            row, last = self.row_of[pid], self.n - 1
            if row != last:
                moved = self.ids[last]
                self.vectors[row] = self.vectors[last]
                self.ids[row] = moved
                self.row_of[moved] = row
            self.row_of[pid] = -1
            self.n -= 1

    def get(self, ids: np.ndarray) -> np.ndarray:
        """float32 vectors of the given ids (all must be present)."""
        ids = np.asarray(ids, dtype=np.int64)
        rows = self.row_of[ids]
        if (rows < 0).any():
            raise KeyError(f"ids not in the table: {ids[rows < 0][:10].tolist()}")
        return self.vectors[rows].astype(np.float32, copy=False)

    def inner_products(self, ids: np.ndarray, x: np.ndarray) -> np.ndarray:
        """(b, f) inner products of query row i with the vectors of ids[i] (all present), float32.

        float32 tables use FAISS's ``fvec_inner_products_by_idx``, which reads the rows in place:
        gathering 4,000 rows of 1280 floats first (20 MB) took longer than the products themselves.
        """
        ids = np.asarray(ids, dtype=np.int64)
        rows = self.row_of[ids]
        if (rows < 0).any():
            raise KeyError(f"ids not in the table: {ids[rows < 0][:10].tolist()}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.vectors.dtype != np.float32:
            return np.einsum("bfd,bd->bf", self.vectors[rows].astype(np.float32), x)
        rows = np.ascontiguousarray(rows)
        out = np.empty(rows.shape, dtype=np.float32)
        faiss.fvec_inner_products_by_idx(
            faiss.swig_ptr(out),
            faiss.swig_ptr(x),
            faiss.swig_ptr(self.vectors),
            faiss.swig_ptr(rows),
            self.dim,
            rows.shape[0],
            rows.shape[1],
        )
        return out

    def all(self) -> tuple[np.ndarray, np.ndarray]:
        """(float32 vectors, ids) of every stored row, in row order."""
        return self.vectors[: self.n].astype(np.float32, copy=False), self.ids[: self.n]

    def any_id(self) -> int:
        """Some stored id (for padding a gather); the table must not be empty."""
        if self.n == 0:
            raise KeyError("the table is empty")
        return int(self.ids[0])

    def write(self, path: Path, **extra: np.ndarray) -> None:
        """Save ids, vectors and any extra named arrays (read back into ``extra``), atomically."""
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, ids=self.ids[: self.n], vectors=self.vectors[: self.n], **extra)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path, dim: int, kind: str) -> VectorTable:
        table = cls(dim, kind)
        with np.load(path, allow_pickle=False) as z:
            ids, vectors = z["ids"], z["vectors"]
            table.extra = {name: z[name] for name in z.files if name not in ("ids", "vectors")}
        if vectors.ndim != 2 or vectors.shape[1] != dim or len(ids) != len(vectors):
            raise ValueError(f"{path}: vectors of shape {vectors.shape} for {len(ids)} ids, expected dim {dim}")
        table.add(ids, vectors)
        return table
