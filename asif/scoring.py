"""Label-side scoring state that follows edits row by row.

A :class:`LabelScorer` holds the sparse relative representations of a label set's classes for one
``(k, weighting)`` and scores image representations against them. Scoring goes through a
:class:`asif.relrep.KeyMatrix` (an inverted layout: anchor -> (label, weight)) built at some point in
time, the *base*. An edit that changes some classes' neighbours rewrites only those rows and marks them
stale; stale rows are scored directly from their current entries (:func:`score_rows`) and their columns
overwrite the base's. So the first classification after an edit costs what the edit changed, never a
rebuild. When the stale rows pass a threshold, a fresh base is built from a copy of the rows
(:meth:`LabelScorer.rebuild_inputs` / :meth:`LabelScorer.install`), off the request path when the caller
provides a background executor; rows changed meanwhile stay stale.

Not thread-safe on its own: the owner (:class:`asif.labels.CachedLabels`) serialises access with its lock.
"""

from __future__ import annotations

import numpy as np

from asif.relrep import KeyMatrix, SparseRR, Weighting, as_weighting, sparsify

STALE_MIN = 32  # stale rows tolerated before a rebuild, at least
STALE_FRACTION = 8  # ... or 1/8 of the rows, whichever is larger


def label_relrep(sims: np.ndarray, ids: np.ndarray, weighting: Weighting | float) -> SparseRR:
    """Neighbour rows (``-1`` / ``-inf`` padding allowed) -> sparse ASIF representations."""
    return sparsify(np.maximum(sims, 0.0), np.maximum(ids, 0), weighting)


def score_rows(query: SparseRR, key_ids: np.ndarray, key_weights: np.ndarray) -> np.ndarray:
    """(len(query), len(key_ids)) dot products of sparse rows, computed directly (no inverted index).

    Costs ``len(query) * key_ids.size * log(k)``: meant for the few rows that changed since a base was built.
    """
    b = len(query)
    out = np.zeros((b, len(key_ids)), dtype=np.float64)
    if b == 0 or key_ids.size == 0:
        return out.astype(np.float32)
    for r in range(b):
        live = query.weights[r] > 0
        q_ids, q_w = query.ids[r][live], query.weights[r][live]
        if len(q_ids) == 0:
            continue
        order = np.argsort(q_ids)
        q_ids, q_w = q_ids[order], q_w[order].astype(np.float64)
        pos = np.minimum(np.searchsorted(q_ids, key_ids), len(q_ids) - 1)
        hit = (q_ids[pos] == key_ids) & (key_weights > 0)
        out[r] = np.where(hit, q_w[pos] * key_weights, 0.0).sum(axis=1)
    return out.astype(np.float32)


class LabelScorer:
    """Sparse representations of L labels for one k and weighting (a bare number: the power p), with an inverted
    base and stale-row patches."""

    def __init__(self, k: int, weighting: Weighting | float, sims: np.ndarray, ids: np.ndarray) -> None:
        self.k = int(k)
        self.weighting = as_weighting(weighting)
        rr = label_relrep(sims, ids, self.weighting)
        self.ids = rr.ids.copy()
        self.weights = rr.weights.copy()
        self.base = KeyMatrix.from_rr(rr)
        n = len(self.ids)
        self.stale = np.zeros(n, dtype=bool)
        self.stamp = np.zeros(n, dtype=np.int64)  # clock value of each row's last change
        self.clock = 0
        self.rebuilding = False  # a rebuild is scheduled or running

    @property
    def n_labels(self) -> int:
        return len(self.ids)

    @property
    def n_stale(self) -> int:
        return int(self.stale.sum())

    def nbytes(self) -> int:
        m = self.base.matrix
        return int(
            self.ids.nbytes + self.weights.nbytes + self.stale.nbytes + self.stamp.nbytes + self.base.universe.nbytes
            + m.data.nbytes + m.indices.nbytes + m.indptr.nbytes
        )

    def relrep(self) -> SparseRR:
        return SparseRR(self.ids, self.weights)

    def update(self, rows: np.ndarray, sims: np.ndarray, ids: np.ndarray) -> None:
        """Rows ``rows`` now have these top-k neighbours (``(len(rows), k)`` arrays)."""
        if len(rows) == 0:
            return
        rr = label_relrep(sims, ids, self.weighting)
        self.ids[rows] = rr.ids
        self.weights[rows] = rr.weights
        self.clock += 1
        self.stale[rows] = True
        self.stamp[rows] = self.clock

    def needs_rebuild(self) -> bool:
        return self.n_stale > max(STALE_MIN, self.n_labels // STALE_FRACTION)

    def rebuild_inputs(self) -> tuple[SparseRR, int]:
        """A copy of the current rows and the clock they reflect (take under the owner's lock)."""
        return SparseRR(self.ids.copy(), self.weights.copy()), self.clock

    def install(self, base: KeyMatrix, clock: int) -> None:
        """Adopt a base built from the rows as of ``clock``; rows changed since stay stale."""
        self.base = base
        self.stale = self.stamp > clock

    def rebuild(self) -> None:
        rr, clock = self.rebuild_inputs()
        self.install(KeyMatrix.from_rr(rr), clock)

    def score(self, query: SparseRR) -> np.ndarray:
        """(len(query), n_labels) ASIF scores."""
        scores = self.base.score(query)
        stale = np.flatnonzero(self.stale)
        if len(stale):
            scores[:, stale] = score_rows(query, self.ids[stale], self.weights[stale])
        return scores
