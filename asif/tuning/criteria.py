"""Label-free criteria for choosing k and the weighting from the pairs alone: the candidates compared in issue 18
(``bench/criteria.py``), as pure numpy functions. The one that won, mrr, is served by :mod:`asif.tuning.autoselect`.

The criterion before issue 18 held out 10% of the *rows* and scored retrieval@1 of each held-out image's own caption
(:func:`asif.tuning.metrics.retrieval_at_1`). With one anchor per caption, a held-out row's image is still an anchor
through its other captions (the same embedding, similarity 1), so that criterion mostly measures how much weight the
query puts on its own duplicates, which rewards a high p whatever k is. The criteria here hold out whole *images*
(every caption of a held-out image leaves the anchors; :func:`asif.tuning.autoselect.group_holdout_split`) and score the
held-out images against:

- ``retrieval``: all held-out captions (each image has several): recall@1 (its best-scored caption is one of its own)
  and the mean reciprocal rank of its best-ranked own caption (ties count against it);
- ``zscore``: the same scores, as the mean over images of (mean score of its own captions - the row's mean) / the row's
  standard deviation: how far its captions stand out of the distractors, a smooth agreement between the image-side and
  caption-side neighbourhoods;
- ``pseudo-class``: C pseudo-labels made from the text side only: spherical k-means of the held-out captions'
  embeddings into C clusters, each cluster's label embedding the normalised mean of its captions (as a class's label
  embedding is the normalised mean of its prompts). Every held-out image is classified by ASIF scores against the
  centroids' representations, like a zero-shot test; it gets the share of its captions that fall in the predicted
  cluster, and nothing when its best score is <= 0 (the evaluation's 'unknown').

Every representation is taken against the train anchors; one top-``max(ks)`` pass serves the whole grid
(:func:`criteria_grid`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from asif.math.normalise import l2_normalise
from asif.math.relrep import WeightingLike, as_weighting
from asif.math.topk import exact_topk
from asif.math.variants import standardised
from asif.tuning.autoselect import Setting, held_out_images, mean_reciprocal_rank
from asif.tuning.metrics import DenseSweep

CRITERIA = ("retrieval@1", "mrr", "zscore", "pseudo-class")


# -- pseudo-labels from the captions ----------------------------------------------------------------------------------
def spherical_kmeans(x: np.ndarray, n_clusters: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    """Cluster ids of the rows of ``x`` (L2-normalised) by cosine k-means, seeded k-means++ start, ``iters`` Lloyd
    steps at most; an emptied cluster restarts at the row worst served. Deterministic for a seed."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    c = min(int(n_clusters), n)
    rng = np.random.default_rng(seed)
    centres = [int(rng.integers(n))]
    best = x @ x[centres[0]]
    for _ in range(1, c):
        dist = np.maximum(1.0 - best, 0.0)
        total = dist.sum()
        nxt = int(rng.choice(n, p=dist / total)) if total > 0 else int(rng.integers(n))
        centres.append(nxt)
        best = np.maximum(best, x @ x[nxt])
    cent = x[centres].copy()
    assign = np.full(n, -1)
    for _ in range(iters):
        sims = x @ cent.T
        new = np.argmax(sims, axis=1)
        for j in range(c):
            if not (new == j).any():  # restart it at the row least similar to its own centre
                worst = int(np.argmin(sims[np.arange(n), new]))
                new[worst] = j
        if np.array_equal(new, assign):
            break
        assign = new
        for j in range(c):
            m = x[assign == j].sum(axis=0)
            cent[j] = m / max(np.linalg.norm(m), 1e-12)
    return assign


def cluster_labels(text: np.ndarray, clusters: np.ndarray, n_clusters: int) -> np.ndarray:
    """(n_clusters, d) pseudo-label embeddings: the normalised mean of each cluster's rows of ``text``."""
    sums = np.zeros((n_clusters, text.shape[1]))
    np.add.at(sums, clusters, np.asarray(text, dtype=np.float64))
    return l2_normalise(sums.astype(np.float32))


def cluster_targets(own: np.ndarray, clusters: np.ndarray, n_clusters: int) -> np.ndarray:
    """(groups, n_clusters): the share of each group's held-out rows in each cluster."""
    onehot = np.zeros((own.shape[1], n_clusters))
    onehot[np.arange(own.shape[1]), clusters] = 1.0
    counts = own.astype(np.float64) @ onehot
    return counts / counts.sum(axis=1, keepdims=True)


# -- the criteria, from a score matrix -------------------------------------------------------------------------------
def recall_at_1(scores: np.ndarray, own: np.ndarray) -> float:
    """Share of images (rows) whose best-scored caption (first on ties) is one of its own and scores > 0."""
    best = np.argmax(scores, axis=1)
    rows = np.arange(len(scores))
    return float((own[rows, best] & (scores[rows, best] > 0)).mean())


def pair_zscore(scores: np.ndarray, own: np.ndarray) -> float:
    """Mean over images of (mean score of its own captions - row mean) / row standard deviation (0 where the row is
    constant)."""
    z = standardised(scores)  # z is linear in the score: the mean of the own captions' z is the z of their mean
    return float(((z * own).sum(axis=1) / own.sum(axis=1)).mean())


def pseudo_class_accuracy(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over images of targets[i, argmax_c scores[i, c]] (first on ties), 0 where the best score is <= 0."""
    pred = np.argmax(scores, axis=1)
    rows = np.arange(len(scores))
    return float(np.where(scores[rows, pred] > 0, targets[rows, pred], 0.0).mean())


# -- the whole grid from one top-k pass --------------------------------------------------------------------------------
def criteria_grid(
    image_anchors: np.ndarray,
    text_anchors: np.ndarray,
    groups: np.ndarray,
    train: np.ndarray,
    held: np.ndarray,
    ks: Sequence[int],
    weightings: Sequence[WeightingLike],
    n_clusters: Sequence[int] = (10, 50),
    seed: int = 0,
) -> dict[str, dict[Setting, float]]:
    """Every criterion at every (k, weighting): {name: {(k, weighting): value}} (a bare number is the power p);
    names ``retrieval@1``, ``mrr``, ``zscore`` and ``pseudo-class@C`` for each C of ``n_clusters`` (k-means seeded
    with ``seed``). ``groups[r]``: the image of anchor row r (rows of one image share its embedding); ``held`` must
    hold whole groups (:func:`asif.tuning.autoselect.group_holdout_split`). Tables follow ks ascending, then the
    weightings in the order given (:func:`asif.tuning.autoselect.best_setting`'s tie order)."""
    img_rows, own = held_out_images(groups, held)
    held_text = text_anchors[held]
    labels, targets = {}, {}
    for c in n_clusters:
        clusters = spherical_kmeans(held_text, c, seed=seed)
        labels[c] = cluster_labels(held_text, clusters, c)
        targets[c] = cluster_targets(own, clusters, c)
    ia, ta = image_anchors[train], text_anchors[train]
    k_max = max(ks)
    image = exact_topk(image_anchors[img_rows], ia, k_max)
    caption_sweep = DenseSweep.from_neighbours(image, exact_topk(held_text, ta, k_max))
    label_sweeps = {c: DenseSweep.from_neighbours(image, exact_topk(labels[c], ta, k_max)) for c in n_clusters}
    out: dict[str, dict[Setting, float]] = {name: {} for name in ("retrieval@1", "mrr", "zscore")}
    out.update({f"pseudo-class@{c}": {} for c in n_clusters})
    for k in sorted(set(ks)):
        for w in weightings:
            key = (int(k), as_weighting(w))
            s = caption_sweep.scores(*key)
            out["retrieval@1"][key] = recall_at_1(s, own)
            out["mrr"][key] = mean_reciprocal_rank(s, own)
            out["zscore"][key] = pair_zscore(s, own)
            for c, sweep in label_sweeps.items():
                out[f"pseudo-class@{c}"][key] = pseudo_class_accuracy(sweep.scores(*key), targets[c])
    return out
