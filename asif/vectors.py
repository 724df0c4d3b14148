"""Exact anchor vectors by pair id, for re-ranking IVF-PQ candidates.

Rows live in fixed-size blocks (65,536 rows each) with an id -> row array (pair ids are assigned by the
service, 0, 1, 2, ...), so:

- lookups of thousands of candidates are one vectorised pass per block touched;
- adds fill the last block and start a new one when it is full: growing never copies the table (a
  single array doubled on growth copied 5 GB, ~12 s, on the first add after loading 1M 1280-d vectors);
- removes move the last row into the hole: O(dim) per removed id, never a shift of the whole table
  (FAISS's IDMap2 over a Flat index moves every later vector on each removal: ~1 s per delete at 1M pairs).

Files are ``.npz`` archives (``ids``, ``vectors`` and any extra arrays), written and read block by block,
so saving or loading never holds a second copy of the table.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import faiss
import numpy as np

DTYPES = {"Flat": np.float32, "SQfp16": np.float16}
BLOCK_SHIFT = 16
BLOCK_ROWS = 1 << BLOCK_SHIFT


class VectorTable:
    def __init__(self, dim: int, kind: str = "Flat") -> None:
        if kind not in DTYPES:
            raise ValueError(f"unknown re-ranking store {kind!r}; choose one of {', '.join(DTYPES)}")
        self.dim = dim
        self.kind = kind
        self.dtype = np.dtype(DTYPES[kind])
        self.blocks: list[np.ndarray] = []  # each (BLOCK_ROWS, dim)
        self.ids = np.zeros(0, dtype=np.int64)  # row -> pair id
        self.row_of = np.full(0, -1, dtype=np.int64)  # pair id -> row, -1 when absent
        self.n = 0
        self.extra: dict[str, np.ndarray] = {}  # other arrays of the file read

    @property
    def ntotal(self) -> int:
        return self.n

    def nbytes(self) -> int:
        return int(self.n * self.dim * self.dtype.itemsize + self.ids[: self.n].nbytes + self.row_of.nbytes)

    def _reserve(self, rows: int, max_id: int) -> None:
        while len(self.blocks) * BLOCK_ROWS < rows:
            self.blocks.append(np.zeros((BLOCK_ROWS, self.dim), dtype=self.dtype))
        if rows > len(self.ids):  # 8 bytes a row: doubling these is cheap
            ids = np.zeros(max(rows, 2 * len(self.ids), 1024), dtype=np.int64)
            ids[: self.n] = self.ids[: self.n]
            self.ids = ids
        if max_id >= len(self.row_of):
            row_of = np.full(max(max_id + 1, 2 * len(self.row_of), 1024), -1, dtype=np.int64)
            row_of[: len(self.row_of)] = self.row_of
            self.row_of = row_of

    def _put_rows(self, start: int, vectors: np.ndarray) -> None:
        """Write consecutive rows from ``start``, block by block."""
        done = 0
        while done < len(vectors):
            row = start + done
            block, offset = row >> BLOCK_SHIFT, row & (BLOCK_ROWS - 1)
            take = min(len(vectors) - done, BLOCK_ROWS - offset)
            self.blocks[block][offset : offset + take] = vectors[done : done + take]
            done += take

    def _lookup(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id (any shape), -1 where absent (negative and unknown ids included)."""
        ids = np.asarray(ids, dtype=np.int64)
        inside = (ids >= 0) & (ids < len(self.row_of))
        return np.where(inside, self.row_of[np.where(inside, ids, 0)], -1)

    def present(self, ids: np.ndarray) -> np.ndarray:
        """Whether each id (any shape) has a row."""
        return self._lookup(ids) >= 0

    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        rows = self._lookup(ids)
        if (rows < 0).any():
            raise KeyError(f"ids not in the table: {ids[rows < 0][:10].tolist()}")
        return rows

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        if ids.min() < 0:
            raise ValueError("pair ids must be non-negative")
        self._reserve(self.n + len(ids), int(ids.max()))
        self._put_rows(self.n, np.asarray(vectors))
        rows = np.arange(self.n, self.n + len(ids))
        self.ids[rows] = ids
        self.row_of[ids] = rows
        self.n += len(ids)

    def remove(self, ids: np.ndarray) -> None:
        for pid in np.asarray(ids, dtype=np.int64).tolist():
            if pid < 0 or pid >= len(self.row_of) or self.row_of[pid] < 0:
                continue
            row, last = int(self.row_of[pid]), self.n - 1
            if row != last:
                moved = int(self.ids[last])
                self.blocks[row >> BLOCK_SHIFT][row & (BLOCK_ROWS - 1)] = self.blocks[last >> BLOCK_SHIFT][
                    last & (BLOCK_ROWS - 1)
                ]
                self.ids[row] = moved
                self.row_of[moved] = row
            self.row_of[pid] = -1
            self.n -= 1

    def get(self, ids: np.ndarray) -> np.ndarray:
        """float32 vectors of the given ids (all must be present)."""
        return self._gather(self._rows_of(ids))

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        block = rows >> BLOCK_SHIFT
        for b in np.unique(block).tolist():
            sel = block == b
            out[sel] = self.blocks[b][rows[sel] & (BLOCK_ROWS - 1)]
        return out

    def inner_products(self, ids: np.ndarray, x: np.ndarray) -> np.ndarray:
        """(b, f) inner products of query row i with the vectors of ids[i] (all present), float32.

        float32 tables use FAISS's ``fvec_inner_products_by_idx``, which reads the rows in place (gathering
        4,000 rows of 1280 floats first took longer than the products themselves), one call per block
        touched; other rows of the call are ``-1`` and skipped.
        """
        rows = self._rows_of(ids)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.dtype != np.float32:
            return np.einsum("bfd,bd->bf", self._gather(rows.ravel()).reshape(*rows.shape, self.dim), x)
        out = np.empty(rows.shape, dtype=np.float32)
        block = rows >> BLOCK_SHIFT
        local = rows & (BLOCK_ROWS - 1)
        blocks_touched = np.unique(block).tolist()
        part = np.empty(rows.shape, dtype=np.float32)
        for b in blocks_touched:
            idx = local if len(blocks_touched) == 1 else np.where(block == b, local, -1)
            idx = np.ascontiguousarray(idx, dtype=np.int64)
            target = out if len(blocks_touched) == 1 else part
            faiss.fvec_inner_products_by_idx(
                faiss.swig_ptr(target),
                faiss.swig_ptr(x),
                faiss.swig_ptr(self.blocks[b]),
                faiss.swig_ptr(idx),
                self.dim,
                rows.shape[0],
                rows.shape[1],
            )
            if target is part:
                np.copyto(out, part, where=block == b)
        return out

    def all(self) -> tuple[np.ndarray, np.ndarray]:
        """(float32 vectors, ids) of every stored row, in row order (a copy: for small tables)."""
        if self.n == 0:
            return np.zeros((0, self.dim), dtype=np.float32), self.ids[:0]
        used = self.blocks[: (self.n + BLOCK_ROWS - 1) >> BLOCK_SHIFT]
        vectors = np.concatenate(used)[: self.n].astype(np.float32, copy=False)
        return vectors, self.ids[: self.n]

    def any_id(self) -> int:
        """Some stored id (for padding a gather); the table must not be empty."""
        if self.n == 0:
            raise KeyError("the table is empty")
        return int(self.ids[0])

    def write(self, path: Path, **extra: np.ndarray) -> None:
        """Save ids, vectors and any extra named arrays (read back into ``extra``), atomically, as ``.npz``."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                _write_npy(zf, "ids", self.ids[: self.n])
                with zf.open("vectors.npy", "w", force_zip64=True) as member:
                    header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False}
                    np.lib.format.write_array_header_2_0(member, {**header, "shape": (self.n, self.dim)})
                    for start in range(0, self.n, BLOCK_ROWS):
                        # A view, not tobytes(): copying a 335 MB block held the GIL for ~300 ms.
                        rows = self.blocks[start >> BLOCK_SHIFT][: min(BLOCK_ROWS, self.n - start)]
                        member.write(memoryview(rows).cast("B"))
                for name, arr in extra.items():
                    _write_npy(zf, name, np.asarray(arr))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path, dim: int, kind: str) -> VectorTable:
        table = cls(dim, kind)
        with zipfile.ZipFile(path) as zf:
            names = {n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")}
            if not {"ids", "vectors"} <= names:
                raise ValueError(f"{path}: not a vector table (arrays {sorted(names)})")
            with zf.open("ids.npy") as member:
                ids = np.lib.format.read_array(member, allow_pickle=False)
            table.extra = {}
            for name in sorted(names - {"ids", "vectors"}):
                with zf.open(f"{name}.npy") as member:
                    table.extra[name] = np.lib.format.read_array(member, allow_pickle=False)
            with zf.open("vectors.npy") as member:
                version = np.lib.format.read_magic(member)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(member)
                if len(shape) != 2 or shape[1] != dim or shape[0] != len(ids) or fortran:
                    raise ValueError(f"{path}: vectors of shape {shape} for {len(ids)} ids, expected dim {dim}")
                for start in range(0, len(ids), BLOCK_ROWS):
                    rows = min(BLOCK_ROWS, len(ids) - start)
                    chunk = np.frombuffer(_read_exact(member, rows * dim * dtype.itemsize), dtype=dtype)
                    table.add(ids[start : start + rows], chunk.reshape(rows, dim))
        return table


def _write_npy(zf: zipfile.ZipFile, name: str, arr: np.ndarray) -> None:
    with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)


def _read_exact(fh, size: int) -> bytes:
    data = fh.read(size)
    if len(data) != size:
        raise ValueError("truncated vector table")
    return data
