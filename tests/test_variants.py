"""Training-free variants (asif.math.variants, `asif eval --candidates`) against dense references written here from
their formulas, sharing no helper with the code they check."""

from __future__ import annotations

import numpy as np
import pytest

from asif.math.relrep import KeyMatrix, Weighting, sparsify
from asif.math.topk import exact_topk
from asif.math.variants import centre, hubness_weights, prior_balanced, procrustes_map
from asif.tuning.autoselect import auto_kp
from evaluation.candidates import CandidateInputs, candidate_scores, run_candidates
from tests import reference


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def dense_rep(queries, anchors, k, weighting, param, anchor_weights=None):
    """The formula on the full similarity matrix (tests/reference.py): keep the k largest, weight them, zero s <= 0,
    multiply by the anchor weights, normalise."""
    return reference.relrep(queries, anchors, k, param, weighting, anchor_weights)


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
        data.image_anchors,
        data.text_anchors,
        data.image_queries,
        data.query_classes,
        data.label_queries,
    )
    inputs = CandidateInputs(queries, labels, truth, img_a, txt_a)
    out = run_candidates(["default", "softmax", "hubness", "tta", "both-anchors"], inputs, k=50, p=8.0)
    want = dense_rep(queries, img_a, 50, "power", 8.0) @ dense_rep(labels, txt_a, 50, "power", 8.0).T
    assert out["default"]["top1"] == pytest.approx(float((want.argmax(axis=1) == truth).mean()))
    assert out["softmax"]["parameter"] in out["softmax"]["top1_per_parameter"]
    assert out["softmax"]["top1"] == out["softmax"]["top1_per_parameter"][out["softmax"]["parameter"]]
    assert set(out["hubness"]["holdout_mrr"]) == {"50", "200", "800"}
    # the candidates' parameter is chosen by --auto's criterion: the same held-out images, the same mrr
    auto = auto_kp(img_a, txt_a, ks=[50], weightings=[Weighting("softmax", t) for t in (0.01, 0.02, 0.05, 0.1)])
    for t, mrr in out["softmax"]["holdout_mrr"].items():
        assert mrr == pytest.approx(auto.table[(50, Weighting("softmax", float(t)))], abs=1e-9)
    assert "flip" in out["tta"]["skipped"] and "anchor modes" in out["both-anchors"]["skipped"]  # inputs missing
    with pytest.raises(ValueError, match="unknown candidates"):
        run_candidates(["nope"], inputs, k=50, p=8.0)


def normalised(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_views_prompts_and_anchor_candidates_equal_their_dense_formulas(small_world):
    rng = np.random.default_rng(5)
    data = small_world.pairs(400, n_queries=30)
    img_a, txt_a, queries, labels = data.image_anchors, data.text_anchors, data.image_queries, data.label_queries
    n_cls, k = len(labels), 40
    views = {
        v: normalised(queries + 0.3 * rng.standard_normal(queries.shape)).astype(np.float32) for v in ("flip", "crop")
    }
    prompts = normalised(labels[:, None, :] + 0.4 * rng.standard_normal((n_cls, 5, labels.shape[1]))).astype(np.float32)
    other = (normalised(img_a[:100] + 0.1).astype(np.float32), normalised(txt_a[:100] - 0.1).astype(np.float32))
    groups = np.repeat(np.arange(80), 5)  # five captions per image
    inputs = CandidateInputs(
        queries, labels, data.query_classes, img_a, txt_a, views, {"clip80": prompts}, other, groups
    )

    def rep(q, anchors, weighting="power", param=8.0, aw=None):
        return dense_rep(q, anchors, k, weighting, param, aw)

    def mean_rep(reps):
        return normalised(sum(reps))

    label_rep = rep(labels, txt_a)
    tta = mean_rep([rep(q, img_a) for q in (queries, views["flip"], views["crop"])])
    expected = {
        "tta": tta @ label_rep.T,
        "tta-flip": mean_rep([rep(q, img_a) for q in (queries, views["flip"])]) @ label_rep.T,
        "tta-embedding": rep(normalised(queries + views["flip"] + views["crop"]), img_a) @ label_rep.T,
        "clip80": rep(queries, img_a) @ rep(normalised(prompts.mean(axis=1)), txt_a).T,
        "clip80-relrep": rep(queries, img_a)
        @ np.stack([mean_rep(list(rep(prompts[c], txt_a))) for c in range(n_cls)]).T,
        "both-anchors": rep(queries, np.concatenate([img_a, other[0]]))
        @ rep(labels, np.concatenate([txt_a, other[1]])).T,
    }
    soft = [rep(q, img_a, "softmax", 0.05) for q in (queries, views["flip"], views["crop"])]
    expected["softmax+tta"] = mean_rep(soft) @ rep(labels, txt_a, "softmax", 0.05).T
    agree = np.empty(len(txt_a))
    for i in range(len(txt_a)):
        mates = [j for j in range(len(txt_a)) if groups[j] == groups[i] and j != i]
        agree[i] = max(float(txt_a[i] @ normalised(txt_a[mates].sum(axis=0))), 1e-3)
    expected["agreement"] = rep(queries, img_a, aw=agree) @ rep(labels, txt_a, aw=agree).T
    for name, want in expected.items():
        param = 0.05 if name == "softmax+tta" else None
        np.testing.assert_allclose(candidate_scores(name, inputs, k, 8.0, param), want, atol=2e-5, err_msg=name)


def sinkhorn_reference(scores, t, prior, sweeps=2000):
    """Plain Sinkhorn on probabilities (no logs, no shared helper): P = softmax(scores / t) per row, then rows scaled
    to 1 / n and columns to the prior in turn; returns P's rows renormalised."""
    e = np.exp((scores - scores.max(axis=1, keepdims=True)) / t)
    p = e / e.sum(axis=1, keepdims=True)
    n = len(p)
    for _ in range(sweeps):
        p = p * ((1.0 / n) / p.sum(axis=1, keepdims=True))
        p = p * (prior / p.sum(axis=0, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("prior", [None, [0.5, 0.2, 0.2, 0.1]])
def test_prior_balancing_equals_plain_sinkhorn_and_meets_the_prior(prior):
    rng = np.random.default_rng(3)
    scores = rng.random((60, 4)) * 0.2
    scores[:, 0] += 0.1  # a label the anchors favour for every image
    target = np.full(4, 0.25) if prior is None else np.asarray(prior)
    got = np.exp(prior_balanced(scores, 0.03, None if prior is None else np.asarray(prior)))
    want = sinkhorn_reference(scores, 0.03, target)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(got.mean(axis=0), target, atol=1e-6)  # the batch's mass per label is the prior
    assert np.bincount(scores.argmax(axis=1), minlength=4)[0] > 40  # before: label 0 everywhere
    assert np.bincount(got.argmax(axis=1), minlength=4)[0] < 40
    perm = rng.permutation(60)  # balancing sees the batch as a set: order does not matter
    np.testing.assert_allclose(np.exp(prior_balanced(scores[perm], 0.03, prior)), got[perm], atol=1e-9)


def test_prior_balancing_stops_at_its_work_bound(monkeypatch):
    """A large batch gets at most BALANCE_MAX_WORK / (images x labels) sweeps (at least 1): exactly plain Sinkhorn's
    first sweeps, so a request's cost is bounded whatever the data."""
    import asif.math.variants as variants

    rng = np.random.default_rng(4)
    scores = rng.random((30, 7)) * 0.3
    monkeypatch.setattr(variants, "BALANCE_TOLERANCE", 0.0)  # never converged: only the bound stops it
    monkeypatch.setattr(variants, "BALANCE_MAX_WORK", 30 * 7 * 12)
    got = np.exp(variants.prior_balanced(scores, 0.01))
    np.testing.assert_allclose(got, sinkhorn_reference(scores, 0.01, np.full(7, 1 / 7), sweeps=12), atol=1e-9)
    assert not np.allclose(got, sinkhorn_reference(scores, 0.01, np.full(7, 1 / 7), sweeps=13), atol=1e-9)


def test_prior_balancing_leaves_one_image_alone_and_refuses_a_bad_temperature():
    one = np.array([[0.3, 0.1, 0.2]])
    np.testing.assert_allclose(np.exp(prior_balanced(one, 0.05)), sinkhorn_reference(one, 0.05, np.ones(3), 0))
    assert prior_balanced(one, 0.05).argmax() == 0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            prior_balanced(one, bad)


def test_balance_candidate_is_the_balanced_default(small_world):
    data = small_world.pairs(500, n_queries=60)
    inputs = CandidateInputs(
        data.image_queries, data.label_queries, data.query_classes, data.image_anchors, data.text_anchors
    )
    raw = (
        dense_rep(data.image_queries, data.image_anchors, 40, "power", 8.0)
        @ dense_rep(data.label_queries, data.text_anchors, 40, "power", 8.0).T
    )
    prior = np.full(raw.shape[1], 1.0 / raw.shape[1])
    got = np.exp(candidate_scores("balance", inputs, 40, 8.0, 0.02))
    np.testing.assert_allclose(got, sinkhorn_reference(raw, 0.02, prior), atol=1e-5)
    out = run_candidates(["balance"], inputs, k=40, p=8.0)
    assert set(out["balance"]["holdout_mrr"]) == {"0.005", "0.01", "0.02", "0.05"}


def test_nnn_candidate_equals_its_dense_formula_without_each_bank_images_own_pairs(small_world):
    """The per-label bias: each distinct anchor image represented against the anchors minus every row of its own
    image (the first 60 images have a second caption row here), each label's mean of its 64 best bank scores."""
    rng = np.random.default_rng(9)
    data = small_world.pairs(300, n_queries=40)
    img_a = np.concatenate([data.image_anchors, data.image_anchors[:60]])
    txt_a = np.concatenate(
        [data.text_anchors, normalised(data.text_anchors[:60] + 0.2 * rng.standard_normal((60, 16))[:, :1])]
    ).astype(np.float32)
    queries, labels, k, alpha = data.image_queries, data.label_queries, 30, 0.5
    inputs = CandidateInputs(queries, labels, data.query_classes, img_a, txt_a)
    label_rep = dense_rep(labels, txt_a, k, "power", 8.0)
    bank = []
    for i in range(len(data.image_anchors)):  # every distinct image, in order
        mine = np.flatnonzero(np.all(img_a == img_a[i], axis=1))
        others = np.setdiff1d(np.arange(len(img_a)), mine)
        row = np.zeros(len(img_a))
        row[others] = dense_rep(img_a[i : i + 1], img_a[others], k, "power", 8.0)[0]
        assert row[mine].sum() == 0
        bank.append(row)
    bank_scores = np.array(bank) @ label_rep.T
    bias = np.sort(bank_scores, axis=0)[::-1][:64].mean(axis=0)
    want = dense_rep(queries, img_a, k, "power", 8.0) @ label_rep.T - alpha * bias
    np.testing.assert_allclose(candidate_scores("nnn", inputs, k, 8.0, alpha), want, atol=2e-5)
    out = run_candidates(["nnn"], inputs, k=k, p=8.0)
    assert set(out["nnn"]["holdout_mrr"]) == {"0.1", "0.25", "0.5", "0.75"}
    assert out["nnn"]["top1"] == out["nnn"]["top1_per_parameter"][out["nnn"]["parameter"]]


def test_procrustes_map_recovers_a_rotation_and_its_candidate_is_the_standardised_fusion():
    rng = np.random.default_rng(4)
    x, _ = np.linalg.qr(rng.standard_normal((200, 12)))  # isotropic images (X^T X = I): the best map is exact
    q, _ = np.linalg.qr(rng.standard_normal((12, 7)))  # a semi-orthogonal 12 x 7 map
    np.testing.assert_allclose(procrustes_map(x, x @ q), q, atol=1e-5)

    # full-rank pairs, so that the map is unique: captions a noisy linear image of their images
    img_a = unit(rng, 300, 48)
    txt_a = normalised(img_a @ rng.standard_normal((48, 32)) + 0.5 * rng.standard_normal((300, 32)))
    queries, labels, k, w = unit(rng, 40, 48), unit(rng, 9, 32), 30, 0.25
    m = img_a.astype(np.float64).T @ txt_a.astype(np.float64)
    vals, vecs = np.linalg.eigh(m.T @ m)  # the polar factor M (M^T M)^(-1/2): the same map by another route
    r = m @ vecs @ np.diag(vals**-0.5) @ vecs.T
    cos = normalised(queries @ r) @ labels.T
    asif = dense_rep(queries, img_a, k, "power", 8.0) @ dense_rep(labels, txt_a, k, "power", 8.0).T

    def z(s):
        return (s - s.mean(axis=1)[:, None]) / s.std(axis=1)[:, None]

    inputs = CandidateInputs(queries, labels, np.zeros(40, dtype=int), img_a, txt_a.astype(np.float32))
    np.testing.assert_allclose(candidate_scores("procrustes", inputs, k, 8.0, w), z(asif) + w * z(cos), atol=2e-4)
