"""Served variants of the recipe (issue 17): weightings (power, softmax, rank) and test-time augmentation. Each
equals the dense reference of its formula, per request and as a model's default, and an edited model equals one
rebuilt from the pairs it holds."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from asif.encoders.augment import image_view
from asif.math.relrep import Weighting
from asif.serving.labels import LabelSet
from asif.serving.model import AsifModel
from asif.stores import build_store, choose_index_spec
from asif.tuning.synthetic import SyntheticWorld
from tests import reference

K = 30


@pytest.fixture
def world() -> SyntheticWorld:
    """A fresh world per test: its pairs do not depend on which tests ran before. The rank weighting gives a pair's
    weight by its place in the order, and the reference orders float64 similarities where FAISS computes float32
    ones: two similarities within float32 rounding of each other, across a tie cell's edge, may be ordered apart (a
    change of 1/(j + r0) - 1/(j + 1 + r0) in two weights). Fixed data keeps such near ties out of the tests."""
    return SyntheticWorld(d_image=48, d_text=32, n_classes=12, latent_dim=12, seed=7)


WEIGHTINGS = [("softmax", 0.05), ("softmax", 0.5), ("rank", 1.0), ("rank", 10.0), ("power", 3.0)]


def flat_model(img: np.ndarray, txt: np.ndarray, ids: np.ndarray, **kw) -> AsifModel:
    return AsifModel(
        build_store(img, ids, choose_index_spec(len(img), img.shape[1], "flat")),
        build_store(txt, ids, choose_index_spec(len(txt), txt.shape[1], "flat")),
        k=K,
        **kw,
    )


def label_set(n: int) -> LabelSet:
    return LabelSet(tuple(f"class {i}" for i in range(n)), ("{}",))


def scores_of(preds, classes) -> np.ndarray:
    return np.array([[dict(pr.scores)[c] for c in classes] for pr in preds])


@pytest.mark.parametrize(("kind", "param"), WEIGHTINGS)
def test_a_default_weighting_equals_its_formula_through_edits_and_a_rebuild(world, rng, kind, param):
    data = world.pairs(500, n_queries=20)
    img, txt, queries, label_emb = data.image_anchors, data.text_anchors, data.image_queries, data.label_queries
    n_labels = len(label_emb)
    held = np.arange(350)
    model = flat_model(img[held], txt[held], held, weighting=Weighting(kind, param))
    labels = model.register_labels("set", label_set(n_labels), label_emb)

    def check(keep: np.ndarray) -> None:
        want = reference.scores(queries, label_emb, img[keep], txt[keep], K, param, kind)
        got = scores_of(model.classify(queries, labels, top=n_labels), labels.classes)
        np.testing.assert_allclose(got, want, atol=2e-5)

    check(held)
    removed: set[int] = set()
    for chunk in np.array_split(np.arange(350, 500), 3):
        model.add_pairs(chunk, img[chunk], txt[chunk])
        near = reference.topk(label_emb[:1], txt, 20)[1][0]  # most of label 0's neighbours go
        victims = [int(i) for i in near if int(i) not in removed and model.image_store.contains(np.array([i]))[0]]
        victims = victims[:8] + [int(i) for i in rng.choice(held, 4, replace=False) if int(i) not in removed]
        model.remove_pairs(np.array(victims))
        removed.update(victims)
        keep = np.array([i for i in range(chunk[-1] + 1) if i not in removed])
        check(keep)

    rebuilt = flat_model(img[keep], txt[keep], keep, weighting=Weighting(kind, param))
    fresh = rebuilt.make_labels(label_set(n_labels), label_emb)
    a = model.classify(queries, labels, top=3, explain=5)
    b = rebuilt.classify(queries, fresh, top=3, explain=5)
    for pa, pb in zip(a, b, strict=True):
        assert [lbl for lbl, _ in pa.scores] == [lbl for lbl, _ in pb.scores]
        np.testing.assert_allclose([s for _, s in pa.scores], [s for _, s in pb.scores], atol=1e-6)
        assert [x.pair_id for x in pa.explanation] == [x.pair_id for x in pb.explanation]
        assert sum(x.contribution for x in pa.explanation) <= pa.scores[0][1] + 1e-6


def test_per_request_weightings_share_a_label_set_with_the_default(world):
    data = world.pairs(300, n_queries=15)
    img, txt, queries, label_emb = data.image_anchors, data.text_anchors, data.image_queries, data.label_queries
    model = flat_model(img, txt, np.arange(300), p=8.0)
    labels = model.register_labels("set", label_set(len(label_emb)), label_emb)
    runs = [*WEIGHTINGS, ("power", 8.0)]
    for kind, param in runs + runs:  # twice: the second pass finds the scorers cached (and some evicted)
        got = scores_of(model.classify(queries, labels, p=Weighting(kind, param), top=99), labels.classes)
        want = reference.scores(queries, label_emb, img, txt, K, param, kind)
        np.testing.assert_allclose(got, want, atol=2e-5)
    # The default (power p=8) scorer stays pinned, a bare number still means the power p, and similarity() too.
    assert (K, Weighting("power", 8.0)) in labels.scorers
    np.testing.assert_allclose(
        scores_of(model.classify(queries, labels, p=2.0, top=99), labels.classes),
        reference.scores(queries, label_emb, img, txt, K, 2.0),
        atol=2e-5,
    )
    np.testing.assert_allclose(
        model.similarity(queries, label_emb, p=Weighting("rank", 3.0)),
        reference.scores(queries, label_emb, img, txt, K, 3.0, "rank"),
        atol=2e-5,
    )


def test_weightings_refuse_bad_parameters():
    with pytest.raises(ValueError, match="unknown weighting"):
        Weighting("cosine", 1.0)
    for kind, name in (("power", "p"), ("softmax", "t"), ("rank", "r0")):
        for bad in (0.0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match=f"^{name} must be a positive finite number"):
                Weighting(kind, bad)
    assert Weighting.of("softmax") == Weighting("softmax", 0.1) and Weighting.of("rank").param == 10.0
    assert Weighting.from_defaults({"k": 5, "p": 4}) == Weighting("power", 4.0)
    assert Weighting.from_defaults({"weighting": {"kind": "rank", "param": 2}}) == Weighting("rank", 2.0)


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(("kind", "param"), [("power", 8.0), ("softmax", 0.1)])
def test_augmented_views_score_the_mean_of_the_dense_representations(world, rng, kind, param):
    data = world.pairs(300, n_queries=12)
    img, txt, queries, label_emb = data.image_anchors, data.text_anchors, data.image_queries, data.label_queries
    views = [unit_rows(queries + 0.4 * rng.standard_normal(queries.shape)) for _ in range(2)]
    model = flat_model(img[:250], txt[:250], np.arange(250))
    labels = model.register_labels("set", label_set(len(label_emb)), label_emb)

    def want(keep: np.ndarray) -> np.ndarray:
        reps = [reference.relrep(q, img[keep], K, param, kind) for q in (queries, *views)]
        mean = sum(reps) / len(reps)
        mean /= np.linalg.norm(mean, axis=1, keepdims=True)
        return mean @ reference.relrep(label_emb, txt[keep], K, param, kind).T

    w = Weighting(kind, param)
    got = model.classify(queries, labels, p=w, views=views, top=99, explain=3 * K)
    np.testing.assert_allclose(scores_of(got, labels.classes), want(np.arange(250)), atol=2e-5)
    for pred in got:  # every shared anchor listed: the contributions add up to the best score
        assert sum(x.contribution for x in pred.explanation) == pytest.approx(pred.scores[0][1], abs=1e-5)
    model.add_pairs(np.arange(250, 300), img[250:], txt[250:])
    model.remove_pairs(np.arange(0, 40))
    got = model.classify(queries, labels, p=w, views=views, top=99)
    np.testing.assert_allclose(scores_of(got, labels.classes), want(np.arange(40, 300)), atol=2e-5)
    with pytest.raises(ValueError, match="shape"):
        model.classify(queries, labels, views=[views[0][:3]])


def test_image_views_and_classify_images_with_augment(world):
    pixels = np.arange(5 * 10 * 3, dtype=np.uint8).reshape(5, 10, 3)
    image = Image.fromarray(pixels)
    np.testing.assert_array_equal(np.asarray(image_view(image, "flip")), pixels[:, ::-1])
    crop = image_view(Image.fromarray(np.zeros((100, 50, 3), np.uint8)), "crop")
    assert crop.size == (40, 80)
    with pytest.raises(ValueError, match="unknown view"):
        image_view(image, "rotate")

    from tests.conftest import PixelEncoder

    enc = PixelEncoder()
    rng = np.random.default_rng(3)
    photos = [Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)) for _ in range(4)]
    anchors = enc.encode([Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)) for _ in range(60)])
    txt = unit_rows(rng.standard_normal((60, 8)))
    model = flat_model(anchors, txt, np.arange(60), image_encoder=enc)
    labels = model.make_labels(label_set(3), unit_rows(rng.standard_normal((3, 8))))
    got = model.classify_images(photos, labels, augment=["flip", "crop"], top=3)
    views = [enc.encode([image_view(p, v) for p in photos]) for v in ("flip", "crop")]
    want = model.classify(enc.encode(photos), labels, views=views, top=3)
    assert [g.scores for g in got] == [w.scores for w in want]
    plain = model.classify(enc.encode(photos), labels, top=3)
    assert [g.scores for g in got] != [p.scores for p in plain]  # the views changed the answer


def test_balanced_batches_equal_sinkhorn_on_the_dense_scores_through_edits(world, rng):
    """`balance`: a batch's returned scores are plain Sinkhorn (tests.test_variants) on the dense reference's scores,
    after adds and deletes as before them; a lone image keeps its ASIF scores and label."""
    from asif.math.variants import Balance
    from tests.test_variants import sinkhorn_reference

    data = world.pairs(400, n_queries=24)
    img, txt, queries, label_emb = data.image_anchors, data.text_anchors, data.image_queries, data.label_queries
    n_labels = len(label_emb)
    held = np.arange(300)
    model = flat_model(img[held], txt[held], held)
    labels = model.register_labels("set", label_set(n_labels), label_emb)
    prior = rng.random(n_labels) + 0.2
    for balance, target in ((Balance(0.05), np.ones(n_labels)), (Balance(0.05, tuple(prior)), prior)):
        keep = held
        for step in range(3):
            want_raw = reference.scores(queries, label_emb, img[keep], txt[keep], K, 8.0, "power")
            want = sinkhorn_reference(want_raw, 0.05, target / target.sum())
            preds = model.classify(queries, labels, top=n_labels, balance=balance)
            np.testing.assert_allclose(scores_of(preds, labels.classes), want, atol=1e-5)
            assert [pr.label for pr in preds] == [labels.classes[i] for i in want.argmax(axis=1)]
            lone = model.classify(queries[:1], labels, top=n_labels, balance=balance)
            np.testing.assert_allclose(scores_of(lone, labels.classes), want_raw[:1], atol=2e-5)
            if step < 2:  # an edit, then the same check against the pairs now held
                new = np.arange(300 + 50 * step, 350 + 50 * step)
                model.add_pairs(new, img[new], txt[new])
                gone = rng.choice(keep, 10, replace=False)
                model.remove_pairs(gone)
                keep = np.setdiff1d(np.concatenate([keep, new]), gone)
        model.remove_pairs(np.setdiff1d(keep, held))  # back to the first pairs for the next balance
        model.add_pairs(np.setdiff1d(held, keep), img[np.setdiff1d(held, keep)], txt[np.setdiff1d(held, keep)])
    with pytest.raises(ValueError, match="weights for"):
        model.classify(queries, labels, balance=Balance(0.05, (1.0, 2.0)))
