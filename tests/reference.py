"""Independent dense reference of the ASIF formula, for the tests. Imports nothing from ``asif``.

Relative representation of a query q against anchors A (rows L2-normalised, as the stores hold
them): cosine similarities A @ q in float64, the top k kept (ties at the k-th place broken by the
smaller anchor id, similarities compared on a grid of 2**-17), negatives clamped to 0, raised to
the power p (or another weighting: see :func:`kept_weights`), L2-normalised. The score of an image
against a text is the dot product of their two representations (images against image anchors, texts
against caption anchors, anchor i = pair i).
"""

from __future__ import annotations

import numpy as np

GRID = 2.0**-17  # similarities in one cell of this grid count as equal; the smaller id goes first


def topk(
    queries: np.ndarray, anchors: np.ndarray, k: int, ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(sims, idx), each (b, min(k, n)): the k best anchors of every query, best first.

    Order: similarity cell descending, then anchor id ascending (``ids[j]`` names row j, default j).
    ``idx`` holds row numbers of ``anchors``.
    """
    sims = np.asarray(queries, dtype=np.float64) @ np.asarray(anchors, dtype=np.float64).T
    n = sims.shape[1]
    names = np.arange(n) if ids is None else np.asarray(ids)
    top = [np.lexsort((names, -np.floor(row / GRID)))[: min(k, n)] for row in sims]
    idx = np.array(top, dtype=np.int64).reshape(len(sims), min(k, n))
    return np.take_along_axis(sims, idx, axis=1), idx


def kept_weights(sims: np.ndarray, weighting: str, param: float) -> np.ndarray:
    """Weights of the k kept similarities of each row (best first), before normalisation.

    power: s ** p; softmax: exp(s / t) (any common factor cancels in the normalisation); rank: 1 / (position + r0),
    the best at position 0. Similarities <= 0 weigh 0 whatever the weighting.
    """
    out = np.zeros_like(sims)
    for r, row in enumerate(sims):
        for j, s in enumerate(row):
            if s <= 0:
                continue
            if weighting == "power":
                out[r, j] = s**param
            elif weighting == "softmax":
                out[r, j] = np.exp((s - row.max()) / param)  # shifted by the row's best: no overflow
            elif weighting == "rank":
                out[r, j] = 1.0 / (j + param)
            else:
                raise ValueError(weighting)
    return out


def relrep(
    queries: np.ndarray,
    anchors: np.ndarray,
    k: int,
    p: float,
    weighting: str = "power",
    anchor_weights: np.ndarray | None = None,
) -> np.ndarray:
    """(b, n) dense relative representations (``p``: the weighting's parameter, p / t / r0); ``anchor_weights``
    multiply each kept anchor's weight before the normalisation."""
    sims, idx = topk(queries, anchors, k)
    out = np.zeros((len(sims), np.shape(anchors)[0]))
    weights = kept_weights(sims, weighting, p)
    if anchor_weights is not None:
        weights = weights * np.asarray(anchor_weights, dtype=np.float64)[idx]
    np.put_along_axis(out, idx, weights, axis=1)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)


def scores(
    image_queries: np.ndarray,
    text_queries: np.ndarray,
    image_anchors: np.ndarray,
    text_anchors: np.ndarray,
    k: int,
    p: float,
    weighting: str = "power",
) -> np.ndarray:
    """(n_images, n_texts) ASIF similarities."""
    return relrep(image_queries, image_anchors, k, p, weighting) @ relrep(text_queries, text_anchors, k, p, weighting).T
