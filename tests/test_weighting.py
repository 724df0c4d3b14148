"""Served weightings (power, softmax, rank; issue 17): each equals the dense reference of its formula, per request
and as a model's default, and an edited model equals one rebuilt from the pairs it holds."""

from __future__ import annotations

import numpy as np
import pytest

from asif.labels import LabelSet
from asif.model import AsifModel
from asif.relrep import Weighting
from asif.stores import build_store, choose_index_spec
from tests import reference

K = 30
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
def test_a_default_weighting_equals_its_formula_through_edits_and_a_rebuild(small_world, rng, kind, param):
    data = small_world.pairs(500, n_queries=20)
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


def test_per_request_weightings_share_a_label_set_with_the_default(small_world):
    data = small_world.pairs(300, n_queries=15)
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
