"""The VectorStore contract, run against both implementations: the FAISS store (exact Flat) and the Milvus store
(milvus-lite, embedded, FLAT). Results are checked against the independent dense reference (tests/reference.py)."""

from __future__ import annotations

import numpy as np
import pytest

from asif.stores import FaissStore, StoreError, VectorStore, choose_index_spec
from asif.stores.milvus_store import TOPK_MAX, MilvusIndex, MilvusStore
from tests.reference import topk

BACKENDS = ["faiss", "milvus"]


def dense_topk(q, x, ids, k):
    """(similarities, ids) of the reference's top k."""
    sims, rows = topk(q, x, k, ids)
    return sims, np.asarray(ids)[rows]


def make_store(backend: str, dim: int, tmp_path, name: str = "anchors", index: str = "FLAT") -> VectorStore:
    if backend == "faiss":
        return FaissStore(dim, choose_index_spec(0, dim, "flat"))
    from pymilvus import MilvusClient

    client = MilvusClient(str(tmp_path / f"milvus-{name}.db"))
    return MilvusStore(client, name, dim, MilvusIndex.parse(index))


def unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_equals_the_dense_reference_through_adds_and_removes(backend, tmp_path):
    rng = np.random.default_rng(0)
    store = make_store(backend, 32, tmp_path)
    assert isinstance(store, VectorStore)
    x = unit(rng, 600, 32)
    ids = np.arange(600, dtype=np.int64) * 3 + 7  # sparse ids
    store.add(ids[:400], x[:400])
    store.add(ids[400:], x[400:])
    assert store.ntotal == 600 and store.ids().tolist() == sorted(ids.tolist())
    gone = ids[::5]
    assert store.remove(np.concatenate([gone, [10**9]])) == len(gone)
    keep = ~np.isin(ids, gone)
    q = unit(rng, 4, 32)
    for k in (1, 50, 480, 1000):
        sims, got = store.search(q, k)
        ref_s, ref_i = dense_topk(q, x[keep], ids[keep], k)
        assert got.tolist() == ref_i.tolist()
        np.testing.assert_allclose(sims, ref_s, atol=1e-5)
    assert store.contains(np.array([ids[1], ids[0], 5])).tolist() == [True, False, False]
    np.testing.assert_allclose(store.reconstruct(ids[[3, 1]]), x[[3, 1]], atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_at_the_kth_place_go_to_the_smallest_ids(backend, tmp_path):
    rng = np.random.default_rng(1)
    base = unit(rng, 1, 16)
    other = unit(rng, 40, 16)
    x = np.concatenate([np.repeat(base, 120, axis=0), other])  # 120 identical anchors
    ids = rng.permutation(10_000)[: len(x)].astype(np.int64)
    store = make_store(backend, 16, tmp_path)
    order = rng.permutation(len(x))  # inserted in random order
    store.add(ids[order], x[order])
    sims, got = store.search(base, 30)
    assert got[0].tolist() == sorted(ids[:120].tolist())[:30]
    np.testing.assert_allclose(sims, 1.0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_use_is_a_store_error_and_changes_nothing(backend, tmp_path):
    rng = np.random.default_rng(2)
    store = make_store(backend, 8, tmp_path)
    x = unit(rng, 10, 8)
    store.add(np.arange(10), x)
    for ids, vecs, needle in (
        (np.array([3]), x[:1], "already present"),
        (np.array([20, 20]), x[:2], "duplicate"),
        (np.array([21]), np.full((1, 8), np.nan, dtype=np.float32), "NaN"),
        (np.array([22]), x[:1, :4], "shape"),
        (np.array([23, 24]), x[:1], "ids for"),
    ):
        with pytest.raises(StoreError, match=needle):
            store.add(ids, vecs)
    assert store.ntotal == 10
    with pytest.raises(StoreError, match="unknown ids"):
        store.reconstruct(np.array([1, 99]))
    assert store.search(x[:1], 0)[1].shape == (1, 0)


def test_milvus_refuses_k_above_its_topk_limit_up_front(tmp_path):
    store = make_store("milvus", 8, tmp_path)
    store.add(np.arange(3), unit(np.random.default_rng(3), 3, 8))
    with pytest.raises(StoreError, match="top-k limit"):
        store.search(unit(np.random.default_rng(4), 1, 8), TOPK_MAX + 1)


def test_milvus_reopens_a_collection_and_checks_its_dimension(tmp_path):
    from pymilvus import MilvusClient

    client = MilvusClient(str(tmp_path / "m.db"))
    first = MilvusStore(client, "img", 8)
    first.add(np.arange(5), unit(np.random.default_rng(5), 5, 8))
    again = MilvusStore(client, "img", 8)
    assert again.ntotal == 5
    with pytest.raises(StoreError, match="8-d vectors, expected 16"):
        MilvusStore(client, "img", 16)


@pytest.mark.parametrize(
    # milvus-lite 3.2 builds 128 IVF lists whatever nlist says: all of them are probed, so that recall does not depend
    # on whether the index of the flushed segment is built yet at search time (before, the segment is scanned).
    "index",
    ["IVF_FLAT:nlist=128,nprobe=128", "HNSW:M=16,efConstruction=100", "IVF_SQ8:nlist=128,nprobe=128"],
)
def test_milvus_approximate_index_types_report_true_inner_products(index, tmp_path):
    rng = np.random.default_rng(6)
    x = unit(rng, 1000, 32)
    ids = np.arange(1000, dtype=np.int64)
    store = make_store("milvus", 32, tmp_path, index=index)
    store.add(ids, x)
    q = unit(rng, 3, 32)
    sims, got = store.search(q, 100)
    # Whatever was found, its similarity is the exact inner product; recall is high with every list probed.
    exact = np.einsum("qd,qkd->qk", q, x[got])
    np.testing.assert_allclose(sims, exact, atol=1e-5)
    _, ref_i = dense_topk(q, x, ids, 100)
    recall = np.mean([len(set(a) & set(b)) / 100 for a, b in zip(got.tolist(), ref_i.tolist(), strict=True)])
    assert recall >= 0.95, recall
