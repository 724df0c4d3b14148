import math

import numpy as np
import pytest

from asif.math.relrep import KeyMatrix, check_k_p, dense_relrep, dense_scores, shared_anchors, sparsify
from asif.math.topk import effective_k, exact_topk
from tests import reference
from tests.conftest import random_unit


def _brute_relrep(q: np.ndarray, anchors: np.ndarray, k: int, p: float) -> list[float]:
    """The formula for one query, one anchor at a time in plain Python (floats are doubles)."""
    sims = [sum(float(a) * float(b) for a, b in zip(q, row, strict=True)) for row in anchors]
    top = sorted(range(len(sims)), key=lambda j: (-math.floor(sims[j] / 2.0**-17), j))[:k]
    w = [0.0] * len(sims)
    for j in top:
        w[j] = max(sims[j], 0.0) ** p
    norm = math.sqrt(sum(v * v for v in w))
    return [v / norm if norm > 0 else 0.0 for v in w]


def _tied_anchors(rng: np.random.Generator) -> np.ndarray:
    """Tiny anchors with exact ties: repeated rows, and rows equal up to a last-bit change (same grid cell)."""
    a = random_unit(rng, 12, 5).astype(np.float64)
    a = np.concatenate([a, a[[2, 2, 7]], -a[:2]])  # rows 12, 13 repeat row 2; 14 repeats 7; two opposites
    a[13, 0] = np.nextafter(a[13, 0], 1.0)  # not equal; in the same 2**-17 cell as row 2 (but at a boundary)
    return a[rng.permutation(len(a))]


def test_reference_matches_a_brute_force_loop_with_ties(rng):
    a = _tied_anchors(rng)
    t = random_unit(rng, len(a), 4).astype(np.float64)
    q = np.concatenate([a[:3], random_unit(rng, 3, 5)])  # queries on the repeated rows: ties at the top
    qt = random_unit(rng, 4, 4)
    for k, p in [(1, 8.0), (2, 1.0), (3, 3.0), (7, 8.0), (len(a), 2.0), (100, 1.0)]:
        dense = reference.relrep(q, a, k, p)
        brute = np.array([_brute_relrep(row, a, k, p) for row in q])
        np.testing.assert_allclose(dense, brute, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(dense > 0, brute > 0)
        brute_t = np.array([_brute_relrep(row, t, k, p) for row in qt])
        want = [[sum(x * y for x, y in zip(bi, bt, strict=True)) for bt in brute_t] for bi in brute]
        np.testing.assert_allclose(reference.scores(q, qt, a, t, k, p), want, rtol=1e-12, atol=1e-15)
        sims, idx = reference.topk(q, a, k)
        for b, row in enumerate(q):
            s = [float(np.dot(row, x)) for x in a]
            order = sorted(range(len(a)), key=lambda j: (-math.floor(s[j] / 2.0**-17), j))[:k]
            assert idx[b].tolist() == order
            np.testing.assert_allclose(sims[b], [s[j] for j in order], rtol=1e-12)
    # Ties go to the smaller id, also when ids are given and not in row order.
    ids = np.arange(len(a))[::-1] * 10
    _, idx = reference.topk(a[:1], a, 3, ids=ids)
    s = a[:1] @ a.T
    assert idx[0].tolist() == sorted(range(len(a)), key=lambda j: (-math.floor(s[0, j] / 2.0**-17), ids[j]))[:3]


def test_package_dense_reference_equals_the_independent_one(rng):
    # 100 copies of one vector (more than TIE_MARGIN), at the top for the last two queries.
    dup = random_unit(rng, 1, 8)
    a = np.concatenate([random_unit(rng, 300, 8), np.repeat(dup, 100, axis=0)])
    a = a[rng.permutation(len(a))]
    t = random_unit(rng, len(a), 6)
    q = np.concatenate([random_unit(rng, 5, 8), dup, 0.8 * dup + 0.2 * random_unit(rng, 1, 8)])
    qt = random_unit(rng, 4, 6)
    for k, p in [(1, 8.0), (5, 8.0), (50, 3.0), (99, 1.0), (170, 8.0), (400, 2.0), (1000, 1.0)]:
        np.testing.assert_allclose(dense_relrep(q, a, k, p), reference.relrep(q, a, k, p), atol=1e-12)
        np.testing.assert_allclose(dense_scores(q, qt, a, t, k, p), reference.scores(q, qt, a, t, k, p), atol=1e-12)


def test_exact_topk_matches_the_reference(rng):
    q, a = random_unit(rng, 5, 16), random_unit(rng, 1000, 16)
    sims, idx = exact_topk(q, a, 37, chunk=128)
    ref_s, ref_i = reference.topk(q, a, 37)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(sims, ref_s, rtol=1e-6)


def test_exact_topk_keeps_the_smallest_ids_of_a_tie_longer_than_the_margin(rng):
    # 300 copies of one vector scattered over many chunks: between chunks a partition to k + TIE_MARGIN
    # must not drop the smallest indices of the run when it straddles the k-th place.
    a = random_unit(rng, 3000, 16)
    copies = rng.choice(3000, 300, replace=False)
    a[copies] = a[copies[0]]
    q = np.concatenate([a[copies[:1]], 0.5 * a[copies[:1]] + 0.5 * random_unit(rng, 2, 16), random_unit(rng, 2, 16)])
    for k in (1, 10, 100, 299, 300, 350):
        for chunk in (64, 500, 65536):
            sims, idx = exact_topk(q, a, k, chunk=chunk)
            ref_s, ref_i = reference.topk(q, a, k)
            np.testing.assert_array_equal(idx, ref_i)
            np.testing.assert_allclose(sims, ref_s, atol=1e-6)
        if k <= 300:
            np.testing.assert_array_equal(idx[0], np.sort(copies)[:k])


def test_sparsify_matches_dense_reference(rng):
    q, a = random_unit(rng, 6, 8), random_unit(rng, 300, 8)
    sims, idx = exact_topk(q, a, 50)
    rr = sparsify(sims, idx, 3.0)
    dense = reference.relrep(q, a, 50, 3.0)
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
    np.testing.assert_allclose(scores, reference.scores(qi, qt, qa, ta, k, p), atol=1e-5)


def test_key_matrix_scores_large_batches_as_one_sparse_product(rng, monkeypatch):
    """Many queries against dense keys (every label on every anchor) are scored by one scipy sparse product instead of
    expanding every (query, anchor, key) product, with the same result."""
    import asif.math.relrep

    qa, ta = random_unit(rng, 60, 12), random_unit(rng, 60, 10)
    qi, qt = random_unit(rng, 37, 12), random_unit(rng, 50, 10)
    s_i, i_i = exact_topk(qi, qa, 60)
    s_t, i_t = exact_topk(qt, ta, 60)
    keys, queries = KeyMatrix.from_rr(sparsify(s_t, i_t, 2.0)), sparsify(s_i, i_i, 2.0)
    expected = reference.scores(qi, qt, qa, ta, 60, 2.0)
    expanded = keys.score(queries)  # 37 x 60 x ~25 products: under SCORE_ENTRIES
    built = []
    real = asif.math.relrep.sp.csr_matrix
    monkeypatch.setattr(asif.math.relrep.sp, "csr_matrix", lambda *a, **kw: built.append(1) or real(*a, **kw))
    assert not built and np.array_equal(keys.score(queries), expanded)
    monkeypatch.setattr(asif.math.relrep, "SCORE_ENTRIES", 500)
    product = keys.score(queries)
    assert built  # the query batch became a sparse matrix
    np.testing.assert_allclose(expanded, expected, atol=1e-5)
    np.testing.assert_allclose(product, expanded, atol=1e-6)
    assert product.dtype == np.float32 and product.shape == (37, 50)


def test_key_matrix_sparse_product_copies_only_the_rows_hit(rng, monkeypatch):
    """The one sparse product copies to float64 only the key rows of the anchors the queries hit, not the whole
    matrix (a big label set over a big index: a batch touches a small part of it); the scores stay exact."""
    import tracemalloc

    import asif.math.relrep
    from asif.math.relrep import SparseRR

    n_anchors, n_keys, k = 200_000, 400, 800
    ids = np.concatenate([rng.choice(n_anchors, k, replace=False) for _ in range(n_keys)])
    cols = np.repeat(np.arange(n_keys), k)
    values = rng.random(len(ids)).astype(np.float32)
    keys = KeyMatrix.from_entries(ids, cols, values, n_keys)
    q_ids = np.stack([rng.choice(4_000, 100, replace=False) for _ in range(16)]).astype(np.int64)
    q_weights = rng.random(q_ids.shape).astype(np.float32)
    dense_keys = np.zeros((n_keys, n_anchors))
    dense_keys[cols, ids] = values
    expected = np.zeros((16, n_keys))
    for row in range(16):
        expected[row] = dense_keys[:, q_ids[row]] @ q_weights[row]
    monkeypatch.setattr(asif.math.relrep, "SCORE_ENTRIES", 10)  # the sparse product
    tracemalloc.start()
    try:
        scores = keys.raw_score(SparseRR(q_ids, q_weights))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=1e-12)
    whole_in_float64 = keys.nnz * 12  # data (8 bytes) and column indices (4) of the whole matrix
    assert peak < whole_in_float64 / 10, (peak, whole_in_float64)


def test_shared_anchors_sum_to_score():
    ids_q, w_q = np.array([5, 9, 2, 7]), np.array([0.6, 0.5, 0.4, 0.0])
    ids_k, w_k = np.array([9, 7, 5, 11]), np.array([0.3, 0.9, 0.1, 0.2])
    ids, contrib = shared_anchors(ids_q, w_q, ids_k, w_k)
    assert ids.tolist() == [9, 5]  # 7 has zero query weight, 2 and 11 are not shared
    np.testing.assert_allclose(contrib, [0.15, 0.06])


def test_label_set_validation():
    from asif.serving.labels import LabelError, LabelSet

    assert LabelSet(("dog",), ("a {{photo}} of a {}",)).prompts() == ["a {photo} of a dog"]
    for bad in ["{", "}", "no field", "{}{}", "{0}", "{x}", "{:>10}", "{!r}"]:
        with pytest.raises(LabelError):
            LabelSet(("dog",), (bad,))
    with pytest.raises(LabelError, match="duplicated"):
        LabelSet(("a", "b", "a"))
    with pytest.raises(LabelError):
        LabelSet(("a", "  "))


@pytest.mark.parametrize("chunk", [1, 7, 333, 1 << 15])
def test_key_matrix_scores_expanded_in_pieces_equal_the_dense_reference(rng, monkeypatch, chunk):
    """The expansion runs in pieces of about CHUNK_ENTRIES products (small temporaries, no fresh pages per call):
    pieces that split a query's anchors, span several queries or hold one anchor give the dense reference's scores."""
    import asif.math.relrep

    monkeypatch.setattr(asif.math.relrep, "CHUNK_ENTRIES", chunk)
    qa, ta = random_unit(rng, 300, 12), random_unit(rng, 300, 10)
    qi, qt = random_unit(rng, 9, 12), random_unit(rng, 40, 10)
    s_i, i_i = exact_topk(qi, qa, 120)
    s_t, i_t = exact_topk(qt, ta, 150)
    scores = KeyMatrix.from_rr(sparsify(s_t, i_t, 3.0)).score(sparsify(s_i, i_i, 3.0))
    expected = reference.relrep(qi, qa, 120, 3.0) @ reference.relrep(qt, ta, 150, 3.0).T
    np.testing.assert_allclose(scores, expected, atol=1e-5)
