"""Caption-anchor neighbours of fixed queries (a label set's class embeddings), kept current under edits.

:class:`NeighbourCache` keeps, for fixed query embeddings, their exact top-``depth``
neighbours among the caption anchors, and keeps them current under edits:

- add: the new anchors' similarities to every query are one small matrix product; a row
  changes only if a new anchor beats its current cut-off, and the merge is vectorised;
- remove: the removed ids are dropped from the rows holding them; a row keeps
  ``depth - k`` spare neighbours so it still knows its top-k after a few deletions, and only
  rows that run out are searched again (recompute where incremental is not possible).

Each row tracks ``exact`` = how many of its leading entries are known to be the true top
neighbours of the current anchor set; the invariant is checked against a rebuild in tests.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from asif.math.topk import TIE_GRID, top_sorted

SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
NO_ROWS = np.zeros(0, dtype=np.int64)

# Versions of neighbour caches come from one process-wide counter: a cache that replaces another never
# reuses a version the old one had, so nothing memoised on (cache, version) can be mistaken for current.
_versions = itertools.count(1)


def _next_version() -> int:
    return next(_versions)


@dataclass
class NeighbourCache:
    """Exact top-``depth`` anchor neighbours of fixed queries, maintained under adds and removes."""

    queries: np.ndarray  # (L, d)
    depth: int
    ids: np.ndarray = field(init=False)  # (L, depth) int64, -1 in empty slots, sorted by sim desc
    sims: np.ndarray = field(init=False)  # (L, depth) float32, -inf in empty slots
    exact: np.ndarray = field(init=False)  # (L,) leading entries known to be the true top neighbours
    version: int = field(default_factory=_next_version)

    def __post_init__(self) -> None:
        n = len(self.queries)
        self.ids = np.full((n, self.depth), -1, dtype=np.int64)
        self.sims = np.full((n, self.depth), -np.inf, dtype=np.float32)
        self.exact = np.zeros(n, dtype=np.int64)

    def nbytes(self) -> int:
        return int(self.queries.nbytes + self.ids.nbytes + self.sims.nbytes + self.exact.nbytes)

    @classmethod
    def concat(cls, parts: Sequence[NeighbourCache]) -> NeighbourCache:
        """One cache over the rows of several caches of the same depth, in order."""
        out = cls(np.concatenate([c.queries for c in parts]), parts[0].depth)
        out.ids = np.concatenate([c.ids for c in parts])
        out.sims = np.concatenate([c.sims for c in parts])
        out.exact = np.concatenate([c.exact for c in parts])
        return out

    def view(self, start: int, stop: int) -> NeighbourCache:
        """Rows ``start:stop`` as a cache whose arrays are views of this one's: changes show in both."""
        out = object.__new__(type(self))
        out.queries, out.depth = self.queries[start:stop], self.depth
        out.ids, out.sims, out.exact = self.ids[start:stop], self.sims[start:stop], self.exact[start:stop]
        out.version = _next_version()
        return out

    def copy(self) -> NeighbourCache:
        return NeighbourCache.concat([self])

    def fill(self, rows: np.ndarray, search: SearchFn, n_anchors: int) -> np.ndarray:
        """Recompute the given rows from the index; returns them."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return NO_ROWS
        sims, ids = search(self.queries[rows], self.depth)
        width = ids.shape[1]
        self.ids[rows] = -1
        self.sims[rows] = -np.inf
        self.ids[rows, :width] = ids
        self.sims[rows, :width] = sims
        self.exact[rows] = min(width, n_anchors)
        self.version = _next_version()
        return rows

    def add(self, new_ids: np.ndarray, new_vectors: np.ndarray, n_before: int, known: bool = False) -> np.ndarray:
        """Account for anchors just added (n_before = anchor count before the add); returns the rows changed.

        Rows keep the canonical order of :func:`asif.math.topk.top_sorted` (similarity on a grid, then id).
        ``known``: rows may already hold some of these ids (an edit another process made, followed after this
        cache searched the shared store): those are left out, per row.
        """
        if len(new_ids) == 0 or len(self.queries) == 0:
            return NO_ROWS
        new_ids = np.asarray(new_ids, dtype=np.int64)
        if known:  # one id at a time, each left out of the rows that hold it already
            valid = np.arange(self.depth)[None, :] < self.exact[:, None]
            vectors = np.asarray(new_vectors, dtype=np.float32)
            changed = [
                self._add(new_ids[j : j + 1], vectors[j : j + 1], n_before, ((self.ids == i) & valid).any(axis=1))
                for j, i in enumerate(new_ids.tolist())
            ]
            return np.unique(np.concatenate(changed))
        return self._add(new_ids, new_vectors, n_before, None)

    def _add(self, new_ids: np.ndarray, new_vectors: np.ndarray, n_before: int, skip: np.ndarray | None) -> np.ndarray:
        """``add``, leaving out the rows of the ``skip`` mask."""
        s = self.queries @ np.asarray(new_vectors, dtype=np.float32).T  # (L, m)
        qs = np.floor(s / TIE_GRID)
        last = np.maximum(self.exact - 1, 0)[:, None]
        last_q = np.floor(np.take_along_axis(self.sims, last, axis=1) / TIE_GRID)
        last_id = np.take_along_axis(self.ids, last, axis=1)
        before_last = (qs > last_q) | ((qs == last_q) & (new_ids[None, :] < last_id))
        # A row holding every anchor takes any newcomer; a truncated row only those that sort before
        # its last known-exact entry; a truncated row that knows nothing (all deleted) waits for ensure().
        truncated = (self.exact < n_before)[:, None]
        enters = np.where(truncated, before_last & (self.exact > 0)[:, None], True)
        if skip is not None:
            enters &= ~skip[:, None]
        rows = np.flatnonzero(enters.any(axis=1))
        if len(rows) == 0:
            return NO_ROWS
        if len(new_ids) == 1:
            for part in row_pieces(rows, self.depth):
                self._insert_one(part, new_ids[0], s[part, 0])
        else:
            # Entries beyond `exact` are not trusted: drop them before merging.
            keep = np.arange(self.depth)[None, :] < self.exact[rows, None]
            old_s = np.where(keep, self.sims[rows], -np.inf)
            old_i = np.where(keep, self.ids[rows], -1)
            new_s = np.where(enters[rows], s[rows], -np.inf)
            new_i = np.where(enters[rows], np.broadcast_to(new_ids, new_s.shape), -1)
            cat_s = np.concatenate([old_s, new_s], axis=1)
            cat_i = np.concatenate([old_i, new_i], axis=1)
            self.sims[rows], self.ids[rows] = top_sorted(cat_s, cat_i, self.depth)
            self.exact[rows] = np.minimum(self.depth, self.exact[rows] + enters[rows].sum(axis=1))
        self.version = _next_version()
        return rows

    def _insert_one(self, rows: np.ndarray, new_id: int, sims: np.ndarray) -> None:
        """The common live add: one anchor, inserted at its place in each row (found by a binary search over the
        rows' known-exact prefixes, which are sorted), the entries after it shifted one place."""
        exact = self.exact[rows]
        q_new = np.floor(sims / TIE_GRID)
        lo, hi = np.zeros(len(rows), dtype=np.int64), exact.copy()
        while (open_ := lo < hi).any():  # ~log2(depth) rounds of one gather per row
            mid = np.where(open_, (lo + hi) // 2, 0)
            q_mid = np.floor(self.sims[rows, mid] / TIE_GRID)
            first = (q_mid > q_new) | ((q_mid == q_new) & (self.ids[rows, mid] < new_id))  # sorts before the new one
            lo = np.where(open_ & first, mid + 1, lo)
            hi = np.where(open_ & ~first, mid, hi)
        inside = lo < self.depth  # a row holding every anchor, full to its depth: a newcomer sorting last stays out
        if not inside.all():
            rows, sims, exact, lo = rows[inside], sims[inside], exact[inside], lo[inside]
        pos = lo[:, None]
        col = np.arange(self.depth)[None, :]
        after = col > pos
        new_exact = np.minimum(self.depth, exact + 1)
        untrusted = col >= new_exact[:, None] if (new_exact < self.depth).any() else None  # past the new prefix
        for table, value, empty in ((self.sims, sims, -np.inf), (self.ids, new_id, -1)):
            old = table[rows]
            moved = np.empty_like(old)
            moved[:, 1:], moved[:, 0] = old[:, :-1], old[:, 0]
            out = np.where(after, moved, old)
            out[np.arange(len(rows)), lo] = value
            table[rows] = out if untrusted is None else np.where(untrusted, empty, out)
        self.exact[rows] = new_exact

    def remove(self, removed_ids: np.ndarray, removed_vectors: np.ndarray | None = None) -> np.ndarray:
        """Drop removed anchors from every row that holds them; returns those rows.

        ``removed_vectors`` (their exact vectors, when known) narrow the rows to look at: only the known-exact
        prefix of a row is ever used, and an anchor can be in it only if it is at least as similar as the
        prefix's last entry. Without them every row is scanned (a pass over all the ids held: ~4 ms for
        10,000 labels). Entries past the prefix are never used and are dropped by the next add or refill.
        """
        removed_ids = np.asarray(removed_ids, dtype=np.int64)
        if removed_vectors is not None and len(self.queries):
            s = self.queries @ np.asarray(removed_vectors, dtype=np.float32).T  # (L, m)
            last = self.sims[np.arange(len(self.sims)), np.maximum(self.exact - 1, 0)]
            floor = np.where(self.exact > 0, last - 1e-4, np.inf)[:, None]
            look = np.flatnonzero((s >= floor).any(axis=1))
        else:
            look = np.arange(len(self.ids))
        parts = [self._remove_from(part, removed_ids) for part in row_pieces(look, self.depth)]
        rows = np.concatenate(parts) if parts else NO_ROWS
        if len(rows) == 0:
            return NO_ROWS
        self.version = _next_version()
        return rows

    def _remove_from(self, look: np.ndarray, removed_ids: np.ndarray) -> np.ndarray:
        """``remove`` over rows ``look``; returns the rows changed."""
        ids = self.ids[look]
        # The common live delete is one id: a comparison beats isin's sort.
        one = len(removed_ids) == 1
        hit_all = (ids == removed_ids[0]) if one else (np.isin(ids, removed_ids) & (ids >= 0))
        found = np.flatnonzero(hit_all.any(axis=1))
        if len(found) == 0:
            return NO_ROWS
        rows = look[found]
        hit = hit_all[found]
        gone_in_prefix = (hit & (np.arange(self.depth)[None, :] < self.exact[rows, None])).sum(axis=1)
        s = np.where(hit, -np.inf, self.sims[rows])
        i = np.where(hit, -1, self.ids[rows])
        order = np.argsort(hit, axis=1, kind="stable")  # compact: survivors keep their order
        self.sims[rows] = np.take_along_axis(s, order, axis=1)
        self.ids[rows] = np.take_along_axis(i, order, axis=1)
        self.exact[rows] -= gone_in_prefix
        return rows

    def ensure(self, k: int, search: SearchFn, n_anchors: int) -> np.ndarray:
        """Make every row know its exact top-min(k, n_anchors); refills the rows that do not and returns them."""
        need = min(k, n_anchors)
        rows = np.flatnonzero(self.exact < need)
        return self.fill(rows, search, n_anchors)

    def topk(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(sims, ids) of the first k entries; call ensure(k) first."""
        return self.sims[:, :k], self.ids[:, :k]


def cache_depth(k: int) -> int:
    """Neighbours kept per label for a requested k: k plus spares that absorb deletions."""
    return int(k + max(16, k // 4))


UPDATE_ENTRIES = 1 << 16  # (row, neighbour) entries label upkeep takes at a time


def row_pieces(rows: np.ndarray, width: int) -> Iterator[np.ndarray]:
    """``rows`` in consecutive pieces of about UPDATE_ENTRIES entries of ``width`` each: label upkeep works piece by
    piece so that its (rows, width) temporaries stay small enough for the heap to reuse (an add entering all
    10,000 rows of a set faulted in ~400 MB of fresh pages in one go)."""
    step = max(1, UPDATE_ENTRIES // max(1, width))
    for start in range(0, len(rows), step):
        yield rows[start : start + step]
