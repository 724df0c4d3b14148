"""Training-free variants of the ASIF recipe, compared with the default by ``asif eval --candidates`` (pure math).

- **Centering**: subtract a modality's mean anchor embedding from its anchors and queries, then re-normalise,
  before the cosine similarities.
- **Hubness correction**: an anchor image that is among the top-k neighbours of many other anchor images is near
  every query. Each anchor's weight is multiplied by an IDF factor ``log(N / (1 + occurrences))``, computed once
  from the anchor images (identical images count once).
- **Weighting function**: the default ``max(s, 0) ** p`` over the top k; a softmax ``exp((s - s_max) / t)``;
  or rank-based weights ``1 / (rank + r0)``. In every case, entries with ``s <= 0`` weigh 0 and rows are
  L2-normalised.
"""

from __future__ import annotations

import numpy as np

from asif.encoders.base import l2_normalise
from asif.relrep import SparseRR, exact_topk

WEIGHTINGS = ("power", "softmax", "rank")
HUBNESS_FLOOR = 1e-3  # an anchor in everyone's neighbourhood keeps a tiny weight, never exactly 0


def centre(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Rows of x minus the mean, L2-normalised."""
    return l2_normalise(np.asarray(x, dtype=np.float32) - np.asarray(mean, dtype=np.float32))


def hubness_weights(image_anchors: np.ndarray, k: int) -> np.ndarray:
    """IDF weight per anchor from how often its image is among the k nearest other distinct anchor images."""
    x = np.ascontiguousarray(image_anchors, dtype=np.float32)
    distinct, inverse = np.unique(x, axis=0, return_inverse=True)
    n = len(distinct)
    k = min(int(k), n - 1)
    if k < 1:
        return np.ones(len(x), dtype=np.float32)
    _, ids = exact_topk(distinct, distinct, k + 1)  # each image finds itself first
    counts = np.bincount(ids.ravel(), minlength=n) - 1
    idf = np.log(n / (1.0 + counts.astype(np.float64)))
    return np.maximum(idf, HUBNESS_FLOOR).astype(np.float32)[inverse.ravel()]


def weigh(sims: np.ndarray, weighting: str, param: float) -> np.ndarray:
    """Unnormalised weights of top-k similarities (each row sorted in decreasing order)."""
    s = np.asarray(sims, dtype=np.float64)
    positive = s > 0
    if weighting == "power":
        w = np.power(np.maximum(s, 0.0), float(param))
    elif weighting == "softmax":
        w = np.exp((s - s[:, :1]) / float(param))
    elif weighting == "rank":
        w = 1.0 / (np.arange(s.shape[1], dtype=np.float64)[None, :] + float(param))
        w = np.broadcast_to(w, s.shape).copy()
    else:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
    return np.where(positive, w, 0.0)


def variant_relrep(
    sims: np.ndarray,
    ids: np.ndarray,
    weighting: str = "power",
    param: float = 8.0,
    anchor_weights: np.ndarray | None = None,
) -> SparseRR:
    """Top-k (sorted) similarities -> a sparse representation with the given weighting and per-anchor weights."""
    w = weigh(sims, weighting, param)
    ids = np.asarray(ids, dtype=np.int64)
    if anchor_weights is not None:
        w = w * np.asarray(anchor_weights, dtype=np.float64)[ids]
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    w = np.divide(w, norms, out=np.zeros_like(w), where=norms > 0)
    return SparseRR(ids=ids, weights=w.astype(np.float32))
