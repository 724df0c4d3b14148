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

Ties at the k-th place go to the smallest pair ids on every path (``asif.math.topk.top_sorted``). FAISS
keeps equal similarities in insertion order, so TIE_MARGIN more neighbours are fetched than needed and
a row whose last one is in the similarity cell of the last one needed is fetched again with twice as
many: the k-th neighbour without re-ranking (flat, IVF). With re-ranking, PQ candidates end at a PQ cell
boundary (``_candidates``): the last one's whole cell is re-ranked, or, when it runs past those fetched,
none of it.

Searches always return ``min(k, ntotal)`` real neighbours, never FAISS's ``-1`` padding:
the IVF ``nprobe`` is chosen per call (``SearchParametersIVF``) so the probed lists hold
enough vectors, and rows that still come back short are searched again with more lists, up
to all of them. Shared index state is never mutated by a search.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from asif.math.topk import TIE_GRID, TIE_MARGIN, effective_k, top_sorted
from asif.stores.base import StoreError, as_matrix, checked_new
from asif.stores.duplicates import DuplicateGroups
from asif.stores.faiss_index import apply_faiss_threads, enable_id_lookup, ids_of, ivf_or_none, new_index
from asif.stores.spec import IndexSpec
from asif.stores.vectors import VectorTable

RERANK_MIN = 4096  # candidates re-ranked at least (~1.7 ms at 1M): small k and grouped anchors need them on real data
SCAN_MIN = 131_072  # PQ codes scanned at least per query (~1 ms with fast-scan)
PURGE_AT = 1024  # re-ranked stores: deleted vectors left in FAISS (filtered out) before one batched removal


class FaissStore:
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

    # -- search ---------------------------------------------------------------------------------
    def _nprobe_for(self, fetch: int) -> int:
        assert self._ivf is not None
        nlist = self._ivf.nlist
        per_list = max(self.nvectors / nlist, 1e-9)
        # Probe enough lists to hold ~4x the candidates wanted on average, and at least SCAN_MIN vectors
        # (all of a smaller index: cheap, and real queries' neighbours spread over many lists); at least
        # spec.nprobe.
        wanted = math.ceil(max(4.0 * fetch, SCAN_MIN) / per_list)
        return int(max(1, min(nlist, max(self.spec.nprobe, wanted))))

    def _search_ivf(self, x: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """PQ candidates; ``-1`` marks slots that stay empty even with every list probed.

        That happens with fast-scan PQ when ``fetch`` is close to the vectors held: FAISS drops
        vectors whose quantised distance saturates its 16-bit accumulator (the farthest ones).
        """
        assert self._ivf is not None
        nprobe = self._nprobe_for(fetch)
        sims, ids = self.index.search(x, fetch, params=faiss.SearchParametersIVF(nprobe=nprobe))
        short = (ids < 0).any(axis=1)
        while short.any() and nprobe < self._ivf.nlist:
            # Lists probed held fewer than `fetch` vectors for some rows: widen those rows only.
            nprobe = min(self._ivf.nlist, nprobe * 2)
            s2, i2 = self.index.search(x[short], fetch, params=faiss.SearchParametersIVF(nprobe=nprobe))
            sims[short], ids[short] = s2, i2
            short = (ids < 0).any(axis=1)
        return sims, ids.astype(np.int64)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-min(k, ntotal) neighbours by inner product, sorted descending: (sims, ids)."""
        apply_faiss_threads()
        x = as_matrix(queries, self.dim)
        k = effective_k(k, self.ntotal)
        if k == 0 or len(x) == 0:
            return np.zeros((len(x), k), dtype=np.float32), np.zeros((len(x), k), dtype=np.int64)
        if self.refine is None:
            return self._search_unrefined(x, k)
        return self._search_refined(x, k)

    def _search_unrefined(self, x: np.ndarray, k: int, fetch: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Flat, or IVF without re-ranking vectors: FAISS's own similarities in the canonical order.

        FAISS cuts a run of equal similarities in insertion order. k + TIE_MARGIN neighbours are fetched;
        rows whose last one is in the k-th one's cell (the run may go on) are fetched again with twice as
        many, up to every vector, so the k-th place goes to the smallest ids.
        """
        fetch = min(self.ntotal, fetch or k + TIE_MARGIN)
        if self._ivf is None:
            s, i = self.index.search(x, fetch)
            i = i.astype(np.int64)
        else:
            s, i = self._search_ivf(x, fetch)
        cut = _cell_cut(s, i, k) if fetch < self.ntotal else np.zeros(len(x), dtype=bool)
        if self._ivf is not None:
            for r in np.flatnonzero((i >= 0).sum(axis=1) < k):
                self._fill_dropped(s[r], i[r])
            s = np.where(i >= 0, s, -np.inf).astype(np.float32)
        sims, ids = top_sorted(s, i, k)
        if cut.any():
            rows = np.flatnonzero(cut)
            sims[rows], ids[rows] = self._search_unrefined(x[rows], k, 2 * fetch)
        return sims, ids

    def _fill_dropped(self, sims: np.ndarray, ids: np.ndarray) -> None:
        """Without re-ranking vectors, fill the ``-1`` slots FAISS left (the farthest vectors, dropped by
        fast-scan's saturated distances) with the ids it did not return, ranked last: no similarity is
        known for them, and the clamp at 0 and the power p give such far anchors ~zero weight anyway."""
        empty = np.flatnonzero(ids < 0)
        found = set(ids[ids >= 0].tolist())
        rest = [i for i in self.ids().tolist() if i not in found][: len(empty)]
        floor = sims[ids >= 0].min() if len(found) else 0.0
        ids[empty[: len(rest)]] = rest
        sims[empty[: len(rest)]] = np.nextafter(np.float32(floor), np.float32(-np.inf))

    def _search_refined(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """PQ candidates re-ranked exactly, counted in distinct vectors, groups expanded into pairs.

        The k pairs wanted come from about k * nvectors / ntotal distinct vectors (k / 5 with five
        captions per image); rows whose groups turn out smaller are searched again counting one vector
        per pair (always enough), then, if FAISS still came back short, exactly over the whole table.
        """
        sims = np.empty((len(x), k), dtype=np.float32)
        ids = np.empty((len(x), k), dtype=np.int64)
        todo = np.arange(len(x))
        k_vec = min(k, math.ceil(k * self.nvectors / max(self.ntotal, 1)))
        for want in dict.fromkeys((k_vec, k, None)):  # without groups k_vec == k: one PQ pass
            fetch = self.nvectors if want is None else max(RERANK_MIN, math.ceil(want * self.spec.rerank_factor))
            s, keys = self._candidates(x[todo], fetch, k)
            s, i, ok = self._expand(s, keys, k)
            sims[todo[ok]], ids[todo[ok]] = s[ok], i[ok]
            todo = todo[~ok]
            if len(todo) == 0 or fetch >= self.nvectors:
                break
        if len(todo):  # pragma: no cover - k <= ntotal and an exact pass over every vector covers it
            raise StoreError("index returned fewer neighbours than it holds")
        return sims, ids

    def _expand(self, sims: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Indexed vectors (canonical order, ``-1``/``-inf`` padding last) -> top-k pairs and a per-row ok mask.

        The top k pairs lie in the first k vectors: every vector ranked ahead of a pair's own has a
        member (its key, the smallest id) ranked ahead of that pair. Vectors are taken until k pairs are
        in hand and the similarity cell of the last one is complete, then sorted in the canonical order.
        """
        b = len(keys)
        out_s = np.full((b, k), -np.inf, dtype=np.float32)
        out_i = np.full((b, k), -1, dtype=np.int64)
        if not self._groups:
            m = min(k, keys.shape[1])
            out_s[:, :m], out_i[:, :m] = sims[:, :m], keys[:, :m]
            return out_s, out_i, (out_i >= 0).all(axis=1) & np.isfinite(out_s).all(axis=1)
        ok = np.zeros(b, dtype=bool)
        for r in range(b):
            got_s: list[float] = []
            got_i: list[int] = []
            cell = None
            for sim, key in zip(sims[r].tolist(), keys[r].tolist(), strict=True):
                if key < 0 or sim == -math.inf:
                    break
                this_cell = math.floor(sim / TIE_GRID)
                if len(got_i) >= k and this_cell != cell:
                    break
                cell = this_cell
                members = self._groups.members(key)
                got_i.extend(members)
                got_s.extend([sim] * len(members))
            if len(got_i) >= k:
                # A full sort, no partition first: a group larger than TIE_MARGIN may straddle the k-th place.
                got = np.array(got_s, dtype=np.float32)
                order = np.lexsort((np.array(got_i), -np.floor(got / TIE_GRID)))[:k]
                out_s[r], out_i[r], ok[r] = got[order], np.array(got_i, dtype=np.int64)[order], True
        return out_s, out_i, ok

    def _exact_all(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over every vector of the re-ranking table: small stores, and Flat ones grouping identical
        vectors (a BLAS product over the table took 0.8 ms a query at 8,090 x 1280, FAISS's Flat scan 1.8 ms)."""
        assert self.refine is not None
        sims, ids = self.refine.products(x)
        return top_sorted(sims, np.broadcast_to(ids, sims.shape), k)

    def _candidates(self, x: np.ndarray, fetch: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The best k indexed vectors among about ``fetch`` PQ candidates re-ranked exactly (``-inf``/``-1`` padded).

        FAISS keeps equal PQ similarities in insertion order, and identical vectors added by different calls
        (not grouped) share a PQ code; fast-scan's quantised similarities also tie for dozens of distinct
        vectors deep in the ranking. So TIE_MARGIN more candidates are fetched, and the candidates end at a
        PQ cell boundary: after the fetch-th one's whole cell when it ends within them, else before that cell
        (every vector scored above it was fetched). Only when that would leave fewer than half the candidates
        wanted (a long run of identical vectors) is the row fetched again with twice as many, up to the whole
        table (then exact). No candidate set depends on the order of insertion.
        """
        nvectors = self.nvectors
        if fetch >= nvectors or self._ivf is None:  # the whole table (a Flat index's is exact anyway): BLAS
            return self._exact_all(x, min(k, nvectors))
        wide = min(nvectors, fetch + TIE_MARGIN)
        pq, cand = self._search_ivf(x, wide)
        cells = np.floor(pq / TIE_GRID)
        at = cells[:, fetch - 1 : fetch]
        same = cells[:, fetch:] == at  # the rest of the fetch-th one's cell: a prefix (FAISS lists best first)
        # Rows whose last candidate fetched (not a -1: more vectors exist) is still in that cell.
        cut = same[:, -1] & (cand[:, -1] >= 0) if wide < nvectors else np.zeros(len(x), dtype=bool)
        ends = fetch + same.sum(axis=1)
        if cut.any():
            before = np.argmax(cells[:, :fetch] == at, axis=1)  # where the fetch-th one's cell begins
            ends = np.where(cut, before, ends)
            cut &= before < max(fetch // 2, min(k, fetch))
        most = int(ends.max())
        cand = cand[:, :most]
        if len(x) > 1 and (ends < most).any():
            cand = np.where(np.arange(most) < ends[:, None], cand, -1)
        sims, keys = self._rerank(x, cand, k)
        if cut.any():  # the cell is longer than TIE_MARGIN and starts early: a run of identical vectors
            rows = np.flatnonzero(cut)
            s, i = self._candidates(x[rows], 2 * wide, k)
            width = max(sims.shape[1], s.shape[1])
            sims, keys = _padded(sims, keys, width)
            sims[rows], keys[rows] = _padded(s, i, width)
        return sims, keys

    def _rerank(self, x: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products of the candidates (``-1``: none), best k kept."""
        assert self.refine is not None
        valid = self.refine.present(cand)  # -1 padding and deleted vectors still in FAISS are not
        safe = cand if valid.all() else np.where(valid, cand, self.refine.any_id())
        exact = np.empty(cand.shape, dtype=np.float32)
        step = max(1, (64 << 20) // max(1, cand.shape[1] * self.dim * 4))  # float16 tables gather ~64 MB at most
        for start in range(0, len(x), step):
            exact[start : start + step] = self.refine.inner_products(
                safe[start : start + step], x[start : start + step]
            )
        exact[~valid] = -np.inf
        return top_sorted(exact, cand, k)

    # -- persistence ----------------------------------------------------------------------------
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


def _cell_cut(sims: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Rows of a FAISS result (best first; ``-1``: no more vectors) whose last neighbour is in the k-th one's cell.

    FAISS keeps the first vectors inserted among equal similarities: there, the cell may go on past the
    neighbours fetched, and a row fetched in full (padded with ``-1``) has nothing more to give.
    """
    return (ids[:, -1] >= 0) & (np.floor(sims[:, -1] / TIE_GRID) == np.floor(sims[:, k - 1] / TIE_GRID))


def _padded(sims: np.ndarray, ids: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows widened to ``width`` with ``-inf`` similarities and ``-1`` ids."""
    if sims.shape[1] == width:
        return sims, ids
    out_s = np.full((len(sims), width), -np.inf, dtype=np.float32)
    out_i = np.full((len(ids), width), -1, dtype=np.int64)
    out_s[:, : sims.shape[1]], out_i[:, : ids.shape[1]] = sims, ids
    return out_s, out_i


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
