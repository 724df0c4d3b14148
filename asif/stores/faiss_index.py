"""Raw FAISS index helpers for the FAISS store: OpenMP threads per calling thread, index construction from a
factory string (with an id map, and PQ training settings), IVF access, direct-map setup and id listing."""

from __future__ import annotations

import threading

import faiss
import numpy as np

from asif.stores.base import StoreError

_faiss_threads: int | None = None  # OpenMP threads per FAISS call, in every thread (None: OpenMP's default)
_thread_state = threading.local()


def set_faiss_threads(n: int | None) -> None:
    """OpenMP threads for every FAISS call of the process, whichever thread makes it.

    ``faiss.omp_set_num_threads`` only sets the calling thread's value: threads started later (a server's
    worker threads) keep OpenMP's default of one thread per core, and single-query searches and edits spent
    ~10 ms in OpenMP barriers under load. Each store call applies this value to its thread first.
    """
    global _faiss_threads
    _faiss_threads = n
    apply_faiss_threads()


def apply_faiss_threads() -> None:
    n = _faiss_threads
    if n and getattr(_thread_state, "n", None) != n:
        faiss.omp_set_num_threads(n)
        _thread_state.n = n


def new_index(dim: int, factory: str) -> faiss.Index:
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:  # FAISS reports bad factory strings as RuntimeError
        raise StoreError(f"invalid FAISS factory string {factory!r} for dim {dim}: {exc}") from exc
    ivf = ivf_or_none(index)
    if ivf is None and not isinstance(index, faiss.IndexIDMap2 | faiss.IndexIDMap):
        index = faiss.IndexIDMap2(index)
    ivfpq = faiss.downcast_index(ivf) if ivf is not None else None
    if isinstance(ivfpq, faiss.IndexIVFPQ):
        # Polysemous training (on by default) costs minutes and only serves Hamming filtering,
        # which inner-product search does not use. 64 points per PQ centroid train it well.
        ivfpq.do_polysemous_training = False
        ivfpq.pq.cp.max_points_per_centroid = 64
        ivfpq.pq.cp.niter = 20
    return index


def ivf_or_none(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def enable_id_lookup(index: faiss.Index) -> None:
    """IVF: a hash-table direct map makes removal by id O(1) instead of a scan of every list.

    Fast-scan indices store codes in blocks, which FAISS cannot edit through a direct map: their
    removal scans the ids of every list (~1 ms per million vectors), still far inside the budget.
    """
    ivf = ivf_or_none(index)
    if ivf is None or isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFastScan):
        return
    if ivf.direct_map.type != faiss.DirectMap.Hashtable:
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)


def ids_of(index: faiss.Index) -> np.ndarray:
    ivf = ivf_or_none(index)
    if ivf is None:
        return faiss.vector_to_array(faiss.downcast_index(index).id_map).astype(np.int64)
    invlists = ivf.invlists
    parts = []
    for lst in range(ivf.nlist):
        size = invlists.list_size(lst)
        if size:
            parts.append(faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy())
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
