"""The label-free choice of k and the weighting (asif.tuning.autoselect): whole images held out, chosen by content so
that the in-memory and the streamed build agree, and the mrr table against a dense reference written here from the
definition (tests/reference.py for the representations, loops for the ranks)."""

import numpy as np
import pytest

from asif.math.normalise import l2_normalise
from asif.math.relrep import Weighting
from asif.tuning.autoselect import auto_kp, holdouts, image_keys
from asif.tuning.synthetic import SyntheticWorld
from tests import reference


def caption_anchors(n_images: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Anchors as the caption mode forms them: 1-4 noisy captions per image, each with its image's vector."""
    world = SyntheticWorld(d_image=24, d_text=16, n_classes=6, latent_dim=6, seed=seed)
    image, text = world.anchors(n_images)
    rng = np.random.default_rng(seed)
    per_image = rng.integers(1, 5, n_images)
    rows = np.repeat(np.arange(n_images), per_image)
    captions = l2_normalise(text[rows] + 0.4 * rng.standard_normal((len(rows), text.shape[1])).astype(np.float32))
    return image[rows], captions


def distinct_rows(x: np.ndarray, rows: np.ndarray) -> set[bytes]:
    return {x[r].tobytes() for r in rows}


def test_image_keys_name_the_content():
    image, _ = caption_anchors(50)
    keys = image_keys(image)
    same = (image[:, None, :] == image[None, :, :]).all(axis=2)
    assert np.array_equal(keys[:, None] == keys[None, :], same)  # equal keys exactly where the vectors are equal
    assert np.array_equal(image_keys(image.astype(np.float64)), keys)  # float32 values, whatever the array type
    assert np.array_equal(image_keys(image[::-1]), keys[::-1])


def test_holdouts_hold_out_whole_images_chosen_by_content():
    image, _ = caption_anchors(300)
    splits = holdouts(image_keys(image), seed=4, splits=3)
    assert [s.seed for s in splits] == [4, 5, 6]
    for s in splits:
        assert len(np.intersect1d(s.train, s.held)) == 0 and len(s.train) + len(s.held) == len(image)
        assert not distinct_rows(image, s.train) & distinct_rows(image, s.held)  # no held image stays an anchor
        assert len(s.queries) == len(distinct_rows(image, s.held)) == 30  # 10% of the images, one query each
        for i, q in enumerate(s.queries):  # own[i]: exactly the held rows of query i's image
            assert np.array_equal(s.own[i], (image[s.held] == image[q]).all(axis=1))
    assert len({frozenset(distinct_rows(image, s.held)) for s in splits}) == 3  # three different splits

    # The same images are held out whatever the order of the rows: the choice depends on content alone.
    perm = np.random.default_rng(0).permutation(len(image))
    again = holdouts(image_keys(image[perm]), seed=4, splits=3)
    for a, b in zip(splits, again, strict=True):
        assert distinct_rows(image, a.held) == distinct_rows(image[perm], b.held)

    with pytest.raises(ValueError, match="at least 3 distinct images; these anchors have 2"):
        holdouts(image_keys(np.eye(4, dtype=np.float32)[[0, 0, 1, 0]]))


def reference_mrr(image, text, train, held, k, kind, param):
    """Mean over held-out images (distinct image vectors among the held rows) of 1 / (1 + the number of other held
    captions scoring at least as high as its best own caption)."""
    ia, ta = image[train], text[train]
    caption_reps = reference.relrep(text[held], ta, k, param, kind)
    out = []
    for vec in {image[r].tobytes(): image[r] for r in held}.values():
        rep = reference.relrep(vec[None, :], ia, k, param, kind)[0]
        scores = caption_reps @ rep
        own = [j for j, r in enumerate(held) if np.array_equal(image[r], vec)]
        best = max(scores[j] for j in own)
        ahead = sum(1 for j in range(len(held)) if j not in own and scores[j] >= best - 1e-9)
        out.append(1.0 / (1 + ahead))
    return float(np.mean(out))


def test_auto_kp_table_is_the_mean_mrr_over_splits_and_picks_its_best():
    image, text = caption_anchors(120, seed=2)
    ks = (1, 5, 40, 1000)  # 1000 > the train anchors: all of them
    weightings = (Weighting("power", 1.0), Weighting("power", 8.0), Weighting("softmax", 0.05))
    choice = auto_kp(image, text, ks, weightings, seed=1, splits=2)
    splits = holdouts(image_keys(image), seed=1, splits=2)
    assert choice.seeds == (1, 2) and choice.held_out_images == (12, 12)
    assert list(choice.table) == [(k, w) for k in ks for w in weightings]
    for (k, w), value in choice.table.items():
        expected = np.mean([reference_mrr(image, text, s.train, s.held, k, w.kind, w.param) for s in splits])
        assert value == pytest.approx(expected, abs=1e-5), (k, w)
    best = max(choice.table.values())
    assert choice.score == best and choice.table[(1, weightings[0])] < best  # the grid discriminates
    first_best = next(kw for kw, v in choice.table.items() if v == best)
    assert (choice.k, choice.weighting) == first_best  # ties: the smaller k, then the earlier weighting


def test_auto_kp_prefers_informative_settings_on_a_world():
    """A world whose captions are informative: k=1 shares almost no anchor between the sides, and the criterion
    follows the classification accuracy of the world's queries across the grid."""
    from scipy.stats import spearmanr

    from asif.tuning.metrics import DenseSweep

    world = SyntheticWorld(d_image=48, d_text=32, n_classes=12, latent_dim=12, seed=7)
    data = world.pairs(3000, n_queries=400)
    ks, ps = (1, 3, 10, 30, 100, 300), (1.0, 4.0)
    choice = auto_kp(data.image_anchors, data.text_anchors, ks, ps, seed=0)
    assert choice.k >= 10 and choice.table[(30, Weighting("power", 4.0))] > choice.table[(1, Weighting("power", 4.0))]
    sweep = DenseSweep(data.image_queries, data.label_queries, data.image_anchors, data.text_anchors, max(ks))
    accuracy = [float((sweep.scores(k, w).argmax(axis=1) == data.query_classes).mean()) for k, w in choice.table]
    assert spearmanr(list(choice.table.values()), accuracy).statistic > 0.5
