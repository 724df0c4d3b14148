"""Training-free variants of the ASIF recipe, compared with the default by ``asif eval --candidates`` (pure math).

- **Centering**: subtract a modality's mean anchor embedding from its anchors and queries, then re-normalise,
  before the cosine similarities.
- **Hubness correction**: an anchor image that is among the top-k neighbours of many other anchor images is near
  every query. Each anchor's weight is multiplied by an IDF factor ``log(N / (1 + occurrences))``, computed once
  from the anchor images (identical images count once).

The weighting functions (power, softmax, rank) are served options and live in :mod:`asif.relrep`.
"""

from __future__ import annotations

import numpy as np

from asif.encoders.base import l2_normalise
from asif.relrep import exact_topk

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
