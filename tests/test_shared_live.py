"""Two API replicas (live models) over one shared Milvus database (milvus-lite): each sees the other's edits, and
every answer equals the independent dense reference over the pairs held at the time."""

from __future__ import annotations

import numpy as np
import pytest

from asif.serving.labels import LabelSet
from asif.serving.shared_loading import open_shared
from asif.state.metadata import NewPair
from tests import reference
from tests.conftest import HashTextEncoder, PixelEncoder

K, P = 8, 4.0


@pytest.fixture
def replicas(tmp_path):
    from pymilvus import MilvusClient

    client = MilvusClient(str(tmp_path / "shared.db"))
    a = open_shared(client, "asif", PixelEncoder(), HashTextEncoder(), k=K, p=P)
    b = open_shared(client, "asif", PixelEncoder(), HashTextEncoder(), k=K, p=P)
    yield a, b
    a.close()
    b.close()


def unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def new_pairs(img, txt, tag):
    return [NewPair(f"{tag}{i}.jpg", [f"{tag} caption {i}"], None, img[i], txt[i]) for i in range(len(img))]


def add_held(replica, img, txt, tag):
    """Add these pairs through ``replica``; returns their ids and the map the reference takes (id -> vectors)."""
    ids = replica.add_pairs(new_pairs(img, txt, tag))
    return ids, {i: (img[j], txt[j]) for j, i in enumerate(ids)}


def check_against_reference(live, queries, label_emb, labels, held):
    """Scores from this replica equal the dense reference over the pairs `held` (id -> (image vec, text vec))."""
    ids = np.array(sorted(held))
    img = np.stack([held[i][0] for i in ids])
    txt = np.stack([held[i][1] for i in ids])
    answer = live.classify(queries, labels, k=K, p=P, top=len(labels.classes), explain=50)
    ref = reference.scores(queries, label_emb, img, txt, K, P)
    for b, pred in enumerate(answer.predictions):
        got = dict(pred.scores)
        np.testing.assert_allclose([got[c] for c in labels.classes], ref[b], atol=1e-5)
        assert {a.pair_id for a in pred.explanation} <= set(held)
    return answer


def test_edits_through_one_replica_are_seen_by_the_other(replicas):
    a, b = replicas
    rng = np.random.default_rng(0)
    img, txt = unit(rng, 40, 48), unit(rng, 40, 64)
    _, held = add_held(a, img[:30], txt[:30], "a")
    label_emb = unit(rng, 5, 64)
    labels = LabelSet(tuple(f"c{i}" for i in range(5)), ("{}",))
    b_labels = b.put_label_set("five", labels, label_emb)
    queries = img[[0, 5, 12]] + 0.01
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    check_against_reference(b, queries, label_emb, b_labels, held)

    # A pair added through B explains a classification through A (A follows B's edit first).
    (new,) = b.add_pairs(new_pairs(img[30:31], txt[30:31], "b"))
    held[new] = (img[30], txt[30])
    a_labels = a.label_set("five")  # B stored it: A follows B's edits before the lookup
    assert a_labels is not None and a_labels.classes == labels.classes
    answer = check_against_reference(a, img[30:31], label_emb, a_labels, held)
    assert new in {x.pair_id for x in answer.predictions[0].explanation}

    # A pair deleted through B never appears again in A's answers; A's scores are exact without it.
    victim = answer.predictions[0].explanation[0].pair_id
    assert b.delete_pairs([victim]) == [victim]
    del held[victim]
    for _ in range(3):
        answer = check_against_reference(a, img[30:31], label_emb, a_labels, held)
        assert victim not in {x.pair_id for x in answer.predictions[0].explanation}
    assert a.metadata.get(victim) is None and not a.has_pair(victim)

    # A's own edits keep B exact as well, and both agree.
    more = a.add_pairs(new_pairs(img[31:40], txt[31:40], "c"))
    held.update({i: (img[31 + j], txt[31 + j]) for j, i in enumerate(more)})
    a.delete_pairs(more[:3])
    for i in more[:3]:
        del held[i]
    ra = check_against_reference(a, queries, label_emb, a_labels, held)
    rb = check_against_reference(b, queries, label_emb, b.label_set("five"), held)
    for pa, pb in zip(ra.predictions, rb.predictions, strict=True):  # both replicas agree (to float32 rounding)
        sa, sb = dict(pa.scores), dict(pb.scores)
        assert sa.keys() == sb.keys()
        np.testing.assert_allclose([sa[c] for c in sa], [sb[c] for c in sa], rtol=1e-5, atol=1e-9)


def test_a_replica_opened_later_starts_from_the_shared_state(replicas, tmp_path):
    a, _ = replicas
    rng = np.random.default_rng(1)
    img, txt = unit(rng, 12, 48), unit(rng, 12, 64)
    ids = a.add_pairs(new_pairs(img, txt, "x"))
    a.delete_pairs(ids[:2])
    label_emb = unit(rng, 3, 64)
    a.put_label_set("three", LabelSet(("x", "y", "z"), ("{}",)), label_emb)
    late = open_shared(a.model.image_store.client, "asif", PixelEncoder(), HashTextEncoder())
    try:
        assert late.model.n_pairs == 10 and set(late.stored_label_sets()) == {"three"}
        assert late.snapshot().edits == 0 and late.pending_edits() == 0
        held = {i: (img[j], txt[j]) for j, i in enumerate(ids) if i not in ids[:2]}
        check_against_reference(late, img[5:7], label_emb, late.label_set("three"), held)
    finally:
        late.close()


def test_a_pair_deleted_while_a_follow_reads_it_is_dropped_not_an_error(replicas):
    # B adds a pair; as A follows that add and reads the pair from the stores, B deletes it: A's classification
    # must not fail (a 422 through the API), and its scores are exact without the pair.
    a, b = replicas
    rng = np.random.default_rng(2)
    img, txt = unit(rng, 12, 48), unit(rng, 12, 64)
    _, held = add_held(b, img[:10], txt[:10], "b")
    label_emb = unit(rng, 4, 64)
    labels = a.put_label_set("four", LabelSet(tuple("abcd"), ("{}",)), label_emb)
    check_against_reference(a, img[:2], label_emb, labels, held)
    (late,) = b.add_pairs(new_pairs(img[10:11], txt[10:11], "late"))
    for store in (a.model.image_store, a.model.text_store):
        original = store.contains

        def contains(ids, original=original):
            out = original(ids)
            if late in np.asarray(ids).tolist() and b.has_pair(late):
                b.delete_pairs([late])  # right after A saw it
            return out

        store.contains = contains
    # The delete is concurrent with this classification: an answer, not an error (the old code raised), and one
    # that never names the deleted pair; the next classification, which follows the delete, is exact.
    answer = a.classify(img[:3], labels, k=K, p=P, top=4, explain=50)
    assert late not in {x.pair_id for pred in answer.predictions for x in pred.explanation}
    assert not a.has_pair(late)
    check_against_reference(a, img[:3], label_emb, labels, held)


def test_follows_read_outside_the_locks_and_rebuild_only_the_set_that_changed(replicas):
    a, b = replicas
    rng = np.random.default_rng(3)
    img, txt = unit(rng, 20, 48), unit(rng, 20, 64)
    ids, held = add_held(b, img, txt, "b")
    emb = {name: unit(rng, 3, 64) for name in ("one", "two")}
    for name in emb:
        b.put_label_set(name, LabelSet(("x", "y", "z"), ("{}",)), emb[name])
    assert set(a.stored_label_sets()) == {"one", "two"}
    locks_held: list[tuple] = []
    for method in ("writers", "records", "label_set", "label_sets", "edits_after"):
        original = getattr(a.metadata, method, None)
        if original is None:
            continue

        def spy(*args, original=original, **kw):
            locks_held.append((a._edit_lock.locked(), a.lock._writer, a.lock._readers))
            return original(*args, **kw)

        setattr(a.metadata, method, spy)
    rebuilt: list[str] = []
    register = a.model.register_labels
    a.model.register_labels = lambda name, *args, **kw: (rebuilt.append(name), register(name, *args, **kw))[1]
    emb["two"] = unit(rng, 3, 64)
    b.put_label_set("two", LabelSet(("x", "y", "w"), ("{}",)), emb["two"])
    b.delete_pairs(ids[:2])
    for i in ids[:2]:
        del held[i]
    two = a.label_set("two")
    assert two is not None and two.classes == ("x", "y", "w")
    assert rebuilt == ["two"]  # the set that changed, and only it
    assert locks_held and set(locks_held) == {(False, False, 0)}  # no lock held while Milvus is read
    for name in emb:
        check_against_reference(a, img[:3], emb[name], a.label_set(name), held)


def test_an_unreachable_edit_log_is_unavailable_not_an_internal_error(replicas):
    from asif.stores import StoreUnavailable

    a, b = replicas
    rng = np.random.default_rng(4)
    img, txt = unit(rng, 6, 48), unit(rng, 6, 64)
    b.add_pairs(new_pairs(img, txt, "b"))
    labels = a.put_label_set("two", LabelSet(("x", "y"), ("{}",)), unit(rng, 2, 64))

    def down():
        raise ConnectionError("milvus is down")

    a.metadata.writers = down
    with pytest.raises(StoreUnavailable, match="shared edit log: milvus is down"):
        a.classify(img[:1], labels, k=K, p=P)


def test_a_follow_never_puts_back_a_label_set_older_than_a_write_made_here_meanwhile(replicas):
    # B stores a set; A's follow reads B's version, and before A applies it, A stores its own (now the current
    # one in Milvus). A must end on the current version, as B does, not on what its follow had read.
    a, b = replicas
    rng = np.random.default_rng(5)
    img, txt = unit(rng, 10, 48), unit(rng, 10, 64)
    _, held = add_held(a, img, txt, "a")
    emb_b, emb_a = unit(rng, 2, 64), unit(rng, 3, 64)
    b.put_label_set("set", LabelSet(("b1", "b2"), ("{}",)), emb_b)
    read = a.metadata.label_set

    def label_set_then_a_writes(name):
        out = read(name)
        a.metadata.label_set = read
        a.put_label_set("set", LabelSet(("a1", "a2", "a3"), ("{}",)), emb_a)  # lands after what was just read
        return out

    a.metadata.label_set = label_set_then_a_writes
    a.follow()
    for replica in (a, b):
        got = replica.label_set("set")
        assert got is not None and got.classes == ("a1", "a2", "a3")
        check_against_reference(replica, img[:2], emb_a, got, held)
