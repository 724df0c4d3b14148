"""Anchor vectors by pair id, for re-ranking IVF-PQ candidates: exact (``Flat``, float32), half precision
(``SQfp16``), or compact codes of a trained FAISS codec (``SQ8``, ``SQ6``, ``SQ4``, or any FAISS standalone-codec
factory string such as ``PCAR256,SQ8``), decoded to float32 on lookup.

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
import struct
import zipfile
from pathlib import Path

import faiss
import numpy as np

DTYPES = {"Flat": np.float32, "SQfp16": np.float16}
NEAR_EXACT = frozenset(DTYPES)  # kinds whose vectors are (within float16 rounding) the vectors added
BLOCK_SHIFT = 16
BLOCK_ROWS = 1 << BLOCK_SHIFT


def make_codec(dim: int, kind: str) -> faiss.Index:
    """A FAISS standalone codec (``sa_encode``/``sa_decode``) for a re-ranking table kind other than Flat/SQfp16.

    ``PCAR,<codec>`` (no dimension) rotates onto the principal axes of the table's own vectors, keeping every
    dimension (an orthogonal map: inner products unchanged), before the codec: scalar codes then spend their
    per-dimension ranges on axes of falling variance, which ranks better at the same bytes (docs/performance.md).
    """
    factory = f"PCAR{dim}," + kind[len("PCAR,") :] if kind.upper().startswith("PCAR,") else kind
    try:
        codec = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        size = codec.sa_code_size()
    except RuntimeError as exc:  # bad factory strings, and indices without a standalone codec
        raise ValueError(
            f"unknown re-ranking store {kind!r}: Flat, SQfp16, or a FAISS codec such as SQ8, SQ4, PCAR256,SQ8 ({exc})"
        ) from exc
    if size <= 0:
        raise ValueError(f"re-ranking store {kind!r} has no standalone codes")
    return codec


class VectorTable:
    def __init__(self, dim: int, kind: str = "Flat", codec: faiss.Index | None = None) -> None:
        self.dim = dim
        self.kind = kind
        self.codec = None if kind in DTYPES else (codec if codec is not None else make_codec(dim, kind))
        # Rows of `width` elements: the vector (float32/float16), or its code bytes (uint8).
        self.dtype = np.dtype(DTYPES[kind]) if self.codec is None else np.dtype(np.uint8)
        self.width = dim if self.codec is None else int(self.codec.sa_code_size())
        self._rotation: tuple[np.ndarray, np.ndarray, faiss.Index] | None = None  # see _rotated()
        self.mapped = False  # rows mapped from the file read (read(..., mmap=True))
        self.blocks: list[np.ndarray] = []  # each (BLOCK_ROWS, width)
        self.ids = np.zeros(0, dtype=np.int64)  # row -> pair id
        self.row_of = np.full(0, -1, dtype=np.int64)  # pair id -> row, -1 when absent
        self.n = 0
        self.extra: dict[str, np.ndarray] = {}  # other arrays of the file read

    @property
    def ntotal(self) -> int:
        return self.n

    @property
    def near_exact(self) -> bool:
        """Whether lookups return the vectors added (float32, or float16-rounded), not a codec's approximation."""
        return self.kind in NEAR_EXACT

    @property
    def needs_training(self) -> bool:
        return self.codec is not None and not self.codec.is_trained

    def train(self, sample: np.ndarray) -> None:
        """Train the codec (compact kinds) on a sample of the vectors; nothing to do for Flat and SQfp16."""
        if self.needs_training:
            assert self.codec is not None
            self.codec.train(np.ascontiguousarray(sample, dtype=np.float32))

    def _encode(self, vectors: np.ndarray) -> np.ndarray:
        if self.codec is None:
            return np.asarray(vectors)
        if not self.codec.is_trained:
            raise ValueError(f"the {self.kind} re-ranking table is not trained")
        return self.codec.sa_encode(np.ascontiguousarray(vectors, dtype=np.float32))

    def _rotated(self) -> tuple[np.ndarray, np.ndarray, faiss.Index] | None:
        """(R, mean, inner codec) when the codec is an orthonormal PCA rotation (``PCAR,...``) over an inner codec:
        x = R^T y + mean, so q.x = y.(R q) + mean.q and products need not rotate 4,000 candidates back."""
        if self._rotation is None and self.codec is not None and self.codec.is_trained:
            pt = faiss.downcast_index(self.codec)
            if isinstance(pt, faiss.IndexPreTransform) and pt.chain.size() == 1:
                vt = faiss.downcast_VectorTransform(pt.chain.at(0))
                if isinstance(vt, faiss.PCAMatrix) and vt.is_orthonormal and vt.d_out == vt.d_in == self.dim:
                    rot = faiss.vector_to_array(vt.A).reshape(self.dim, self.dim)
                    mean = faiss.vector_to_array(vt.mean)
                    self._rotation = (rot, mean, faiss.downcast_index(pt.index))
        return self._rotation

    def _decode(self, raw: np.ndarray) -> np.ndarray:
        if self.codec is None:
            return raw.astype(np.float32, copy=False)
        return self.codec.sa_decode(np.ascontiguousarray(raw))

    def nbytes(self) -> int:
        return int(self.n * self.width * self.dtype.itemsize + self.ids[: self.n].nbytes + self.row_of.nbytes)

    def _reserve(self, rows: int, max_id: int) -> None:
        while len(self.blocks) * BLOCK_ROWS < rows:
            self.blocks.append(np.zeros((BLOCK_ROWS, self.width), dtype=self.dtype))
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
        """Add float vectors under ids (encoded for compact kinds)."""
        if len(ids):
            self._add_rows(ids, self._encode(vectors))

    def _add_rows(self, ids: np.ndarray, raw: np.ndarray) -> None:
        """Add stored rows (vectors, or codes) under ids."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        if ids.min() < 0:
            raise ValueError("pair ids must be non-negative")
        self._reserve(self.n + len(ids), int(ids.max()))
        self._put_rows(self.n, raw)
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
        return self._decode(self._gather_raw(rows))

    def _gather_raw(self, rows: np.ndarray) -> np.ndarray:
        raw = np.empty((len(rows), self.width), dtype=self.dtype)
        block = rows >> BLOCK_SHIFT
        for b in np.unique(block).tolist():
            sel = block == b
            raw[sel] = self.blocks[b][rows[sel] & (BLOCK_ROWS - 1)]
        return raw

    def inner_products(self, ids: np.ndarray, x: np.ndarray) -> np.ndarray:
        """(b, f) inner products of query row i with the vectors of ids[i] (all present), float32.

        float32 tables use FAISS's ``fvec_inner_products_by_idx``, which reads the rows in place (gathering
        4,000 rows of 1280 floats first took longer than the products themselves), one call per block
        touched; other rows of the call are ``-1`` and skipped.
        """
        rows = self._rows_of(ids)
        x = np.ascontiguousarray(x, dtype=np.float32)
        rotation = self._rotated()
        if rotation is not None:
            rot, mean, inner = rotation
            y = inner.sa_decode(self._gather_raw(rows.ravel())).reshape(*rows.shape, self.dim)
            return np.einsum("bfd,bd->bf", y, x @ rot.T) + (x @ mean)[:, None]
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
        return self._decode(np.concatenate(used)[: self.n]), self.ids[: self.n]

    def products(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inner products (b, n) of every query with every stored row, ids (n,)), in row order. float32 tables
        multiply block by block in place (BLAS), never copying the table; other kinds decode it first."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.dtype != np.float32 or self.codec is not None:
            vectors, ids = self.all()
            return x @ vectors.T, ids
        out = np.empty((len(x), self.n), dtype=np.float32)
        for start in range(0, self.n, BLOCK_ROWS):
            rows = self.blocks[start >> BLOCK_SHIFT][: min(BLOCK_ROWS, self.n - start)]
            np.matmul(x, rows.T, out=out[:, start : start + len(rows)])
        return out, self.ids[: self.n]

    def any_id(self) -> int:
        """Some stored id (for padding a gather); the table must not be empty."""
        if self.n == 0:
            raise KeyError("the table is empty")
        return int(self.ids[0])

    def write(self, path: Path, **extra: np.ndarray) -> None:
        """Save ids, vectors (or codes, with the trained codec) and any extra named arrays (read back into
        ``extra``), atomically, as ``.npz``."""
        path = Path(path)
        if self.codec is not None:
            extra = {**extra, "codec": faiss.serialize_index(self.codec)}
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                _write_npy(zf, "ids", self.ids[: self.n])
                with zf.open("vectors.npy", "w", force_zip64=True) as member:
                    header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False}
                    np.lib.format.write_array_header_2_0(member, {**header, "shape": (self.n, self.width)})
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
    def read(cls, path: Path, dim: int, kind: str, mmap: bool = False) -> VectorTable:
        """Read a table written by ``write``. ``mmap``: map the rows from the file (copy-on-write: edits stay in
        memory) instead of reading them; the page cache then holds what searches touch (docs/performance.md,
        memory-mapped tables)."""
        table = cls(dim, kind) if kind in DTYPES else None
        with zipfile.ZipFile(path) as zf:
            names = {n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")}
            if not {"ids", "vectors"} <= names:
                raise ValueError(f"{path}: not a vector table (arrays {sorted(names)})")
            with zf.open("ids.npy") as member:
                ids = np.lib.format.read_array(member, allow_pickle=False)
            extra = {}
            for name in sorted(names - {"ids", "vectors"}):
                with zf.open(f"{name}.npy") as member:
                    extra[name] = np.lib.format.read_array(member, allow_pickle=False)
            if table is None:
                if "codec" not in extra:
                    raise ValueError(f"{path}: a {kind} table without its codec")
                table = cls(dim, kind, faiss.deserialize_index(extra.pop("codec")))
            table.extra = extra
            with zf.open("vectors.npy") as member:
                version = np.lib.format.read_magic(member)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(member)
                width = table.width
                if len(shape) != 2 or shape[1] != width or shape[0] != len(ids) or fortran or dtype != table.dtype:
                    raise ValueError(f"{path}: rows of shape {shape} for {len(ids)} ids, expected width {width}")
                if mmap and len(ids):
                    info = zf.getinfo("vectors.npy")
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise ValueError(f"{path}: compressed rows cannot be mapped")
                    offset = _member_data_offset(path, info) + member.tell()
                    rows_mm = np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=(len(ids), width))
                    table._adopt(ids, rows_mm)
                    return table
                for start in range(0, len(ids), BLOCK_ROWS):
                    rows = min(BLOCK_ROWS, len(ids) - start)
                    chunk = np.frombuffer(_read_exact(member, rows * width * dtype.itemsize), dtype=dtype)
                    table._add_rows(ids[start : start + rows], chunk.reshape(rows, width))
        return table

    def _adopt(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Take mapped rows as the table: full blocks are views of the map; the partial last block is copied into
        memory, so adds fill it as usual. Removes move rows within the (copy-on-write) map."""
        n = len(ids)
        full = n >> BLOCK_SHIFT
        self.blocks = [rows[b << BLOCK_SHIFT : (b + 1) << BLOCK_SHIFT] for b in range(full)]
        self._reserve(n, int(ids.max()))
        if n > full << BLOCK_SHIFT:
            self.blocks[full][: n - (full << BLOCK_SHIFT)] = rows[full << BLOCK_SHIFT :]
        self.ids[:n] = ids
        self.row_of[ids] = np.arange(n)
        self.n = n
        self.mapped = True


def _write_npy(zf: zipfile.ZipFile, name: str, arr: np.ndarray) -> None:
    with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)


def _member_data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored zip member's bytes start in the file: after its local header, name and extra field."""
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    if header[:4] != b"PK\x03\x04":
        raise ValueError(f"{path}: bad zip local header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _read_exact(fh, size: int) -> bytes:
    data = fh.read(size)
    if len(data) != size:
        raise ValueError("truncated vector table")
    return data
