"""Pair metadata, edit log and label sets in Milvus (milvus-lite): the records the single-process SQLite holds."""

from __future__ import annotations

import numpy as np
import pytest

from asif.state.idclock import IdClock
from asif.state.metadata import NewPair, StoredLabelSet
from asif.state.milvus_meta import MilvusMetadata


@pytest.fixture
def meta(tmp_path):
    from pymilvus import MilvusClient

    return MilvusMetadata(MilvusClient(str(tmp_path / "m.db")), "t", text_dim=4)


def pair(name, captions, thumb=b"\xff\xd8jpeg"):
    return NewPair(name, captions, thumb, np.zeros(3, np.float32), np.zeros(4, np.float32))


def test_ids_grow_with_time_and_never_repeat():
    clock = IdClock(tag=7)
    ids = clock.take(500)  # more than 64 per millisecond: the clock moves on
    assert ids == sorted(ids) and len(set(ids)) == 500
    assert all((i >> 6) & 0xFFFF == 7 for i in ids)
    other = IdClock(tag=8).take(500)
    assert not set(ids) & set(other)


def test_pairs_thumbnails_and_paging(meta):
    ids = meta.log_add([pair("a.jpg", ["a dog", "a pet"]), pair("b.jpg", ['say "hi"'], None), pair("c.jpg", ["c"])])
    assert meta.count() == 3
    rec = meta.get(ids[0])
    assert rec.image == "a.jpg" and rec.captions == ["a dog", "a pet"] and rec.caption == "a dog | a pet"
    assert meta.captions([ids[1], 12345]) == {ids[1]: 'say "hi"'}
    assert meta.thumbnail("a.jpg") == b"\xff\xd8jpeg" and meta.thumbnail("b.jpg") is None
    assert [r.id for r in meta.page(-1, 2)] == ids[:2] and [r.id for r in meta.page(ids[1], 10)] == ids[2:]
    meta.log_delete([ids[0]])
    assert meta.get(ids[0]) is None and meta.count() == 2


def test_each_writer_s_records_are_read_whole_and_in_order(meta, monkeypatch):
    import asif.state.milvus_meta as milvus_meta

    monkeypatch.setattr(milvus_meta, "LOG_PAGE", 7)  # ranges of 7 numbers: reading 40 records takes six queries
    a, b = meta.register_writer(), meta.register_writer()
    assert a != b and meta.writers() == {a: 0, b: 0} and meta.last_seq() == 0
    assert meta.log_intents(a, 1, "add", list(range(100, 140))) == 40
    assert meta.log_intents(b, 1, "labels", [0], "animals") == 1
    assert meta.records(a, 0, 0) == []  # nothing committed is asked for: nothing read
    meta.commit(a, 40)
    assert meta.writers() == {a: 40, b: 0} and meta.last_seq() == 40
    got = meta.records(a, 0, 40)
    assert [(r.n, r.op, r.pair_id) for r in got] == [(n, "add", 99 + n) for n in range(1, 41)]
    assert [r.n for r in meta.records(a, 33, 40)] == list(range(34, 41))
    (labels,) = meta.records(b, 0, 1)
    assert (labels.writer, labels.op, labels.name) == (b, "labels", "animals")


def test_pages_of_pairs_are_in_id_order_whatever_the_insertion_order(meta, rng):
    ids = [int(i) for i in rng.permutation(20_000) * 5 + 7]  # more than one query returns (16,384)
    for start in range(0, 20_000, 4000):  # several inserts (segments), ids out of order
        meta.insert_pairs((i, f"{i}.jpg", [f"c{i}"], None) for i in ids[start : start + 4000])
    expected = sorted(ids)
    got, after = [], -1
    while page := meta.page(after, 1000):
        got += [r.id for r in page]
        after = page[-1].id
    assert got == expected


def test_label_sets_round_trip_and_replace(meta):
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    meta.put_label_set(StoredLabelSet("animals", ["dog", "cat", "emu"], ["a {}"], emb))
    meta.put_label_set(StoredLabelSet("tools", ["saw"], ["{}"], emb[:1]))
    (animals, tools) = meta.label_sets()
    assert animals.name == "animals" and animals.classes == ["dog", "cat", "emu"] and animals.templates == ["a {}"]
    np.testing.assert_array_equal(animals.embeddings, emb)
    assert tools.classes == ["saw"] and tools.embeddings.shape == (1, 4)
    first = meta.label_versions()["animals"]
    meta.put_label_set(StoredLabelSet("animals", ["owl"], ["{}"], emb[2:]))
    assert [s.classes for s in meta.label_sets()] == [["owl"], ["saw"]]
    assert (
        meta.label_versions()["animals"] != first
        and meta.label_set("animals").version == meta.label_versions()["animals"]
    )
    # The replaced version's rows are gone: one row per class is left.
    assert len(meta.client.query("t_label_rows", filter='set == "animals"', output_fields=["row"])) == 1
    assert meta.delete_label_set("tools") and not meta.delete_label_set("tools")
    assert [s.name for s in meta.label_sets()] == ["animals"]


def test_the_manifest_is_stored(meta):
    assert meta.get_meta("manifest") is None
    meta.set_meta("manifest", {"k": 800, "p": 8.0})
    meta.set_meta("manifest", {"k": 400, "p": 8.0})
    assert meta.get_meta("manifest") == {"k": 400, "p": 8.0}
