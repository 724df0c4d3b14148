"""Training-free variants of the ASIF recipe, compared with the default by ``asif eval --candidates`` (pure math).

- **Centering**: subtract a modality's mean anchor embedding from its anchors and queries, then re-normalise,
  before the cosine similarities.
- **Hubness correction**: an anchor image that is among the top-k neighbours of many other anchor images is near
  every query. Each anchor's weight is multiplied by an IDF factor ``log(N / (1 + occurrences))``, computed once
  from the anchor images (identical images count once).

- **Prior balancing over a batch** (in the style of OTTER, Shin et al., NeurIPS 2024): a batch's image x label scores
  become probabilities (a softmax at temperature t per image), and Sinkhorn finds one log-offset per label such that
  the batch's predicted mass per label matches a prior (uniform by default). It corrects a label that the anchors
  favour for every image. A batch of one image is returned unchanged: there is no batch to balance.

- **Per-label hubness correction** (in the style of NNN, Chowdhury et al., EMNLP 2024): a label that scores high
  against every image gets a bias. The reference bank is up to ``NNN_BANK`` distinct anchor images, each represented
  against the anchors without its own pairs; a label's bias is the mean of its ``NNN_NEIGHBOURS`` best scores over
  the bank, and its score becomes ``score - alpha * bias``.
- **A closed-form second scorer** (orthogonal Procrustes, as in Maiorca et al., NeurIPS 2023): the semi-orthogonal
  map R that best takes the anchor images onto their captions; its cosine ``cos(x R, label)`` is standardised per
  image and added, times a weight, to the standardised ASIF scores.

The weighting functions (power, softmax, rank) are served options and live in :mod:`asif.math.relrep`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from asif.math.normalise import l2_normalise
from asif.math.topk import exact_topk

HUBNESS_FLOOR = 1e-3  # an anchor in everyone's neighbourhood keeps a tiny weight, never exactly 0
BALANCE_ITERATIONS = 1000  # at most; Sinkhorn stops once every label's share is within BALANCE_TOLERANCE
BALANCE_TOLERANCE = 1e-9
# Entries x sweeps per call: a served batch is balanced under the model's read lock, so its worst case must stay
# short (~80 ms here: 64 images x 10,000 labels get 7 sweeps; 64 x 100 get all 1,000 in ~45 ms).
BALANCE_MAX_WORK = 5 * 10**6
# The served default: 0.005-0.02 were within 1.4 points of each other on the development runs (docs/evaluation.md).
BALANCE_TEMPERATURE = 0.01
NNN_BANK = 2000  # reference images of the per-label bias: at most this many distinct anchor images (seeded sample)
NNN_NEIGHBOURS = 64  # a label's bias is the mean of its this-many best scores over the reference bank


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


def reference_bank(keys: np.ndarray, size: int = NNN_BANK, seed: int = 0) -> np.ndarray:
    """Rows of up to ``size`` distinct images (rows with equal ``keys`` hold the same image; the first row of each
    sampled image), ascending."""
    _, first = np.unique(np.asarray(keys), return_index=True)
    if len(first) > size:
        first = np.random.default_rng(seed).choice(first, size=size, replace=False)
    return np.sort(first)


def bank_neighbours(
    image_anchors: np.ndarray, keys: np.ndarray, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(sims, ids): each bank row's top-k anchor images (best first) among the anchors that do not hold its own
    image. k shrinks to what every row can have when the anchors are few."""
    keys = np.asarray(keys)
    own_most = int(np.unique(keys, return_counts=True)[1].max())
    k = max(0, min(int(k), len(image_anchors) - own_most))
    sims, ids = exact_topk(image_anchors[rows], image_anchors, k + own_most)
    own = keys[ids] == keys[rows][:, None]
    order = np.argsort(own, axis=1, kind="stable")[:, :k]  # the others first, in their order
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(ids, order, axis=1)


def nnn_bias(bank_scores: np.ndarray, neighbours: int = NNN_NEIGHBOURS) -> np.ndarray:
    """Per label (column of the bank images x labels scores): the mean of its ``neighbours`` best scores."""
    m = max(1, min(int(neighbours), len(bank_scores)))
    return -np.partition(-np.asarray(bank_scores, dtype=np.float64), m - 1, axis=0)[:m].mean(axis=0)


def procrustes_map(image_anchors: np.ndarray, text_anchors: np.ndarray) -> np.ndarray:
    """The (d_image, d_text) semi-orthogonal R maximising trace(R^T X^T Y) over the pairs (X, Y): U V^T of the SVD of
    X^T Y. Only the running sum X^T Y is needed, so an edit would add or subtract one outer product."""
    cross = np.asarray(image_anchors, dtype=np.float64).T @ np.asarray(text_anchors, dtype=np.float64)
    u, _, vt = np.linalg.svd(cross, full_matrices=False)
    return (u @ vt).astype(np.float32)


def standardised(scores: np.ndarray) -> np.ndarray:
    """Each row minus its mean, over its standard deviation (a constant row becomes 0)."""
    s = np.asarray(scores, dtype=np.float64)
    sd = s.std(axis=1, keepdims=True)
    return np.divide(s - s.mean(axis=1, keepdims=True), sd, out=np.zeros_like(s), where=sd > 0)


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(top, axis=axis) + np.log(np.sum(np.exp(x - top), axis=axis))


def prior_balanced(
    scores: np.ndarray, temperature: float, prior: np.ndarray | None = None, iterations: int = BALANCE_ITERATIONS
) -> np.ndarray:
    """Per image, the log-probabilities of the labels after balancing the batch to ``prior`` (uniform if None).

    ``log p(y|x) = log softmax(scores[x] / temperature)``; Sinkhorn alternates a per-image normaliser and a per-label
    offset ``v`` until every image's mass is 1 and label y's share of the batch is ``prior[y]`` (or for at most
    ``iterations`` sweeps, and ``BALANCE_MAX_WORK`` entries x sweeps: a request's cost is bounded). Returns
    ``log p(y|x) + v[y]`` renormalised per image (its argmax is the balanced prediction). One image: the scores'
    own log-softmax (nothing to balance)."""
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    s = np.asarray(scores, dtype=np.float64) / temperature
    n, c = s.shape
    logp = s - _logsumexp(s, axis=1)[:, None]
    if n < 2 or c < 2:
        return logp
    target = np.full(c, 1.0 / c) if prior is None else np.asarray(prior, dtype=np.float64) / np.sum(prior)
    log_target = np.log(np.maximum(target, 1e-300))
    offset = np.zeros(c)
    for _ in range(min(iterations, max(1, BALANCE_MAX_WORK // (n * c)))):
        rows = logp + offset
        rows -= _logsumexp(rows, axis=1)[:, None]  # every image's mass is 1
        share = _logsumexp(rows, axis=0) - np.log(n)  # each label's share of the batch
        offset += log_target - share
        if np.max(np.abs(np.exp(share) - target)) < BALANCE_TOLERANCE:
            break
    balanced = logp + offset
    return balanced - _logsumexp(balanced, axis=1)[:, None]


@dataclass(frozen=True)
class Balance:
    """A batch's predictions balanced to a label prior (:func:`prior_balanced`): a served option of multi-image
    classification. ``prior``: one non-negative weight per label (None: uniform)."""

    temperature: float = BALANCE_TEMPERATURE
    prior: tuple[float, ...] | None = None

    def check(self, n_labels: int) -> None:
        """ValueError unless the temperature is positive and finite and the prior fits ``n_labels`` labels."""
        if not np.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"the balancing temperature must be a positive finite number, got {self.temperature!r}")
        if self.prior is None:
            return
        prior = np.asarray(self.prior, dtype=np.float64)
        if len(prior) != n_labels:
            raise ValueError(f"the prior has {len(prior)} weights for {n_labels} labels")
        if not np.all(np.isfinite(prior)) or np.any(prior < 0) or prior.sum() <= 0:
            raise ValueError("the prior's weights must be finite, non-negative and not all zero")

    def probabilities(self, scores: np.ndarray) -> np.ndarray | None:
        """The balanced per-image label probabilities of a batch's scores; None for fewer than 2 images (a lone
        image's answer is never changed)."""
        if len(scores) < 2:
            return None
        self.check(scores.shape[1])
        prior = None if self.prior is None else np.asarray(self.prior, dtype=np.float64)
        return np.exp(prior_balanced(scores, self.temperature, prior))

    @classmethod
    def of(cls, temperature: float | None, prior: Sequence[float] | None) -> Balance:
        return cls(BALANCE_TEMPERATURE if temperature is None else float(temperature), tuple(prior) if prior else None)
