import numpy as np
import pytest

from asif.relrep import (
    KeyMatrix,
    check_k_p,
    dense_relrep,
    dense_scores,
    effective_k,
    exact_topk,
    shared_anchors,
    sparsify,
)
from tests.conftest import random_unit


def test_exact_topk_matches_full_sort(rng):
    q, a = random_unit(rng, 5, 16), random_unit(rng, 1000, 16)
    sims, idx = exact_topk(q, a, 37, chunk=128)
    full = q @ a.T
    ref = np.argsort(-full, axis=1)[:, :37]
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_allclose(sims, np.take_along_axis(full, ref, axis=1), rtol=1e-6)


def test_sparsify_matches_dense_reference(rng):
    q, a = random_unit(rng, 6, 8), random_unit(rng, 300, 8)
    sims, idx = exact_topk(q, a, 50)
    rr = sparsify(sims, idx, 3.0)
    dense = dense_relrep(q, a, 50, 3.0)
    for b in range(6):
        np.testing.assert_allclose(rr.weights[b], dense[b, idx[b]], atol=1e-6)
        assert set(np.flatnonzero(dense[b])) == set(idx[b][rr.weights[b] > 0])
    np.testing.assert_allclose(np.linalg.norm(rr.weights, axis=1), 1.0, rtol=1e-5)


def test_negatives_clamped_and_all_negative_row_is_zero():
    sims = np.array([[0.5, 0.1, -0.2], [-0.1, -0.3, -0.5]], dtype=np.float32)
    rr = sparsify(sims, np.array([[1, 2, 3], [4, 5, 6]]), 2.0)
    assert rr.weights[0, 2] == 0.0
    np.testing.assert_allclose(rr.weights[0, :2], np.array([0.25, 0.01]) / np.hypot(0.25, 0.01), rtol=1e-6)
    assert not rr.weights[1].any()


def test_k_is_capped_and_validated():
    assert effective_k(800, 10) == 10
    for k, p in [(0, 8), (-1, 8), (1.5, 8), (10, 0), (10, float("nan")), (10, -2)]:
        with pytest.raises(ValueError):
            check_k_p(k, p)


def test_key_matrix_scores_equal_dense_dot(rng):
    qa, ta = random_unit(rng, 400, 12), random_unit(rng, 400, 10)
    qi, qt = random_unit(rng, 7, 12), random_unit(rng, 5, 10)
    k, p = 40, 4.0
    s_i, i_i = exact_topk(qi, qa, k)
    s_t, i_t = exact_topk(qt, ta, k)
    scores = KeyMatrix.from_rr(sparsify(s_t, i_t, p)).score(sparsify(s_i, i_i, p))
    np.testing.assert_allclose(scores, dense_scores(qi, qt, qa, ta, k, p), atol=1e-5)


def test_shared_anchors_sum_to_score():
    ids_q, w_q = np.array([5, 9, 2, 7]), np.array([0.6, 0.5, 0.4, 0.0])
    ids_k, w_k = np.array([9, 7, 5, 11]), np.array([0.3, 0.9, 0.1, 0.2])
    ids, contrib = shared_anchors(ids_q, w_q, ids_k, w_k)
    assert ids.tolist() == [9, 5]  # 7 has zero query weight, 2 and 11 are not shared
    np.testing.assert_allclose(contrib, [0.15, 0.06])


def test_label_set_validation():
    from asif.labels import LabelError, LabelSet

    assert LabelSet(("dog",), ("a {{photo}} of a {}",)).prompts() == ["a {photo} of a dog"]
    for bad in ["{", "}", "no field", "{}{}", "{0}", "{x}", "{:>10}", "{!r}"]:
        with pytest.raises(LabelError):
            LabelSet(("dog",), (bad,))
    with pytest.raises(LabelError, match="duplicated"):
        LabelSet(("a", "b", "a"))
    with pytest.raises(LabelError):
        LabelSet(("a", "  "))
