"""Relative representations: the ASIF math, as pure functions.

An ASIF relative representation of a query embedding ``q`` against anchors ``A`` (rows
L2-normalised) is the vector of cosine similarities ``A @ q`` in which every entry but the
``k`` largest is zeroed, negatives are clamped to 0, the rest raised to the power ``p``, and
the result is L2-normalised. It is stored sparsely as ``k`` (anchor id, weight) entries.

Two implementations live here and nowhere else:

- the sparse path (:func:`sparsify`, :class:`KeyMatrix`), fed by top-k neighbours from an
  anchor index, used by the engine;
- the dense exact reference (:func:`dense_relrep`, :func:`dense_scores`), the formula as
  written in the paper, used by tests and by the evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import scipy.sparse as sp

from asif.math.topk import effective_k, top_sorted

DEFAULT_K = 800
DEFAULT_P = 8.0


@dataclass(frozen=True)
class SparseRR:
    """A batch of sparse relative representations: row ``b`` is ``{ids[b, j]: weights[b, j]}``.

    Rows are ordered by decreasing similarity. Entries whose similarity was <= 0 carry weight 0.
    """

    ids: np.ndarray  # (b, k) int64 anchor (pair) ids
    weights: np.ndarray  # (b, k) float32, each row L2-normalised (or all zero)

    def __post_init__(self) -> None:
        if self.ids.shape != self.weights.shape or self.ids.ndim != 2:
            raise ValueError(f"ids {self.ids.shape} and weights {self.weights.shape} must be equal 2-d shapes")

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def row(self, b: int) -> dict[int, float]:
        return {int(i): float(w) for i, w in zip(self.ids[b], self.weights[b], strict=True) if w > 0}


def check_k_p(k: int, p: float) -> None:
    """Raise ValueError for values of k and p that the formula does not define."""
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not np.isfinite(p) or p <= 0:
        raise ValueError(f"p must be a positive finite number, got {p!r}")


WEIGHTINGS = ("power", "softmax", "rank")
DEFAULT_PARAMS = {"power": DEFAULT_P, "softmax": 0.1, "rank": 10.0}
PARAM_NAMES = {"power": "p", "softmax": "t", "rank": "r0"}


@dataclass(frozen=True)
class Weighting:
    """How the top-k similarities ``s`` (sorted, decreasing) become weights before the L2 normalisation.

    - ``power`` (the paper): ``max(s, 0) ** p``.
    - ``softmax``: ``exp((s - s_max) / t)``, a softmax over the top k at temperature ``t``.
    - ``rank``: ``1 / (rank + r0)``, rank 0 being the nearest anchor.

    In every case entries with ``s <= 0`` weigh 0 (the paper's clamp).
    """

    kind: str = "power"
    param: float = DEFAULT_P

    def __post_init__(self) -> None:
        if self.kind not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.kind!r}; choose one of {', '.join(WEIGHTINGS)}")
        name = PARAM_NAMES[self.kind]
        if isinstance(self.param, bool) or not np.isfinite(self.param) or self.param <= 0:
            raise ValueError(f"{name} must be a positive finite number ({self.kind} weighting), got {self.param!r}")
        object.__setattr__(self, "param", float(self.param))

    @classmethod
    def of(cls, kind: str, param: float | None = None) -> Weighting:
        """A weighting of this kind; its parameter defaults to DEFAULT_PARAMS."""
        return cls(kind, DEFAULT_PARAMS.get(kind, DEFAULT_P) if param is None else param)

    @property
    def param_name(self) -> str:
        return PARAM_NAMES[self.kind]

    def describe(self) -> str:
        return f"{self.kind} {self.param_name}={self.param:g}"

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "param": self.param}

    @classmethod
    def from_defaults(cls, defaults: dict, p: float = DEFAULT_P) -> Weighting:
        """The default weighting of a manifest's ``defaults`` (``{"k", "p", "weighting": {"kind", "param"}}``);
        a manifest without ``weighting`` (older builds) means the power weighting with its ``p``."""
        spec = defaults.get("weighting")
        if spec is None:
            return cls("power", float(defaults.get("p", p)))
        return cls(str(spec["kind"]), float(spec["param"]))

    def weights(self, sims: np.ndarray) -> np.ndarray:
        """Unnormalised float64 weights of rows of top-k similarities (each row sorted, decreasing)."""
        s = np.asarray(sims)
        if self.kind == "power":  # from float32, as the paper's recipe always was computed here
            return np.power(np.maximum(s.astype(np.float32), 0.0).astype(np.float64), self.param)
        s = s.astype(np.float64)
        if self.kind == "softmax":
            w = np.exp((s - s.max(axis=1, initial=0.0, keepdims=True)) / self.param)
        else:
            w = np.broadcast_to(1.0 / (np.arange(s.shape[1], dtype=np.float64) + self.param), s.shape).copy()
        return np.where(s > 0, w, 0.0)

    def reference(self, sims: np.ndarray) -> np.ndarray:
        """Each row's reference similarity for :meth:`relative`: its largest, at least 0."""
        return np.maximum(np.asarray(sims, dtype=np.float64).max(axis=1, initial=0.0), 0.0)

    def relative(self, sims: np.ndarray, ref: np.ndarray) -> np.ndarray:
        """:meth:`weights` scaled by a constant per row, fixed by ``ref`` (one similarity per row), in float64.

        Each row is proportional to its :meth:`weights`, so it has the same L2-normalised form; for ``power`` and
        ``softmax`` an entry's value depends on its own similarity and ``ref`` only, not on the other entries, so
        an edit that moves one anchor in or out of a row leaves every other entry's value as it was.
        """
        s = np.asarray(sims)
        ref = np.asarray(ref, dtype=np.float64)[:, None]
        if self.kind == "rank":  # a rank moves with every entry above it: nothing to keep
            return self.weights(s)
        if self.kind == "power":
            base = np.maximum(s.astype(np.float32), 0.0).astype(np.float64) / np.where(ref > 0, ref, 1.0)
            w = _integer_power(base, int(self.param)) if self.param in range(1, 65) else np.power(base, self.param)
        else:
            with np.errstate(over="ignore"):
                w = np.exp((s.astype(np.float64) - ref) / self.param)
        return np.where(s > 0, w, 0.0)


def _integer_power(x: np.ndarray, n: int) -> np.ndarray:
    """x ** n for a whole n >= 1, by squaring (a few multiplications instead of a pow per entry)."""
    out = None
    while n:
        if n & 1:
            out = x.copy() if out is None else out * x
        n >>= 1
        if n:
            x = x * x
    assert out is not None
    return out


WeightingLike = Weighting | float  # a Weighting, or a bare number: the power weighting's p


def as_weighting(weighting: WeightingLike) -> Weighting:
    """A Weighting, or a bare number taken as the paper's power p."""
    return weighting if isinstance(weighting, Weighting) else Weighting("power", float(weighting))


def sparsify(
    sims: np.ndarray, ids: np.ndarray, weighting: Weighting | float, anchor_weights: np.ndarray | None = None
) -> SparseRR:
    """Top-k similarities (already selected, sorted) -> ASIF weights, L2-normalised.

    ``weighting``: a :class:`Weighting`, or the power ``p`` of the paper's ``max(s, 0) ** p``.
    ``anchor_weights``: optional per-anchor factors (indexed by id), applied before the normalisation.
    """
    w64 = as_weighting(weighting).weights(sims)
    ids = np.asarray(ids, dtype=np.int64)
    if anchor_weights is not None:
        w64 = w64 * np.asarray(anchor_weights, dtype=np.float64)[ids]
    # Powers of values in [0, 1] underflow gracefully; normalise in float64 for stability.
    norms = np.linalg.norm(w64, axis=1, keepdims=True)
    w64 = np.divide(w64, norms, out=np.zeros_like(w64), where=norms > 0)
    return SparseRR(ids=ids, weights=w64.astype(np.float32))


def average_relreps(reps: Sequence[SparseRR]) -> SparseRR:
    """The L2-normalised mean of several representations of the same queries (e.g. views of one image).

    Row b of the result holds the union of the rows' anchors (up to ``sum(k)`` entries, by decreasing weight,
    padded with weight 0).
    """
    if len(reps) == 1:
        return reps[0]
    b = len(reps[0])
    ids = np.concatenate([r.ids for r in reps], axis=1)
    weights = np.concatenate([r.weights for r in reps], axis=1).astype(np.float64) / len(reps)
    ids = np.where(weights > 0, ids, -1)
    order = np.lexsort((ids,), axis=-1)  # equal ids side by side
    ids, weights = np.take_along_axis(ids, order, axis=1), np.take_along_axis(weights, order, axis=1)
    first = np.ones_like(ids, dtype=bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    group = np.cumsum(first, axis=1) - 1  # each entry's place among its row's distinct ids
    merged = np.zeros_like(weights)
    np.add.at(merged, (np.broadcast_to(np.arange(b)[:, None], ids.shape), group), weights)
    merged_ids = np.full_like(ids, -1)
    merged_ids[first.nonzero()[0], group[first]] = ids[first]
    merged = np.where(merged_ids >= 0, merged, 0.0)
    norms = np.linalg.norm(merged, axis=1, keepdims=True)
    merged = np.divide(merged, norms, out=np.zeros_like(merged), where=norms > 0)
    best = np.argsort(-merged, axis=1, kind="stable")
    out_ids = np.take_along_axis(merged_ids, best, axis=1)
    out_w = np.take_along_axis(merged, best, axis=1)
    return SparseRR(ids=np.where(out_w > 0, out_ids, 0), weights=out_w.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Dense exact reference: the formula written out over all n anchors, no index, no sparsity.


def dense_relrep(queries: np.ndarray, anchors: np.ndarray, k: int, p: float) -> np.ndarray:
    """(b, n) dense ASIF relative representations: top-k of cosine sims, clamp, ^p, L2-normalise."""
    check_k_p(k, p)
    queries = np.asarray(queries, dtype=np.float64)
    anchors = np.asarray(anchors, dtype=np.float64)
    sims = queries @ anchors.T
    n = sims.shape[1]
    k = effective_k(k, n)
    out = np.zeros_like(sims)
    if k == 0:
        return out
    _, top = top_sorted(sims, np.broadcast_to(np.arange(n), sims.shape), k)
    kept = np.take_along_axis(sims, top, axis=1)
    np.put_along_axis(out, top, np.power(np.maximum(kept, 0.0), p), axis=1)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)


def dense_scores(
    image_queries: np.ndarray,
    text_queries: np.ndarray,
    image_anchors: np.ndarray,
    text_anchors: np.ndarray,
    k: int,
    p: float,
) -> np.ndarray:
    """(n_images, n_texts) ASIF similarity: dot products of the dense relative representations."""
    return dense_relrep(image_queries, image_anchors, k, p) @ dense_relrep(text_queries, text_anchors, k, p).T


# ---------------------------------------------------------------------------------------------
# Sparse scoring.


SCORE_ENTRIES = 1 << 22  # (query, anchor, key) products KeyMatrix.score expands with numpy (~40 bytes each)
CHUNK_ENTRIES = 1 << 15  # ... expanded this many at a time (temporaries under glibc's 1 MiB mmap threshold)


@dataclass(frozen=True)
class KeyMatrix:
    """Sparse relative representations of keys (e.g. labels), laid out for fast batched scoring.

    ``universe`` holds the sorted distinct anchor ids used by any key; ``matrix`` is a CSR
    (len(universe) x n_keys) matrix of weights. Scoring a query batch is one sparse product.
    """

    universe: np.ndarray  # (u,) int64, sorted
    matrix: sp.csr_matrix  # (u, n_keys) float32
    n_keys: int

    @classmethod
    def from_rr(cls, rr: SparseRR) -> KeyMatrix:
        n_keys, k = rr.ids.shape
        keep = rr.weights > 0
        cols = np.broadcast_to(np.arange(n_keys)[:, None], (n_keys, k))[keep]
        return cls.from_entries(rr.ids[keep], cols, rr.weights[keep], n_keys)

    @classmethod
    def from_entries(cls, ids: np.ndarray, cols: np.ndarray, weights: np.ndarray, n_keys: int) -> KeyMatrix:
        """Entries ``(anchor id, key, weight)``, any sign; entries repeated for one (anchor, key) add up."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and ids.min() >= 0 and ids.max() < 4 * len(ids) + 4096:  # dense enough: no sort
            present = np.zeros(int(ids.max()) + 1, dtype=bool)
            present[ids] = True
            universe, rows = np.flatnonzero(present), (np.cumsum(present) - 1)[ids]
        else:
            universe, rows = np.unique(ids, return_inverse=True)
        matrix = sp.csr_matrix((np.asarray(weights, dtype=np.float32), (rows, cols)), shape=(len(universe), n_keys))
        return cls(universe=universe.astype(np.int64), matrix=matrix, n_keys=n_keys)

    @property
    def nnz(self) -> int:
        return int(self.matrix.nnz)

    def nbytes(self) -> int:
        m = self.matrix
        return int(self.universe.nbytes + m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)

    def score(self, queries: SparseRR) -> np.ndarray:
        """(len(queries), n_keys) dot products between query and key representations."""
        return self.raw_score(queries).astype(np.float32)

    def raw_score(self, queries: SparseRR) -> np.ndarray:
        """:meth:`score`, summed and returned in float64."""
        b, k = queries.ids.shape
        if len(self.universe) == 0 or b == 0:
            return np.zeros((b, self.n_keys), dtype=np.float64)
        pos = np.searchsorted(self.universe, queries.ids)
        pos_c = np.minimum(pos, len(self.universe) - 1)
        hit = (self.universe[pos_c] == queries.ids) & (queries.weights > 0)
        rows = np.broadcast_to(np.arange(b)[:, None], (b, k))[hit]
        # The CSR rows of the anchors hit, expanded with numpy (no scipy matrix built per call:
        # that cost ~0.4 ms for one query), then summed per (query, key) with bincount.
        weights = queries.weights[hit].astype(np.float64)
        starts = self.matrix.indptr[pos_c[hit]]
        lens = self.matrix.indptr[pos_c[hit] + 1] - starts
        if int(lens.sum()) > SCORE_ENTRIES:  # many queries x dense keys: one sparse product, nothing expanded
            # over the anchors the queries hit: only their rows of the key matrix are copied to float64
            used, cols = np.unique(pos_c[hit], return_inverse=True)
            q = sp.csr_matrix((weights, (rows, cols)), shape=(b, len(used)))
            return (q @ self.matrix[used].astype(np.float64)).toarray()
        out = np.zeros(b * self.n_keys, dtype=np.float64)
        # In pieces of about CHUNK_ENTRIES entries: the temporaries stay small enough for the heap to reuse (one
        # query against 10,000 dense-ish labels expanded 3.2M entries, ~150 MB of fresh pages faulted in per call).
        ends = np.cumsum(lens)
        total = int(ends[-1]) if len(ends) else 0
        cuts = np.unique(np.searchsorted(ends, np.arange(CHUNK_ENTRIES, total, CHUNK_ENTRIES), side="right"))
        for lo, hi in pairwise([0, *cuts[(cuts > 0) & (cuts < len(lens))].tolist(), len(lens)]):
            self._add_entries(out, rows[lo:hi], weights[lo:hi], starts[lo:hi], lens[lo:hi])
        return out.reshape(b, self.n_keys)

    def _add_entries(
        self, out: np.ndarray, rows: np.ndarray, weights: np.ndarray, starts: np.ndarray, lens: np.ndarray
    ) -> None:
        """Add ``weights[i] * (CSR row at starts[i], lens[i] entries)`` into ``out[rows[i] * n_keys + key]``."""
        total = int(lens.sum())
        if total == 0:
            return
        offsets = np.repeat(starts - np.cumsum(lens) + lens, lens)
        entries = np.arange(total) + offsets
        first = int(rows[0]) * self.n_keys  # rows ascend: the cells touched lie in [first, last row's end)
        cells = np.repeat(rows * self.n_keys - first, lens) + self.matrix.indices[entries]
        values = np.repeat(weights, lens) * self.matrix.data[entries]
        span = (int(rows[-1]) + 1) * self.n_keys - first
        out[first : first + span] += np.bincount(cells, weights=values, minlength=span)


def shared_anchors(
    query_ids: np.ndarray, query_weights: np.ndarray, key_ids: np.ndarray, key_weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The anchors two sparse representations share and each one's contribution to their dot product.

    Returns (ids, contributions) sorted by decreasing contribution; contributions sum to the score.
    """
    qmask = query_weights > 0
    kmask = key_weights > 0
    common, qi, ki = np.intersect1d(query_ids[qmask], key_ids[kmask], assume_unique=True, return_indices=True)
    contrib = query_weights[qmask][qi].astype(np.float64) * key_weights[kmask][ki]
    order = np.argsort(-contrib, kind="stable")
    return common[order].astype(np.int64), contrib[order]
