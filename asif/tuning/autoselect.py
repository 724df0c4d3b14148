"""Choosing k and the weighting from the pairs alone (``asif eval --auto``, ``asif build --auto``; issue 18).

Whole *images* are held out: every anchor row of a held-out image (all its captions, with one anchor per caption)
leaves the anchors, so a held-out query cannot find itself among them. Each held-out image is scored against all the
held-out captions, and a setting scores the mean reciprocal rank of the image's best-ranked own caption (ties count
against it). The table is the mean over a few seeded splits; the setting with the highest mean wins.

Rows belong to the same image when their image vectors are byte-identical (:func:`image_keys`, a content hash), so
the in-memory selection (:func:`auto_kp`) and the build's, streamed over shard files
(:mod:`index_builder.auto_select`), hold out the same rows without any file names. Both hand their neighbours to
:func:`choose_from_neighbours`, the one place the criterion is computed.

The criterion replaced retrieval@1 of held-out *rows*, whose image stayed an anchor through its other captions; over
the k x p grid on Imagenette and CIFAR-10 that one's Spearman correlation with test top-1 was -0.27..+0.03, this
one's +0.80..+0.92 (docs/evaluation.md, "Choosing k and the weighting without labels"; ``bench/criteria.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from asif.math.relrep import Weighting, WeightingLike, as_weighting
from asif.math.rowhash import row_hashes
from asif.math.topk import effective_k, exact_topk
from asif.tuning.metrics import DenseSweep

AUTO_KS = (25, 50, 100, 200, 400, 800, 1600)
AUTO_WEIGHTINGS = (
    *(Weighting("power", p) for p in (1.0, 2.0, 3.0, 4.0, 6.0, 8.0)),
    *(Weighting("softmax", t) for t in (0.01, 0.02, 0.05, 0.1)),
)
AUTO_SPLITS = 3
HOLDOUT_FRACTION = 0.1
MAX_HOLDOUT_IMAGES = 1000
CRITERION = "mean reciprocal rank of held-out images' own captions (whole images held out), mean over splits"
Neighbours = tuple[np.ndarray, np.ndarray]  # (sims, anchor ids), rows sorted by decreasing similarity
Setting = tuple[int, Weighting]


# -- which rows are held out ------------------------------------------------------------------------------------------
def image_keys(image_vectors: np.ndarray) -> np.ndarray:
    """A 64-bit content hash of each row (as float32 bytes): rows holding the same image share their key."""
    return row_hashes(np.asarray(image_vectors, dtype=np.float32))


class TooFewImagesError(ValueError):
    """Holding whole images out needs at least 3 distinct images."""


def group_holdout_split(
    groups: np.ndarray, fraction: float = HOLDOUT_FRACTION, max_holdout: int = MAX_HOLDOUT_IMAGES, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows): a seeded ``fraction`` of the distinct groups (e.g. images; at most
    ``max_holdout``, at least 2) is held out with all its rows. Raises TooFewImagesError below 3 groups."""
    groups = np.asarray(groups)
    distinct = np.unique(groups)
    if len(distinct) < 3:
        have = len(distinct)
        raise TooFewImagesError(f"holding whole images out needs at least 3 distinct images; these anchors have {have}")
    perm = np.random.default_rng(seed).permutation(len(distinct))
    m = max(2, min(max_holdout, int(len(distinct) * fraction)))
    held = np.isin(groups, distinct[perm[:m]])
    return np.flatnonzero(~held), np.flatnonzero(held)


def held_out_images(groups: np.ndarray, held: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(one row per held-out group: its first held-out row, own mask (groups x held rows): row j belongs to group g)."""
    g = np.asarray(groups)[held]
    _, first, inverse = np.unique(g, return_index=True, return_inverse=True)
    own = inverse[None, :] == np.arange(len(first))[:, None]
    return held[first], own


@dataclass(frozen=True)
class HoldOut:
    """One split: ``train`` rows stay anchors, the ``held`` rows (whole images) are the captions scored, ``queries``
    holds one row per held-out image and ``own[i, j]`` says held row j is a caption of query i."""

    seed: int
    train: np.ndarray
    held: np.ndarray
    queries: np.ndarray
    own: np.ndarray = field(repr=False)


def holdouts(keys: np.ndarray, seed: int = 0, splits: int = AUTO_SPLITS) -> list[HoldOut]:
    """The ``splits`` held-out splits of seeds ``seed``, ``seed + 1``, ... over rows grouped by ``keys``."""
    out = []
    for s in range(seed, seed + splits):
        train, held = group_holdout_split(keys, seed=s)
        queries, own = held_out_images(keys, held)
        out.append(HoldOut(s, train, held, queries, own))
    return out


# -- the criterion ----------------------------------------------------------------------------------------------------
def mean_reciprocal_rank(scores: np.ndarray, own: np.ndarray) -> float:
    """Mean over images of 1 / (1 + the number of other captions scored >= its best own caption)."""
    best_own = np.where(own, scores, -np.inf).max(axis=1)
    ahead = ((scores >= best_own[:, None]) & ~own).sum(axis=1)
    return float((1.0 / (1.0 + ahead)).mean())


def settings_grid(ks: Sequence[int], weightings: Sequence[WeightingLike]) -> list[Setting]:
    """Every (k, weighting), k ascending, weightings in the order given (a bare number is the power p)."""
    return [(int(k), as_weighting(w)) for k in sorted(set(ks)) for w in weightings]


def best_setting(table: dict[Setting, float], grid: Sequence[Setting]) -> Setting:
    """The highest value; ties go to the smaller k, then to the earlier weighting."""
    return max(grid, key=lambda kw: (table[kw], -grid.index(kw)))


@dataclass(frozen=True)
class AutoChoice:
    k: int
    weighting: Weighting
    table: dict[Setting, float]  # the criterion per (k, weighting), mean over the splits
    held_out_images: tuple[int, ...]  # per split
    seeds: tuple[int, ...]
    seconds: float = 0.0

    @property
    def score(self) -> float:
        return self.table[(self.k, self.weighting)]

    def entry(self) -> dict[str, Any]:
        """How the defaults were chosen, with the whole table (the manifest's and the eval report's ``auto``)."""
        return {
            "criterion": CRITERION,
            "held_out_images": list(self.held_out_images),
            "seeds": list(self.seeds),
            "table": {f"{k},{w.describe()}": value for (k, w), value in self.table.items()},
        }


def choose_from_neighbours(
    splits: Sequence[HoldOut],
    neighbours: Sequence[tuple[Neighbours, Neighbours]],
    ks: Sequence[int] = AUTO_KS,
    weightings: Sequence[WeightingLike] = AUTO_WEIGHTINGS,
) -> AutoChoice:
    """The choice, given for each split its held-out images' and captions' top neighbours among its train anchors
    (any id space shared by both sides, at least ``max(ks)`` deep where there are that many)."""
    grid = settings_grid(ks, weightings)
    total = dict.fromkeys(grid, 0.0)
    for split, (image, text) in zip(splits, neighbours, strict=True):
        sweep = DenseSweep.from_neighbours(image, text)
        for kw in grid:
            total[kw] += mean_reciprocal_rank(sweep.scores(*kw), split.own)
    table = {kw: v / len(splits) for kw, v in total.items()}
    k, weighting = best_setting(table, grid)
    return AutoChoice(k, weighting, table, tuple(len(s.queries) for s in splits), tuple(s.seed for s in splits))


def auto_kp(
    image_anchors: np.ndarray,
    text_anchors: np.ndarray,
    ks: Sequence[int] = AUTO_KS,
    weightings: Sequence[WeightingLike] = AUTO_WEIGHTINGS,
    seed: int = 0,
    splits: int = AUTO_SPLITS,
) -> AutoChoice:
    """The (k, weighting) of the grid with the best held-out mrr over these anchors (rows: pairs), in memory."""
    neighbours = []
    chosen = holdouts(image_keys(image_anchors), seed, splits)
    for split in chosen:
        k = effective_k(max(ks), len(split.train))
        image = exact_topk(image_anchors[split.queries], image_anchors[split.train], k)
        text = exact_topk(text_anchors[split.held], text_anchors[split.train], k)
        neighbours.append((image, text))
    return choose_from_neighbours(chosen, neighbours, ks, weightings)
