"""Evaluation math: metrics, a fast exact sweep over (k, weighting), the ridge baseline and its lambda chosen from
the pairs alone (k and the weighting are chosen in :mod:`asif.tuning.autoselect`).

Everything here is pure numpy on embeddings. The sweep is exact: for every query it sorts the
top ``max(k)`` similarities once, and the representation for a smaller k is a prefix of that
list (tests check it against the independent reference in tests/reference.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from asif.math.normalise import l2_normalise
from asif.math.relrep import KeyMatrix, WeightingLike, sparsify
from asif.math.topk import effective_k, exact_topk


# -- metrics ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metrics:
    top1: float
    top5: float
    per_class: dict[str, float]
    unknown_share: float
    n: int

    def to_dict(self) -> dict:
        return {
            "top1": self.top1,
            "top5": self.top5,
            "per_class": self.per_class,
            "unknown_share": self.unknown_share,
            "n": self.n,
        }


def topk_accuracy(scores: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the k highest scores (ties broken by class order)."""
    if len(truth) == 0:
        return 0.0
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == truth[:, None]).any(axis=1).mean())


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row of ``truth`` (the exact neighbours' ids) that ``found`` holds."""
    return float(np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def predictions(scores: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """argmax per row; -1 ('unknown') where the best score is 0 or below the threshold."""
    pred = np.argmax(scores, axis=1)
    best = scores[np.arange(len(scores)), pred]
    unknown = best <= 0 if threshold is None else (best <= 0) | (best < threshold)
    return np.where(unknown, -1, pred)


def evaluate(scores: np.ndarray, truth: np.ndarray, classes: Sequence[str], threshold: float | None = None) -> Metrics:
    pred = predictions(scores, threshold)
    per_class = {
        name: float((pred[truth == c] == c).mean()) if (truth == c).any() else float("nan")
        for c, name in enumerate(classes)
    }
    return Metrics(
        top1=float((pred == truth).mean()) if len(truth) else 0.0,
        top5=topk_accuracy(scores, truth, 5),
        per_class=per_class,
        unknown_share=float((pred == -1).mean()) if len(truth) else 0.0,
        n=len(truth),
    )


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes + 1) counts: rows true class, columns predicted, last column 'unknown'."""
    out = np.zeros((n_classes, n_classes + 1), dtype=np.int64)
    np.add.at(out, (truth, np.where(pred < 0, n_classes, pred)), 1)
    return out


def nested_subsets(n: int, sizes: Iterable[int], seed: int = 0) -> list[np.ndarray]:
    """Nested random subsets of range(n): each is a prefix of one seeded permutation."""
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(perm[: min(int(s), n)]) for s in sizes]


# -- exact ASIF scores for many (k, p) at once ----------------------------------------------------
class DenseSweep:
    """Exact ASIF scores of queries vs keys for any k <= k_max and any weighting, from one top-k_max pass."""

    def __init__(
        self,
        image_queries: np.ndarray,
        text_queries: np.ndarray,
        image_anchors: np.ndarray,
        text_anchors: np.ndarray,
        k_max: int,
    ) -> None:
        n = len(image_anchors)
        self.k_max = effective_k(k_max, n)
        self.img_s, self.img_i = exact_topk(image_queries, image_anchors, self.k_max)
        self.txt_s, self.txt_i = exact_topk(text_queries, text_anchors, self.k_max)

    @classmethod
    def from_neighbours(cls, image: tuple[np.ndarray, np.ndarray], text: tuple[np.ndarray, np.ndarray]) -> DenseSweep:
        """A sweep over neighbours found elsewhere: (sims, ids) per side, rows sorted by decreasing similarity."""
        sweep = cls.__new__(cls)
        (sweep.img_s, sweep.img_i), (sweep.txt_s, sweep.txt_i) = image, text
        sweep.k_max = min(sweep.img_s.shape[1], sweep.txt_s.shape[1])
        return sweep

    def scores(self, k: int, p: WeightingLike) -> np.ndarray:
        k = min(k, self.k_max)
        img = sparsify(self.img_s[:, :k], self.img_i[:, :k], p)
        keys = KeyMatrix.from_rr(sparsify(self.txt_s[:, :k], self.txt_i[:, :k], p))
        return keys.score(img)


# -- baseline -------------------------------------------------------------------------------------
def fit_ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """W minimising ||x W - y||^2 + lam ||W||^2 (closed form, float64)."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    gram = x64.T @ x64 + lam * np.eye(x.shape[1])
    return np.linalg.solve(gram, x64.T @ y64)


def ridge_scores(w: np.ndarray, image_queries: np.ndarray, text_queries: np.ndarray) -> np.ndarray:
    """Cosine between mapped images and text embeddings."""
    mapped = l2_normalise((image_queries.astype(np.float64) @ w).astype(np.float32))
    return mapped @ text_queries.T


# -- choosing k, p (and the ridge lambda) from the pairs alone ----------------------------------------
def holdout_split(
    n: int, fraction: float = 0.1, max_holdout: int = 1000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    m = max(2, min(max_holdout, int(n * fraction)))
    return np.sort(perm[m:]), np.sort(perm[:m])


def retrieval_at_1(scores: np.ndarray) -> float:
    """Image i's own caption ranked first among the held-out captions (scores: images x captions): the ridge lambda's
    criterion, and ``--auto``'s before issue 18."""
    return float((np.argmax(scores, axis=1) == np.arange(len(scores))).mean())


def auto_ridge_lambda(
    image_anchors: np.ndarray, text_anchors: np.ndarray, lams: Sequence[float], seed: int = 0
) -> tuple[float, dict[float, float]]:
    train, held = holdout_split(len(image_anchors), seed=seed)
    table = {
        lam: retrieval_at_1(
            ridge_scores(
                fit_ridge(image_anchors[train], text_anchors[train], lam), image_anchors[held], text_anchors[held]
            )
        )
        for lam in lams
    }
    return max(table, key=lambda lam: (table[lam], lam)), table
