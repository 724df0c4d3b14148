"""The FAISS anchor store: one FAISS index over L2-normalised anchor embeddings with 64-bit pair ids, in process.

It implements ``asif.stores.base.VectorStore`` (the narrow interface the ASIF math uses), plus training and
files (``write``/``read``) for the index folder. ``asif.stores.milvus_store`` is the other implementation.

Index choice (``choose_index_spec``) is documented in ``asif.stores.spec``; the raw FAISS helpers (threads,
construction, IVF access) are in ``asif.stores.faiss_index``.

Identical vectors are indexed once when the store re-ranks (IVF-PQ with a refine table): with one
anchor per caption, every image appears once per caption (five times in Flickr8k). The vectors of one
``add`` call that are bitwise identical form a group; FAISS and the refine table hold one entry per
group, keyed by the group's smallest pair id, and a search expands each group into its pairs. Results
are the same as without grouping (same similarities, same canonical order, ties by pair id); the image
index, its re-ranking table and its candidate lists shrink by the duplication factor, and candidates
are counted in distinct vectors. Duplicates added by different calls stay separate (still correct).

Searching (ties at the k-th place, IVF probes, re-ranking) is in ``asif.stores.faiss_search``, FaissStore's base
class.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from asif.stores.base import StoreError, as_matrix, checked_new
from asif.stores.duplicates import DuplicateGroups
from asif.stores.faiss_index import apply_faiss_threads, enable_id_lookup, ids_of, ivf_or_none, new_index
from asif.stores.faiss_search import FaissSearch
from asif.stores.spec import IndexSpec
from asif.stores.vectors import VectorTable

PURGE_AT = 1024  # re-ranked stores: deleted vectors left in FAISS (filtered out) before one batched removal


class FaissStore(FaissSearch):
    """FAISS anchor index with explicit pair ids, optional exact re-ranking. Not thread-safe for edits."""

    def __init__(
        self,
        dim: int,
        spec: IndexSpec,
        index: faiss.Index | None = None,
        refine: VectorTable | None = None,
        groups: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        self.dim = int(dim)
        self.spec = spec
        self.index = index if index is not None else new_index(self.dim, spec.factory)
        self.refine = refine
        if self.refine is None and spec.refine:
            try:
                self.refine = VectorTable(self.dim, spec.refine)
            except ValueError as exc:
                raise StoreError(str(exc)) from exc
        self._ivf = ivf_or_none(self.index)
        if self._ivf is not None:
            enable_id_lookup(self.index)
        # A set, not a sorted array: an edit costs O(1) instead of re-sorting every id (~50 ms at 1M).
        self._ids: set[int] = set(ids_of(self.index).tolist()) if index is not None else set()
        # Groups of identical vectors (only with a refine table): one indexed vector per group.
        self._groups = DuplicateGroups(*(groups if groups is not None else (None, None)))
        # Re-ranked stores delete lazily: a removed vector leaves the re-ranking table at once (so searches
        # skip it) and FAISS in batches of PURGE_AT. FAISS's fast-scan IVF removes an id by scanning every
        # list: ~7 ms per delete at 1M pairs, held under the service's write lock.
        self._dead: set[int] = set()
        self._ids.update(self._groups.non_keys())

    @property
    def groups_duplicates(self) -> bool:
        """Whether identical vectors of one add call are indexed once (needs the exact refine table)."""
        return self.refine is not None

    # -- state ------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        """Pairs held (a group of identical vectors counts each of its pairs)."""
        return len(self._ids)

    @property
    def nvectors(self) -> int:
        """Distinct vectors indexed by FAISS (not counting deleted ones awaiting removal)."""
        return int(self.index.ntotal) - len(self._dead)

    def _bury(self, ids: list[int]) -> None:
        """Remove ids from FAISS: lazily for a re-ranked store (see ``_dead``), else at once."""
        if self.refine is None:
            self.index.remove_ids(faiss.IDSelectorArray(np.asarray(ids, dtype=np.int64)))
            return
        self._dead.update(ids)
        if len(self._dead) >= PURGE_AT:
            self.purge()

    def purge(self) -> None:
        """Remove the deleted vectors still in FAISS (one pass over the lists for all of them)."""
        if self._dead:
            apply_faiss_threads()
            self.index.remove_ids(faiss.IDSelectorArray(np.fromiter(self._dead, dtype=np.int64)))
            self._dead.clear()

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained) and not (self.refine is not None and self.refine.needs_training)

    @property
    def is_exact(self) -> bool:
        return self._ivf is None and self.spec.kind == "flat"

    @property
    def exact_vectors(self) -> bool:
        """Whether ``reconstruct`` returns the vectors added (a Flat index, or a float32/float16 refine table)."""
        return (self.refine is not None and self.refine.near_exact) or self.is_exact

    def describe(self) -> dict[str, Any]:
        return {"backend": "faiss", **self.spec.to_dict()}

    def ids(self) -> np.ndarray:
        """Sorted ids currently in the store."""
        return np.array(sorted(self._ids), dtype=np.int64)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        known = self._ids
        return np.fromiter((i in known for i in ids.tolist()), dtype=bool, count=len(ids))

    def bytes_per_vector(self) -> dict[str, float]:
        """Serialized bytes per pair held, for the index and the refine store (groups share one entry)."""
        n = max(self.ntotal, 1)
        out = {"index": len(faiss.serialize_index(self.index)) / n}
        if self.refine is not None:
            out["refine"] = self.refine.nbytes() / n
        return out

    # -- building and editing -----------------------------------------------------------------
    def train(self, sample: np.ndarray) -> None:
        apply_faiss_threads()
        x = as_matrix(sample, self.dim)
        if not self.index.is_trained:
            if self._ivf is not None and len(x) < self._ivf.nlist:
                raise StoreError(f"need at least {self._ivf.nlist} training vectors, got {len(x)}")
            self.index.train(x)
            enable_id_lookup(self.index)
        if self.refine is not None:
            self.refine.train(x)  # compact re-ranking codes (SQ8, ...) train on the same sample

    def add(self, ids: np.ndarray, vectors: np.ndarray, batch: int = 65536) -> None:
        apply_faiss_threads()
        ids, x = checked_new(self, ids, vectors)
        if not self.is_trained:
            raise StoreError("index is not trained; call train() first")
        if len(ids) == 0:
            return
        if self._dead and not self._dead.isdisjoint(ids.tolist()):
            self.purge()  # an id deleted and added again: its old vector must go first
        rows = self._groups.group(ids, x) if self.groups_duplicates else np.arange(len(ids))
        for start in range(0, len(rows), batch):
            part = rows[start : start + batch]
            self.index.add_with_ids(x[part], ids[part])
            if self.refine is not None:
                self.refine.add(ids[part], x[part])
        self._ids.update(ids.tolist())

    def remove(self, ids: np.ndarray) -> int:
        """Remove the given ids; unknown ids are ignored. Returns how many were removed."""
        apply_faiss_threads()
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        ids = ids[self.contains(ids)]
        if len(ids) == 0:
            return 0
        drop, moves = self._groups.remove(ids)
        for old, new in moves:
            self._rekey(old, new)
        if drop:
            if self.refine is not None:
                self.refine.remove(np.asarray(drop, dtype=np.int64))
            self._bury(drop)
        self._ids.difference_update(ids.tolist())
        return len(ids)

    def _rekey(self, old: int, new: int) -> None:
        """The key of a group was deleted: index its vector under the group's new key."""
        assert self.refine is not None
        vec = self.refine.get(np.array([old]))
        self.refine.remove(np.array([old]))
        self._bury([old])
        self.index.add_with_ids(vec, np.array([new], dtype=np.int64))
        self.refine.add(np.array([new]), vec)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of the given ids (exact for Flat and the Flat refine store)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        missing = ~self.contains(ids)
        if missing.any():
            raise StoreError(f"unknown ids: {ids[missing][:10].tolist()}")
        if self.refine is not None:
            keys = np.fromiter((self._groups.key_of(i) for i in ids.tolist()), dtype=np.int64, count=len(ids))
            return self.refine.get(keys)
        return self.index.reconstruct_batch(ids).reshape(len(ids), self.dim)

    def groups(self) -> tuple[np.ndarray, np.ndarray]:
        """(member ids, their group keys) for every pair that is not its group's key."""
        return self._groups.arrays()

    def write(self, path: Path) -> list[Path]:
        """Write the index (and refine store) next to ``path``; returns the files written.

        Each file is written to a temporary name, fsynced, then renamed into place.
        """
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        self.purge()
        faiss.write_index(self.index, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        written = [path]
        if self.refine is not None:
            members, keys = self.groups()
            self.refine.write(refine_path(path), group_members=members, group_keys=keys)
            written.append(refine_path(path))
        return written

    @classmethod
    def read(cls, path: Path, dim: int, spec: IndexSpec, mmap: bool = False) -> FaissStore:
        index = faiss.read_index(str(path))
        if index.d != dim:
            raise StoreError(f"{path} holds {index.d}-d vectors, expected {dim}")
        refine = VectorTable.read(refine_path(path), dim, spec.refine, mmap=mmap) if spec.refine else None
        if refine is not None and refine.ntotal != index.ntotal:
            raise StoreError(f"{path}: refine store holds {refine.ntotal} vectors, index {index.ntotal}")
        groups = None
        if refine is not None and "group_members" in refine.extra:
            groups = (refine.extra["group_members"], refine.extra["group_keys"])
        return cls(dim, spec, index=index, refine=refine, groups=groups)


def refine_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".refine.npz")


def build_store(
    vectors: np.ndarray, ids: np.ndarray, spec: IndexSpec, seed: int = 0, add_batch: int = 65536
) -> FaissStore:
    """Train (on a seeded sample) and fill a store."""
    x = as_matrix(vectors, vectors.shape[1] if vectors.ndim == 2 else 0)
    store = FaissStore(x.shape[1], spec)
    if not store.is_trained:
        n_train = min(len(x), max(spec.train_size, 1))
        sample = x if n_train >= len(x) else x[np.random.default_rng(seed).choice(len(x), n_train, replace=False)]
        store.train(sample)
    store.add(ids, x, batch=add_batch)  # one call: identical vectors anywhere in x are grouped
    return store
