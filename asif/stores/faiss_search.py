"""The FAISS store's searches (``FaissSearch``, a base class of :class:`asif.stores.faiss_store.FaissStore`, split
off by responsibility: the store holds, edits and writes the index; this searches it).

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
from typing import TYPE_CHECKING

import faiss
import numpy as np

from asif.math.topk import TIE_GRID, TIE_MARGIN, effective_k, top_sorted
from asif.stores.base import StoreError, as_matrix
from asif.stores.faiss_index import apply_faiss_threads

if TYPE_CHECKING:
    from asif.stores.duplicates import DuplicateGroups
    from asif.stores.spec import IndexSpec
    from asif.stores.vectors import VectorTable

RERANK_MIN = 4096  # candidates re-ranked at least (~1.7 ms at 1M): small k and grouped anchors need them on real data
SCAN_MIN = 131_072  # PQ codes scanned at least per query (~1 ms with fast-scan)


class FaissSearch:
    """Search over the store's FAISS index, its re-ranking table and its groups of identical vectors."""

    # The store's (FaissStore's attributes), which the searches use.
    dim: int
    spec: IndexSpec
    index: faiss.Index
    refine: VectorTable | None
    _ivf: faiss.IndexIVF | None
    _groups: DuplicateGroups
    ntotal: int
    nvectors: int

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
