"""The narrow interface every anchor store implements, and what all of them share.

The ASIF math (``asif.serving.model``, ``asif.serving.labels``) talks to a store only through ``VectorStore``: add
vectors under 64-bit pair ids, remove ids, search the top-k by inner product (ties at the k-th place to the smallest
ids), read vectors back, count. Two implementations: ``FaissStore`` (``asif.stores.faiss_store``, in process, the
default) and ``MilvusStore`` (``asif.stores.milvus_store``, a Milvus server or milvus-lite).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


class StoreError(ValueError):
    """Bad use of an anchor store (duplicate or unknown ids, wrong dimension...)."""


class StoreUnavailable(RuntimeError):
    """Shared state could not be written (a Milvus failure): the edit was undone as far as it could be; retry."""


def as_matrix(vectors: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise StoreError(f"expected vectors of shape (n, {dim}), got {x.shape}")
    if not np.isfinite(x).all():
        raise StoreError("vectors contain NaN or infinity")
    return x


def checked_new(store: VectorStore, ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of an add, validated: matching lengths, finite vectors of the store's dimension, ids new
    and distinct (StoreError otherwise)."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    x = as_matrix(vectors, store.dim)
    if len(ids) != len(x):
        raise StoreError(f"{len(ids)} ids for {len(x)} vectors")
    if len(np.unique(ids)) != len(ids):
        raise StoreError("duplicate ids in one add")
    present = store.contains(ids)
    if present.any():
        raise StoreError(f"ids already present: {ids[present][:10].tolist()}")
    return ids, x


@runtime_checkable
class VectorStore(Protocol):
    """Anchor vectors (L2-normalised) by pair id, searched by inner product."""

    dim: int

    @property
    def ntotal(self) -> int:
        """Pairs held."""
        ...

    @property
    def is_exact(self) -> bool:
        """Whether searches return the exact top-k (no approximate index)."""
        ...

    @property
    def exact_vectors(self) -> bool:
        """Whether ``reconstruct`` returns the vectors exactly as added (not a quantised approximation)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the store is, for /v1/info and the manifest (backend, index type, parameters)."""
        ...

    def ids(self) -> np.ndarray:
        """Sorted ids held."""
        ...

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which of these ids are held."""
        ...

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under new ids (StoreError: a known or duplicated id, wrong shape, NaN)."""
        ...

    def remove(self, ids: np.ndarray) -> int:
        """Remove the ids held among these; returns how many."""
        ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-min(k, ntotal) (similarities, ids) per query, best first, ties to the smallest ids."""
        ...

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of these ids (StoreError: an unknown id)."""
        ...
