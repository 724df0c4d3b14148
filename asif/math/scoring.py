"""Label-side scoring state that follows edits entry by entry.

A :class:`LabelScorer` holds the sparse relative representations of a label set's classes for one
``(k, weighting)`` and scores image representations against them.

A class's representation is its top-k weights L2-normalised. The scorer keeps the weights *unnormalised*
(:meth:`asif.math.relrep.Weighting.relative`: scaled by a constant per row, so an entry's value depends on its own
similarity only) beside each row's norm, and scores ``(query . row) / norm``. An edit that moves one anchor into
a row (pushing the k-th one out) then changes two entries of that row and its norm, not every weight in it.

The dot products go through :class:`asif.math.relrep.KeyMatrix` (an inverted layout: anchor -> (label, weight)): a
*base* built at some point in time, plus *patches* that hold exactly what changed since, as signed entries
(``+w`` for an entry that entered a row, ``-w`` for one that left). Patches are kept in a few levels that merge
like a binary counter, so an edit costs about what it changed. When the patches grow past a share of the base, a
fresh base is built from a copy of the rows (:meth:`LabelScorer.rebuild_inputs` / :meth:`LabelScorer.install`),
off the request path when the caller provides a background executor; what changed meanwhile stays in patches.

A row whose weights would leave float range against its reference (a newcomer far more similar than the row's
best at the time) gets a new reference and is scored on its own (*detached*) until the next base.

Not thread-safe on its own: the owner (:class:`asif.serving.labels.CachedLabels`) serialises access with its lock.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from asif.math.relrep import KeyMatrix, SparseRR, Weighting, as_weighting

PATCH_MIN = 4096  # patch entries tolerated before a rebuild, at least
PATCH_FRACTION = 8  # ... or 1/8 of the base's entries, whichever is larger
DETACHED_MIN = 32  # detached rows tolerated before a rebuild
SHIFT = 1  # entries are matched with their old selves up to this many places away (one edit shifts a row by one)
SCALE = 1e20  # a row's weights must stay within [1/SCALE, SCALE] of its reference, else it is re-referenced


def score_rows(query: SparseRR, key_ids: np.ndarray, key_weights: np.ndarray) -> np.ndarray:
    """(len(query), len(key_ids)) dot products of sparse rows, computed directly (no inverted index).

    Costs ``len(query) * key_ids.size * log(k)``: meant for a few rows.
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


def _norms(weights: np.ndarray) -> np.ndarray:
    return np.sqrt(np.square(weights.astype(np.float64)).sum(axis=1))


def row_changes(
    old_ids: np.ndarray, old_w: np.ndarray, new_ids: np.ndarray, new_w: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Which entries of rows (``-1`` ids: empty) entered (mask over new) and left (mask over old).

    Entries are matched by (id, weight) up to :data:`SHIFT` places apart. An entry that moved further counts as
    left and entered again, with the same weight: the two cancel exactly, so the masks describe the change
    exactly either way and SHIFT only bounds their size in the common case.
    """
    k = new_ids.shape[1]
    matched_new = np.zeros(new_ids.shape, dtype=bool)
    matched_old = np.zeros(old_ids.shape, dtype=bool)
    for d in range(-SHIFT, SHIFT + 1):
        if abs(d) >= k:
            continue
        n_sl, o_sl = (slice(0, k - d), slice(d, k)) if d >= 0 else (slice(-d, k), slice(0, k + d))
        eq = (new_ids[:, n_sl] == old_ids[:, o_sl]) & (new_w[:, n_sl] == old_w[:, o_sl])
        matched_new[:, n_sl] |= eq
        matched_old[:, o_sl] |= eq
    return (new_ids >= 0) & ~matched_new, (old_ids >= 0) & ~matched_old


@dataclass
class _Patch:
    """Signed entries (anchor, key, weight), each stamped with the scorer clock of its change."""

    ids: np.ndarray
    cols: np.ndarray
    weights: np.ndarray
    clocks: np.ndarray
    matrix: KeyMatrix
    FIELDS = ("ids", "cols", "weights", "clocks")

    @classmethod
    def of(cls, ids: np.ndarray, cols: np.ndarray, weights: np.ndarray, clocks: np.ndarray, n_keys: int) -> _Patch:
        return cls(ids, cols, weights, clocks, KeyMatrix.from_entries(ids, cols, weights, n_keys))

    @classmethod
    def merged(cls, parts: list[_Patch], n_keys: int, after: int | None = None) -> _Patch:
        """One patch of the parts' entries (only those stamped later than ``after``, when given)."""
        ids, cols, weights, clocks = (np.concatenate([getattr(p, f) for p in parts]) for f in _Patch.FIELDS)
        if after is not None:
            keep = clocks > after
            ids, cols, weights, clocks = ids[keep], cols[keep], weights[keep], clocks[keep]
        return cls.of(ids, cols, weights, clocks, n_keys)

    def __len__(self) -> int:
        return len(self.ids)

    def nbytes(self) -> int:
        return int(self.ids.nbytes + self.cols.nbytes + self.weights.nbytes + self.clocks.nbytes + self.matrix.nbytes())


class LabelScorer:
    """Sparse representations of L labels for one k and weighting (a bare number: the power p): unnormalised rows
    and their norms, scored through an inverted base plus patches."""

    def __init__(self, k: int, weighting: Weighting | float, sims: np.ndarray, ids: np.ndarray) -> None:
        self.k = int(k)
        self.weighting = as_weighting(weighting)
        self.ref = self.weighting.reference(sims)
        self.w = self.weighting.relative(sims, self.ref).astype(np.float32)
        self.ids = np.where(self.w > 0, ids, -1).astype(np.int64)
        self.norm = _norms(self.w)
        n = len(self.ids)
        self.base = KeyMatrix.from_rr(self._rr())
        self.patches: list[_Patch] = []
        self.detached = np.zeros(n, dtype=bool)  # rows scored on their own until the next base
        self.stamp = np.zeros(n, dtype=np.int64)  # clock value of each row's last change
        self.clock = 0
        self.rebuilding = False  # a rebuild is scheduled or running

    @property
    def n_labels(self) -> int:
        return len(self.ids)

    @property
    def n_patched(self) -> int:
        """Entries held in patches (what changed since the base was built)."""
        return sum(len(p) for p in self.patches)

    @property
    def n_detached(self) -> int:
        return int(self.detached.sum())

    def nbytes(self) -> int:
        own = self.ids.nbytes + self.w.nbytes + self.ref.nbytes + self.norm.nbytes + self.detached.nbytes
        return int(own + self.stamp.nbytes + self.base.nbytes() + sum(p.nbytes() for p in self.patches))

    def _rr(self) -> SparseRR:
        return SparseRR(np.maximum(self.ids, 0), self.w)

    def row_weights(self, rows: np.ndarray) -> np.ndarray:
        """The L2-normalised weights of some rows (aligned with ``self.ids[rows]``)."""
        norm = self.norm[rows][:, None]
        return np.divide(self.w[rows], norm, out=np.zeros(self.w[rows].shape), where=norm > 0).astype(np.float32)

    def relrep(self) -> SparseRR:
        """Every row, L2-normalised."""
        return SparseRR(np.maximum(self.ids, 0), self.row_weights(np.arange(self.n_labels)))

    def update(self, rows: np.ndarray, sims: np.ndarray, ids: np.ndarray) -> None:
        """Rows ``rows`` (distinct) now have these top-k neighbours (``(len(rows), k)`` arrays)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        w64 = self.weighting.relative(sims, self.ref[rows])
        peak = w64.max(axis=1, initial=0.0)
        rescale = ~(peak <= SCALE) | ((peak > 0) & (peak < 1.0 / SCALE))  # NaN and inf included
        if rescale.any():
            self.ref[rows[rescale]] = self.weighting.reference(sims[rescale])
            w64[rescale] = self.weighting.relative(sims[rescale], self.ref[rows[rescale]])
        new_w = w64.astype(np.float32)
        new_ids = np.where(new_w > 0, ids, -1).astype(np.int64)
        self.clock += 1
        patched = ~(rescale | self.detached[rows])  # detached rows are scored from their entries: no patch
        if patched.any():
            self._patch(rows[patched], new_ids[patched], new_w[patched])
        self.detached[rows[rescale]] = True
        self.ids[rows], self.w[rows] = new_ids, new_w
        self.norm[rows] = _norms(new_w)
        self.stamp[rows] = self.clock

    def _patch(self, rows: np.ndarray, new_ids: np.ndarray, new_w: np.ndarray) -> None:
        old_ids, old_w = self.ids[rows], self.w[rows]
        entered, left = row_changes(old_ids, old_w, new_ids, new_w)
        cols = np.broadcast_to(rows[:, None], new_ids.shape)
        ids = np.concatenate([new_ids[entered], old_ids[left]])
        if len(ids) == 0:
            return
        weights = np.concatenate([new_w[entered], -old_w[left]])
        cols = np.concatenate([cols[entered], cols[left]])
        self.patches.append(_Patch.of(ids, cols, weights, np.full(len(ids), self.clock), self.n_labels))
        while len(self.patches) > 1 and len(self.patches[-1]) * 2 >= len(self.patches[-2]):  # a binary counter
            self.patches[-2:] = [_Patch.merged(self.patches[-2:], self.n_labels)]

    def needs_rebuild(self) -> bool:
        return self.n_patched > max(PATCH_MIN, self.base.nnz // PATCH_FRACTION) or self.n_detached > DETACHED_MIN

    def rebuild_inputs(self) -> tuple[SparseRR, int]:
        """A copy of the current rows and the clock they reflect (take under the owner's lock)."""
        return SparseRR(np.maximum(self.ids, 0), self.w.copy()), self.clock

    def install(self, base: KeyMatrix, clock: int) -> None:
        """Adopt a base built from the rows as of ``clock``; what changed since stays in patches."""
        self.base = base
        later = [p for p in self.patches if (p.clocks > clock).any()]
        self.patches = [_Patch.merged(later, self.n_labels, after=clock)] if later else []
        self.detached &= self.stamp > clock

    def rebuild(self) -> None:
        rr, clock = self.rebuild_inputs()
        self.install(KeyMatrix.from_rr(rr), clock)

    def score(self, query: SparseRR) -> np.ndarray:
        """(len(query), n_labels) ASIF scores."""
        raw = self.base.raw_score(query).astype(np.float64, copy=False)
        for patch in self.patches:
            raw += patch.matrix.raw_score(query)
        scores = np.divide(raw, self.norm, out=np.zeros_like(raw), where=self.norm > 0).astype(np.float32)
        detached = np.flatnonzero(self.detached)
        if len(detached):
            scores[:, detached] = score_rows(query, self.ids[detached], self.row_weights(detached))
        return scores
