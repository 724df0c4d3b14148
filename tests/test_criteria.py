"""Label-free criteria for k and p (asif.tuning.criteria): each checked against dense loops written out here, the
held-out
split and the clustering on their own, and a property on a synthetic world that a broken criterion would fail."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from asif.math.relrep import Weighting
from asif.tuning.autoselect import best_setting, group_holdout_split, mean_reciprocal_rank
from asif.tuning.criteria import criteria_grid, pair_zscore, pseudo_class_accuracy, recall_at_1, spherical_kmeans
from asif.tuning.synthetic import SyntheticWorld
from tests.conftest import random_unit


# -- an independent dense reference: loops over rows, float64, nothing from asif ---------------------------------------
def ref_relrep(query: np.ndarray, anchors: np.ndarray, k: int, p: float) -> np.ndarray:
    sims = [float(np.dot(query.astype(np.float64), a.astype(np.float64))) for a in anchors]
    order = sorted(range(len(sims)), key=lambda j: (-sims[j], j))[:k]
    out = np.zeros(len(anchors))
    for j in order:
        out[j] = max(sims[j], 0.0) ** p
    norm = np.sqrt(sum(w * w for w in out))
    return out / norm if norm > 0 else out


def ref_criteria(image, text, groups, train, held, k, p, clusters):
    """{name: value} at one (k, p); ``clusters``: {C: cluster of each held-out row, in the order of ``held``}."""
    ia, ta = image[train], text[train]
    held = list(held)
    held_groups = sorted({int(groups[r]) for r in held})
    caption_reps = [ref_relrep(text[r], ta, k, p) for r in held]
    r1, rr, zs = [], [], []
    pseudo = {c: [] for c in clusters}
    centroid_reps = {}
    for c, assign in clusters.items():
        reps = []
        for j in range(c):
            members = [text[r].astype(np.float64) for r, a in zip(held, assign, strict=True) if a == j]
            centre = np.sum(members, axis=0)
            reps.append(ref_relrep(centre / np.linalg.norm(centre), ta, k, p))
        centroid_reps[c] = reps
    for g in held_groups:
        rows = [i for i, r in enumerate(held) if groups[r] == g]
        img = ref_relrep(image[held[rows[0]]], ia, k, p)
        scores = [float(np.dot(img, rep)) for rep in caption_reps]
        top = max(range(len(scores)), key=lambda j: (scores[j], -j))  # the first of the best
        r1.append(1.0 if top in rows and scores[top] > 0 else 0.0)
        best_own = max(scores[j] for j in rows)
        ahead = sum(1 for j in range(len(scores)) if j not in rows and scores[j] >= best_own)
        rr.append(1.0 / (1 + ahead))
        mu = sum(scores) / len(scores)
        sd = np.sqrt(sum((s - mu) ** 2 for s in scores) / len(scores))
        mine = sum(scores[j] for j in rows) / len(rows)
        zs.append((mine - mu) / sd if sd > 0 else 0.0)
        for c, assign in clusters.items():
            to_labels = [float(np.dot(img, rep)) for rep in centroid_reps[c]]
            pred = max(range(c), key=lambda j: (to_labels[j], -j))
            share = sum(1 for j in rows if assign[j] == pred) / len(rows)
            pseudo[c].append(share if to_labels[pred] > 0 else 0.0)
    out = {"retrieval@1": np.mean(r1), "mrr": np.mean(rr), "zscore": np.mean(zs)}
    out.update({f"pseudo-class@{c}": np.mean(v) for c, v in pseudo.items()})
    return out


def grouped_data(rng, n_images=60, per_image=3, d_image=10, d_text=8):
    """Anchors as the caption mode forms them: each image's embedding repeated for each of its captions."""
    images = random_unit(rng, n_images, d_image)
    groups = np.repeat(np.arange(n_images), per_image)
    return images[groups], random_unit(rng, len(groups), d_text), groups


# -- the pieces --------------------------------------------------------------------------------------------------------
def test_group_holdout_split_holds_out_whole_groups():
    groups = np.repeat(np.arange(200), 5)[np.random.default_rng(0).permutation(1000)]
    train, held = group_holdout_split(groups, fraction=0.1, seed=3)
    assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == 1000
    assert len(np.unique(groups[held])) == 20 and len(held) == 100
    assert not set(groups[held]) & set(groups[train])
    again = group_holdout_split(groups, fraction=0.1, seed=3)
    assert np.array_equal(again[1], held)
    assert not np.array_equal(group_holdout_split(groups, fraction=0.1, seed=4)[1], held)
    assert len(np.unique(groups[group_holdout_split(groups, fraction=0.5, max_holdout=7)[1]])) == 7


def test_spherical_kmeans_recovers_separated_clusters_and_is_a_fixed_point(rng):
    centres = random_unit(rng, 5, 16) * 4
    truth = rng.integers(0, 5, 300)
    x = centres[truth] + 0.3 * rng.standard_normal((300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assign = spherical_kmeans(x, 5, seed=1)
    # the same partition up to the cluster names
    assert all(len(np.unique(assign[truth == t])) == 1 for t in range(5)) and len(np.unique(assign)) == 5
    assert np.array_equal(spherical_kmeans(x, 5, seed=1), assign)
    # Lloyd's fixed point: every row is in the cluster of the nearest normalised cluster mean
    means = np.stack([x[assign == j].sum(axis=0) for j in range(5)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    assert np.array_equal(np.argmax(x @ means.T, axis=1), assign)
    # noise without structure: every cluster used, any count up to n
    assert len(np.unique(spherical_kmeans(random_unit(rng, 40, 8), 12, seed=0))) == 12


def test_metrics_on_a_known_matrix():
    scores = np.array([[0.9, 0.5, 0.9, 0.1], [0.2, 0.3, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0]])
    own = np.array([[False, True, True, False], [True, False, False, False], [False, False, False, True]])
    assert recall_at_1(scores, own) == pytest.approx(0.0)  # row 0: the first of the best (col 0) is not its own
    # row 0: col 0 ties its best own (0.9) -> rank 2; row 1: 3 ahead; row 2: 3 ties at 0
    assert mean_reciprocal_rank(scores, own) == pytest.approx((1 / 2 + 1 / 4 + 1 / 4) / 3)
    z0 = (0.7 - 0.6) / np.std(scores[0])
    z1 = (0.2 - 0.275) / np.std(scores[1])
    assert pair_zscore(scores, own) == pytest.approx((z0 + z1 + 0.0) / 3)
    targets = np.array([[0.5, 0.5, 0.0], [0.0, 1 / 3, 2 / 3], [1.0, 0.0, 0.0]])
    label_scores = np.array([[0.1, 0.4, 0.2], [0.3, 0.1, 0.3], [0.0, 0.0, 0.0]])
    assert pseudo_class_accuracy(label_scores, targets) == pytest.approx((0.5 + 0.0 + 0.0) / 3)


def test_best_setting_breaks_ties_by_the_grid_order():
    grid = [(25, "a"), (25, "b"), (50, "a"), (100, "a")]
    table = {(50, "a"): 0.5, (25, "b"): 0.5, (25, "a"): 0.4, (100, "a"): 0.5}
    assert best_setting(table, grid) == (25, "b")
    assert best_setting(table, grid[::-1]) == (100, "a")
    assert best_setting({**table, (100, "a"): 0.6}, grid) == (100, "a")


# -- the grid against the dense loops ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_criteria_grid_equals_dense_loops(seed):
    rng = np.random.default_rng(seed)
    image, text, groups = grouped_data(rng)
    train, held = group_holdout_split(groups, fraction=0.25, seed=seed)
    ks, ps = (1, 4, 20, 500), (1.0, 3.0)  # 500 > the train anchors: all of them
    grid = criteria_grid(image, text, groups, train, held, ks, ps, n_clusters=(3, 6), seed=seed)
    clusters = {c: spherical_kmeans(text[held], c, seed=seed) for c in (3, 6)}
    for k in ks:
        for p in ps:
            ref = ref_criteria(image, text, groups, train, held, k, p, clusters)
            assert set(ref) == set(grid)
            for name, value in ref.items():
                assert grid[name][(k, Weighting("power", p))] == pytest.approx(value, abs=1e-5), (name, k, p)


def test_criteria_use_train_anchors_only():
    """Rows that are neither train nor held out (here 30 more pairs) change nothing: the representations are taken
    against the train anchors alone."""
    rng = np.random.default_rng(5)
    image, text, groups = grouped_data(rng)
    train, held = group_holdout_split(groups, fraction=0.25, seed=0)
    base = criteria_grid(image, text, groups, train, held, (10,), (2.0,), n_clusters=(4,))
    extra = np.concatenate([image, random_unit(rng, 30, image.shape[1])])  # rows nobody uses
    more_text = np.concatenate([text, random_unit(rng, 30, text.shape[1])])
    more_groups = np.concatenate([groups, np.full(30, 999)])
    same = criteria_grid(extra, more_text, more_groups, train, held, (10,), (2.0,), n_clusters=(4,))
    assert same == base


# -- a property on a synthetic world -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world_setup():
    """small_world's parameters, in a world of its own so that the data does not depend on test order."""
    world = SyntheticWorld(d_image=48, d_text=32, n_classes=12, latent_dim=12, seed=7)
    data = world.pairs(3000, n_queries=400)
    groups = np.arange(3000)
    train, held = group_holdout_split(groups, fraction=0.1, max_holdout=300, seed=0)
    ks, ps = (1, 3, 10, 30, 100, 300), (1.0, 4.0)
    grid = criteria_grid(data.image_anchors, data.text_anchors, groups, train, held, ks, ps, n_clusters=(12,))
    # the task the criteria stand for: classify the world's queries with its class labels, at every setting
    from asif.tuning.metrics import DenseSweep

    sweep = DenseSweep(data.image_queries, data.label_queries, data.image_anchors, data.text_anchors, max(ks))
    accuracy = {
        (k, Weighting("power", p)): float((np.argmax(sweep.scores(k, p), axis=1) == data.query_classes).mean())
        for k in ks
        for p in ps
    }
    return grid, accuracy


@pytest.mark.parametrize("name", ["retrieval@1", "mrr", "pseudo-class@12"])
def test_criteria_prefer_informative_settings_and_track_accuracy(world_setup, name):
    grid, accuracy = world_setup
    table = grid[name]
    p4 = Weighting("power", 4.0)
    assert table[(30, p4)] > table[(1, p4)] + 0.05  # k=1 shares almost no anchor between the two sides
    assert best_setting(table, list(table))[0] >= 10
    settings = list(accuracy)
    rho = spearmanr([table[s] for s in settings], [accuracy[s] for s in settings]).statistic
    assert rho > 0.5
