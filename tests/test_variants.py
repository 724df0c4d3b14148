"""Training-free variants (asif.variants, `asif eval --candidates`) against dense references written here from
their formulas, sharing no helper with the code they check."""

from __future__ import annotations

import numpy as np
import pytest

from asif.relrep import KeyMatrix, Weighting, exact_topk, sparsify
from asif.variants import centre, hubness_weights
from evaluation.candidates import run_candidates


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def dense_rep(queries, anchors, k, weighting, param, anchor_weights=None):
    """The formula on the full similarity matrix: keep the k largest, weight them, zero s <= 0, normalise."""
    sims = queries.astype(np.float64) @ anchors.astype(np.float64).T
    out = np.zeros_like(sims)
    for r in range(len(sims)):
        order = np.argsort(-sims[r], kind="stable")[:k]
        s = sims[r, order]
        if weighting == "power":
            w = np.clip(s, 0, None) ** param
        elif weighting == "softmax":
            w = np.exp((s - s.max()) / param)
        else:
            w = 1.0 / (np.arange(k) + param)
        w = np.where(s > 0, w, 0.0)
        if anchor_weights is not None:
            w = w * anchor_weights[order]
        norm = np.sqrt((w**2).sum())
        out[r, order] = w / norm if norm > 0 else 0.0
    return out


@pytest.mark.parametrize("weighting,param", [("power", 8.0), ("power", 2.0), ("softmax", 0.05), ("rank", 10.0)])
@pytest.mark.parametrize("with_weights", [False, True])
def test_variant_scores_equal_the_dense_formula(weighting, param, with_weights):
    rng = np.random.default_rng(1)
    img_anchors, txt_anchors = unit(rng, 300, 16), unit(rng, 300, 12)
    images, texts = unit(rng, 20, 16), unit(rng, 7, 12)
    aw = rng.uniform(0.1, 2.0, 300) if with_weights else None
    k = 40
    si, ii = exact_topk(images, img_anchors, k)
    st, it = exact_topk(texts, txt_anchors, k)
    w = Weighting(weighting, param)
    got = KeyMatrix.from_rr(sparsify(st, it, w, aw)).score(sparsify(si, ii, w, aw))
    want_images = dense_rep(images, img_anchors, k, weighting, param, aw)
    want = want_images @ dense_rep(texts, txt_anchors, k, weighting, param, aw).T
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_centre_and_hubness_weights_follow_their_formulas():
    rng = np.random.default_rng(2)
    x = unit(rng, 50, 8)
    m = x.mean(axis=0)
    want = (x - m) / np.linalg.norm(x - m, axis=1, keepdims=True)
    np.testing.assert_allclose(centre(x, m), want, atol=1e-6)

    images = np.concatenate([x, x[:10]])  # ten images repeated (one anchor per caption): counted once
    k = 5
    got = hubness_weights(images, k)
    sims = x.astype(np.float64) @ x.astype(np.float64).T
    counts = np.zeros(len(x))
    for r in range(len(x)):
        others = [j for j in np.argsort(-sims[r], kind="stable") if j != r][:k]
        counts[others] += 1
    idf = np.maximum(np.log(len(x) / (1 + counts)), 1e-3)
    np.testing.assert_allclose(got, np.concatenate([idf, idf[:10]]), rtol=1e-5)
    assert got.min() > 0 and np.ptp(got) > 0.5  # the hubs are discounted


def test_candidates_report_the_default_and_choose_parameters_label_free(small_world):
    data = small_world.pairs(600, n_queries=80)
    img_a, txt_a, queries, truth, labels = (
        data.image_anchors, data.text_anchors, data.image_queries, data.query_classes, data.label_queries
    )
    out = run_candidates(["default", "softmax", "hubness"], queries, labels, truth, img_a, txt_a, k=50, p=8.0)
    want = dense_rep(queries, img_a, 50, "power", 8.0) @ dense_rep(labels, txt_a, 50, "power", 8.0).T
    assert out["default"]["top1"] == pytest.approx(float((want.argmax(axis=1) == truth).mean()))
    assert out["softmax"]["parameter"] in out["softmax"]["top1_per_parameter"]
    assert out["softmax"]["top1"] == out["softmax"]["top1_per_parameter"][out["softmax"]["parameter"]]
    assert set(out["hubness"]["holdout_retrieval"]) == {"50", "200", "800"}
    with pytest.raises(ValueError, match="unknown candidates"):
        run_candidates(["nope"], queries, labels, truth, img_a, txt_a, k=50, p=8.0)
