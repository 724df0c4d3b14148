import numpy as np
import pytest

from asif.stores import FaissStore, StoreError, build_store, choose_index_spec, count_distinct_rows, ivfpq_params
from tests import reference
from tests.conftest import random_unit


def test_index_choice_rule():
    assert choose_index_spec(10_000, 384).kind == "flat"
    spec = choose_index_spec(1_000_000, 1280)
    assert spec.kind == "ivfpq" and spec.factory == "IVF2048,PQ160x4fs" and spec.refine == "Flat"
    assert ivfpq_params(1_000_000, 384) == (2048, 48)
    assert ivfpq_params(1_000, 768) == (25, 96)  # nlist capped at n/39 training points per list
    assert choose_index_spec(100, 64, "IVF16,Flat").factory == "IVF16,Flat"
    # Five captions per image: the grouped image index holds n/5 vectors, its lists are sized for them;
    # without re-ranking nothing is grouped. auto still decides on the number of pairs.
    assert choose_index_spec(1_000_000, 1280, distinct=200_000).factory == "IVF1024,PQ160x4fs"
    assert choose_index_spec(1_000_000, 1280, refine=None, distinct=200_000).factory == "IVF2048,PQ160x4fs"
    assert choose_index_spec(60_000, 1280, distinct=12_000).kind == "ivfpq"
    x = np.repeat(np.eye(4, dtype=np.float32), 3, axis=0)
    assert count_distinct_rows(x) == 4 and count_distinct_rows(x[:0]) == 0
    with pytest.raises(StoreError):
        FaissStore(64, choose_index_spec(100, 64, "NotAnIndex"))


def test_flat_search_is_exact_with_ids(rng):
    a = random_unit(rng, 500, 16)
    ids = rng.choice(10**12, size=500, replace=False).astype(np.int64)
    store = build_store(a, ids, choose_index_spec(500, 16))
    q = random_unit(rng, 4, 16)
    sims, got = store.search(q, 60)
    ref_s, ref_i = reference.topk(q, a, 60)
    np.testing.assert_array_equal(got, ids[ref_i])
    np.testing.assert_allclose(sims, ref_s, atol=1e-5)


def test_ivf_always_returns_k_real_neighbours(rng):
    # 64 lists of ~16 vectors: k=900 needs almost every list; nprobe must follow per call.
    a = random_unit(rng, 1000, 16)
    store = build_store(a, np.arange(1000), choose_index_spec(1000, 16, "IVF64,Flat"))
    nprobe_before = store._ivf.nprobe
    _, ids = store.search(random_unit(rng, 3, 16), 900)
    assert ids.shape == (3, 900) and (ids >= 0).all()
    assert all(len(set(r)) == 900 for r in ids)
    assert store._ivf.nprobe == nprobe_before  # shared state untouched
    _sims, ids = store.search(random_unit(rng, 2, 16), 5000)  # k capped at ntotal
    assert ids.shape == (2, 1000) and (ids >= 0).all()


def test_fast_scan_padding_never_reaches_the_caller(rng):
    # 1 sub-quantiser of 16 centroids: FAISS's fast-scan drops the vectors whose quantised distance
    # saturates and pads rows with -1 even with every list probed. Searches must still return k real,
    # distinct neighbours with exact similarities, before and after removals.
    a = random_unit(rng, 300, 8)
    store = build_store(a, np.arange(300), choose_index_spec(300, 8, "IVF16,PQ1x4fs", rerank_factor=1.0))
    q = random_unit(rng, 5, 8)
    _, raw = store._search_ivf(q, 286)
    assert (raw < 0).any()  # the situation under test does occur
    for k in (30, 250, 300):
        sims, ids = store.search(q, k)
        assert ids.shape == (5, k) and (ids >= 0).all()
        assert all(len(set(r)) == k for r in ids)
        np.testing.assert_allclose(sims, np.einsum("bkd,bd->bk", a[ids], q), atol=1e-5)
    store.remove(np.arange(0, 300, 3))
    sims, ids = store.search(q, 200)
    assert (ids >= 0).all() and not np.isin(ids, np.arange(0, 300, 3)).any()
    ref_s, _ = reference.topk(q, np.delete(a, np.arange(0, 300, 3), axis=0), 200)
    np.testing.assert_allclose(sims, ref_s, atol=1e-5)  # fetch >= ntotal: exact over the whole store
    # Without re-ranking vectors the dropped ids are appended last, so a search still returns k real ids.
    bare = build_store(a, np.arange(300), choose_index_spec(300, 8, "IVF16,PQ1x4fs", refine=None))
    assert (bare._search_ivf(q, 300)[1] < 0).any()
    _, ids = bare.search(q, 300)
    assert all(sorted(r) == list(range(300)) for r in ids.tolist())


def test_rerank_factor_is_validated_and_recorded():
    assert choose_index_spec(1_000_000, 1280, rerank_factor=10).rerank_factor == 10
    assert choose_index_spec(1_000_000, 1280, refine=None).rerank_factor == 1.0
    with pytest.raises(StoreError, match="rerank_factor"):
        choose_index_spec(1_000_000, 1280, rerank_factor=0.5)
    assert choose_index_spec(1_000_000, 1280, refine="SQ8").refine == "SQ8"
    with pytest.raises(StoreError, match="unknown re-ranking store 'SQ9'"):
        choose_index_spec(1_000_000, 1280, refine="SQ9")


def test_add_remove_duplicate_and_unknown(rng):
    a = random_unit(rng, 300, 8)
    store = build_store(a, np.arange(300), choose_index_spec(300, 8, "ivfpq"))
    with pytest.raises(StoreError):
        store.add(np.array([5]), a[:1])
    with pytest.raises(StoreError):
        store.add(np.array([1000]), a[:1, :4])
    assert store.remove(np.array([3, 4, 99999])) == 2
    assert store.remove(np.array([3])) == 0
    assert store.ntotal == 298 and not store.contains(np.array([3, 4])).any()
    _, ids = store.search(a[3:4], 298)
    assert 3 not in ids and 4 not in ids
    store.add(np.array([3]), a[3:4])
    assert store.search(a[3:4], 1)[1][0, 0] == 3


@pytest.mark.parametrize("refine", ["Flat", "SQ8"])
def test_save_load_roundtrip(tmp_path, rng, refine):
    a = random_unit(rng, 400, 8)
    for kind in ["flat", "ivfpq"]:
        spec = choose_index_spec(400, 8, kind, refine=refine)
        store = build_store(a, np.arange(400) * 7, spec)
        store.remove(np.array([0, 7]))
        files = store.write(tmp_path / f"{kind}.faiss")
        assert all(f.exists() for f in files) and not list(tmp_path.glob("*.tmp"))
        loaded = FaissStore.read(tmp_path / f"{kind}.faiss", 8, spec)
        np.testing.assert_array_equal(loaded.ids(), store.ids())
        q = random_unit(rng, 3, 8)
        np.testing.assert_array_equal(loaded.search(q, 50)[1], store.search(q, 50)[1])
        loaded.add(np.array([0]), a[:1])  # a loaded trained index accepts adds


@pytest.mark.slow
def test_ivfpq_recall_at_800_on_50k_clustered(recall_setup):
    store, anchors, queries = recall_setup["image"]
    sims, ids = store.search(queries, 800)
    _, ref = reference.topk(queries, anchors, 800)
    recall = np.mean([len(np.intersect1d(ids[r], ref[r])) / 800 for r in range(len(queries))])
    print(f"IVF-PQ recall@800 on {len(anchors)} clustered anchors: {recall:.4f}")
    assert recall >= 0.95
    # Re-ranked similarities are the exact ones.
    np.testing.assert_allclose(sims, np.einsum("bkd,bd->bk", anchors[ids], queries), atol=1e-5)


@pytest.mark.slow
def test_compact_sq8_reranking_at_50k_clustered(recall_setup):
    """IVF-PQ candidates re-ranked on 8-bit scalar codes (1 byte per dimension instead of 4): recall@800 against
    exact search stays high and the similarities are within the codes' error of the exact ones."""
    _, anchors, queries = recall_setup["image"]
    spec = choose_index_spec(len(anchors), anchors.shape[1], "ivfpq", refine="SQ8")
    store = build_store(anchors, np.arange(len(anchors)), spec)
    assert not store.exact_vectors and store.bytes_per_vector()["refine"] < anchors.shape[1] + 20
    sims, ids = store.search(queries, 800)
    _, ref = reference.topk(queries, anchors, 800)
    recall = np.mean([len(np.intersect1d(ids[r], ref[r])) / 800 for r in range(len(queries))])
    print(f"IVF-PQ + SQ8 re-ranking recall@800 on {len(anchors)} clustered anchors: {recall:.4f}")
    assert recall >= 0.95
    np.testing.assert_allclose(sims, np.einsum("bkd,bd->bk", anchors[ids], queries), atol=0.01)


def test_vector_table_add_remove_lookup_roundtrip(tmp_path, rng):
    from asif.stores.vectors import VectorTable

    x = random_unit(rng, 50, 6)
    table = VectorTable(6)
    table.add(np.arange(50) * 2, x)
    table.remove(np.array([0, 98, 40, 7]))  # first, last, middle, absent
    assert table.ntotal == 47
    keep = [i for i in range(50) if i * 2 not in (0, 98, 40)]
    np.testing.assert_array_equal(table.get(np.array(keep) * 2), x[keep])
    with pytest.raises(KeyError):
        table.get(np.array([40]))
    table.write(tmp_path / "t.npz")
    again = VectorTable.read(tmp_path / "t.npz", 6, "Flat")
    np.testing.assert_array_equal(again.get(np.array(keep) * 2), x[keep])
    half = VectorTable(6, "SQfp16")
    half.add(np.array([3]), x[:1])
    np.testing.assert_allclose(half.get(np.array([3])), x[:1], atol=1e-3)
    with pytest.raises(ValueError, match="unknown re-ranking store"):
        VectorTable(6, "Bogus9")
    untrained = VectorTable(6, "SQ8")
    with pytest.raises(ValueError, match="not trained"):
        untrained.add(np.array([1]), x[:1])


TOLERANCE = {"Flat": 1e-6, "SQfp16": 2e-3, "SQ8": 1e-2, "SQ4": 0.1, "PCAR,SQ8": 1e-2}


@pytest.mark.parametrize("kind", list(TOLERANCE))
def test_vector_table_inner_products_match_numpy_after_edits(rng, kind, tmp_path):
    from asif.stores.vectors import VectorTable

    x = random_unit(rng, 200, 24)
    table = VectorTable(24, kind)
    table.train(x)  # compact codes (SQ8, SQ4) learn each dimension's range; Flat and SQfp16 need nothing
    table.add(np.arange(200) + 1000, x)
    table.remove(np.arange(1000, 1200, 7))  # rows move: products must follow ids, not rows
    alive = np.setdiff1d(np.arange(1000, 1200), np.arange(1000, 1200, 7))
    q = random_unit(rng, 3, 24)
    cand = np.stack([rng.choice(alive, 40, replace=False) for _ in range(3)])
    got = table.inner_products(cand, q)
    want = np.einsum("bfd,bd->bf", x[cand - 1000], q)
    np.testing.assert_allclose(got, want, atol=TOLERANCE[kind])
    # Products are those of the decoded vectors (PCAR: computed in the rotated space, never rotated back).
    decoded = table.get(cand.ravel()).reshape(*cand.shape, 24)
    np.testing.assert_allclose(got, np.einsum("bfd,bd->bf", decoded, q), atol=1e-5)
    with pytest.raises(KeyError):
        table.inner_products(np.array([[1000]]), q[:1])  # removed id
    # Written and read back (codes with their trained codec): the same values, and still editable.
    table.write(tmp_path / "t.npz", marker=np.arange(3))
    again = VectorTable.read(tmp_path / "t.npz", 24, kind)
    assert set(again.extra) == {"marker"} and again.nbytes() == table.nbytes()
    np.testing.assert_array_equal(again.inner_products(cand, q), got)
    again.add(np.array([5]), x[:1])
    np.testing.assert_allclose(again.get(np.array([5])), x[:1], atol=TOLERANCE[kind] * 5)
    if kind in ("SQ8", "SQ4", "PCAR,SQ8"):
        assert table.nbytes() < VectorTable(24, "SQfp16").dtype.itemsize * 24 * table.ntotal + 9000
        np.savez(tmp_path / "bad.npz", ids=np.arange(2), vectors=np.zeros((2, table.width), np.uint8))
        with pytest.raises(ValueError, match="without its codec"):
            VectorTable.read(tmp_path / "bad.npz", 24, kind)


def _lattice(rng, n, dim):
    """Vectors with coordinates in {-8..8}/16: every inner product is exact in float32 whatever the
    summation order, so FAISS Flat, the re-ranking kernel and numpy agree bit for bit. Equal
    similarities happen (a few per value) but stay within the TIE_MARGIN the searches allow for."""
    return (rng.integers(-8, 9, size=(n, dim)) / 16).astype(np.float32)


def _duplicated_anchors(rng, n_distinct=1500, copies=5, singles=3000, dim=32):
    """Anchors where each of n_distinct vectors appears `copies` times (like one image per caption),
    plus singletons, under shuffled ids so a group's members are not adjacent."""
    base = _lattice(rng, n_distinct + singles, dim)
    x = np.concatenate([np.repeat(base[:n_distinct], copies, axis=0), base[n_distinct:]])
    ids = rng.permutation(len(x)).astype(np.int64) * 3 + 7
    return x, ids


GROUPED_KINDS = ["IVF16,PQ32x8", "flat"]


def _grouped_and_flat(x, ids, kind="IVF16,PQ32x8"):
    # IVF: 8-bit codes of one dimension each: PQ ranks almost exactly, so the candidates hold the true
    # neighbours and the comparison with the flat index can be exact, on both search paths.
    # flat: told how many distinct vectors there are, the Flat index groups them too (exact candidates).
    distinct = len(np.unique(x, axis=0))
    grouped = build_store(x, ids, choose_index_spec(len(x), x.shape[1], kind, distinct=distinct))
    flat = build_store(x, ids, choose_index_spec(len(x), x.shape[1], "flat"))
    assert grouped.groups_duplicates and not flat.groups_duplicates
    return grouped, flat


def _assert_same_search(a, b, q, k):
    sa, ia = a.search(q, k)
    sb, ib = b.search(q, k)
    np.testing.assert_array_equal(ia, ib)  # same pairs in the same canonical order (ties by id)
    np.testing.assert_allclose(sa, sb, atol=1e-5)


@pytest.mark.parametrize("kind", GROUPED_KINDS)
def test_identical_vectors_are_indexed_once_and_search_like_a_flat_index(rng, kind):
    x, ids = _duplicated_anchors(rng)
    grouped, flat = _grouped_and_flat(x, ids, kind)
    assert grouped.ntotal == flat.ntotal == 10_500
    assert grouped.nvectors == grouped.refine.ntotal == 4500  # 1,500 groups of 5 + 3,000 singletons
    q = np.concatenate([_lattice(rng, 4, 32), x[:2]])
    # PQ path (fetch = max(4096, 5 * k * 4500 / 10500) < 4500 vectors) and the exact whole-table path
    for k in (1, 7, 50, 160, 1000, 10_500):
        _assert_same_search(grouped, flat, q, k)
    member = int(ids[1])  # second copy of the first vector: not its group's key unless its id is smallest
    np.testing.assert_array_equal(grouped.reconstruct(np.array([member]))[0], x[1])


@pytest.mark.parametrize("kind", GROUPED_KINDS)
def test_grouped_store_edits_keep_searching_like_flat(rng, tmp_path, kind):
    x, ids = _duplicated_anchors(rng)
    grouped, flat = _grouped_and_flat(x, ids, kind)
    q = _lattice(rng, 5, 32)
    groups_of_first = ids[:5]  # the five pairs sharing vector 0
    key = int(groups_of_first.min())
    removals = [
        np.array([key]),  # a group's key: the vector is re-indexed under the next smallest member
        np.sort(groups_of_first)[-1:],  # a plain member
        ids[5:10],  # a whole group in one call
        ids[7500:7510],  # singletons
        np.array([10**9]),  # unknown: ignored
    ]
    for r in removals:
        assert grouped.remove(r) == flat.remove(r)
        assert grouped.ntotal == flat.ntotal and set(grouped.ids().tolist()) == set(flat.ids().tolist())
        _assert_same_search(grouped, flat, q, 40)
    assert grouped.nvectors == 4500 - 1 - 10  # one whole group and ten singletons gone
    new = np.arange(5) + 10**6
    same = np.repeat(_lattice(rng, 1, 32), 5, axis=0)
    grouped.add(new, same)
    flat.add(new, same)
    assert grouped.nvectors == 4490
    _assert_same_search(grouped, flat, np.concatenate([q, same[:1]]), 40)
    # Groups survive a save and load.
    grouped.write(tmp_path / "g.faiss")
    again = FaissStore.read(tmp_path / "g.faiss", 32, grouped.spec)
    assert again.ntotal == grouped.ntotal and again.nvectors == grouped.nvectors
    _assert_same_search(again, flat, q, 40)
    # The remaining members of the first group still go together after removing the new key.
    again.remove(np.array([int(np.sort(groups_of_first)[1])]))
    flat.remove(np.array([int(np.sort(groups_of_first)[1])]))
    _assert_same_search(again, flat, np.concatenate([q, x[:1]]), 40)


def test_a_group_larger_than_the_tie_margin_straddling_k_keeps_its_smallest_ids(rng):
    # One image with 400 captions: 400 pairs tie exactly. When k cuts through them, the canonical
    # order (similarity, then id) wants the smallest ids, which a partition of k + TIE_MARGIN could lose.
    x = _lattice(rng, 4500, 32)
    x = np.concatenate([x, np.repeat(x[:1], 399, axis=0)])
    ids = rng.permutation(len(x)).astype(np.int64)
    store = build_store(x, ids, choose_index_spec(len(x), 32, "IVF16,PQ32x8"))
    assert store.nvectors == 4500
    q = x[:1] * 0.75 + _lattice(rng, 1, 32) * 0.25  # the big group ranks among the first few
    sims = (q @ x.T)[0]
    order = np.lexsort((ids, -sims))  # exact arithmetic: the reference canonical order
    group = set(ids[np.all(x == x[0], axis=1)].tolist())
    first = next(i for i, pid in enumerate(ids[order].tolist()) if pid in group)
    k = first + 70
    assert k < 1500  # PQ path: fetch 4096 < 4500 vectors
    _, got = store.search(q, k)
    np.testing.assert_array_equal(got[0], ids[order][:k])


def _big_tie(rng, n_tie=300, n_other=1000, dim=16):
    """One vector repeated n_tie times (one image with many captions) among others, under shuffled
    ids: insertion order is not id order, and the run is far longer than TIE_MARGIN."""
    other = random_unit(rng, n_other, dim)
    x = np.concatenate([np.repeat(other[:1], n_tie - 1, axis=0), other])
    ids = rng.permutation(len(x)).astype(np.int64) * 3 + 7
    group = np.sort(ids[:n_tie])  # rows 0..n_tie-1 all hold the repeated vector
    return x, ids, group, other[:1]


@pytest.mark.parametrize("factory", ["flat", "IVF16,Flat"])
def test_ties_longer_than_the_margin_keep_the_smallest_ids(rng, factory):
    # Flat, and IVF without re-ranking vectors: FAISS truncates a run of equal similarities in insertion
    # order; the k-th place must still go to the smallest pair ids, as in the reference.
    x, ids, group, dup = _big_tie(rng)
    store = build_store(x, ids, choose_index_spec(len(x), x.shape[1], factory))
    q = np.concatenate([dup, 0.6 * dup + 0.4 * random_unit(rng, 3, x.shape[1])])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    for k in (1, 10, 100, 299, 300, 400):
        sims, got = store.search(q, k)
        ref_s, ref_i = reference.topk(q, x, k, ids=ids)
        np.testing.assert_array_equal(got, ids[ref_i])
        np.testing.assert_allclose(sims, ref_s, atol=1e-5)
        np.testing.assert_array_equal(got[0], group[:k] if k <= len(group) else got[0])


def test_ties_longer_than_the_margin_ivf_pq_without_refine(rng):
    # PQ similarities are approximate, but identical vectors share a code: the run ties exactly.
    x, ids, group, dup = _big_tie(rng)
    store = build_store(x, ids, choose_index_spec(len(x), x.shape[1], "IVF16,PQ16x8", refine=None))
    for k in (10, 100, 250):
        _, got = store.search(dup, k)
        np.testing.assert_array_equal(got[0], group[:k])


@pytest.mark.parametrize("factory", ["IVF16,PQ16x8", "IVF16,PQ8x4fs"])
@pytest.mark.parametrize("calls", ["one copy per call", "mixed"])
def test_ties_at_the_candidate_cut_of_a_refined_store(rng, monkeypatch, factory, calls):
    # Identical vectors added by separate calls are not grouped: each call's copies are a PQ candidate of
    # their own, with the same code. With one candidate per vector wanted, the PQ cut falls inside the run;
    # with some copies grouped, fewer candidates than k are fetched and all of them are kept.
    import asif.stores.faiss_search as store_module

    monkeypatch.setattr(store_module, "RERANK_MIN", 1)
    x, ids, group, dup = _big_tie(rng)
    n_tie = len(group)
    store = build_store(x[n_tie - 1 :], ids[n_tie - 1 :], choose_index_spec(len(x), 16, factory, rerank_factor=1.0))
    sizes = [1] * (n_tie - 1) if calls == "one copy per call" else [1] * 149 + [50, 40, 60]
    for start, size in zip(np.cumsum([0, *sizes[:-1]]), sizes, strict=True):
        store.add(ids[start : start + size], x[start : start + size])
    assert store.ntotal == len(x) and store.nvectors == len(x) - sum(sizes) + len(sizes)
    for k in (10, 100, 250):
        sims, got = store.search(dup, k)
        np.testing.assert_array_equal(got[0], group[:k])
        np.testing.assert_allclose(sims[0], 1.0, atol=1e-5)


def test_top_sorted_keeps_the_smallest_ids_of_a_long_tie(rng):
    # Long rows are partitioned to k + TIE_MARGIN before sorting: a run of 300 values in the k-th cell
    # must still yield its smallest ids. Row 0: the run on top; row 1: the run after 50 larger values
    # (values within one TIE_GRID cell, not equal); row 2: no tie.
    from asif.math.topk import TIE_GRID, top_sorted

    n = 6000
    sims = rng.uniform(-1.0, 0.4, size=(3, n))
    ids = np.stack([rng.permutation(n) * 2 + 1 for _ in range(3)]).astype(np.int64)
    run = rng.choice(n, 300, replace=False)
    sims[0, run] = 0.5
    sims[1, run] = 0.5 + rng.uniform(0.0, TIE_GRID / 2, size=300)
    sims[1, rng.choice(np.setdiff1d(np.arange(n), run), 50, replace=False)] = 0.6 + rng.uniform(0, 0.1, 50)
    for dtype in (np.float32, np.float64):
        s = sims.astype(dtype)
        for k in (1, 10, 60, 100, 290, 400):
            got_s, got_i = top_sorted(s, ids, k)
            for r in range(3):
                order = np.lexsort((ids[r], -np.floor(s[r] / TIE_GRID)))[:k]
                np.testing.assert_array_equal(got_i[r], ids[r, order])
                np.testing.assert_array_equal(got_s[r], s[r, order])


def test_refined_search_keeps_runs_of_identical_vectors_by_smallest_ids(rng, monkeypatch):
    # Runs of identical vectors spread over several add calls (partly grouped), coarse PQ (fast-scan ranks
    # a run below vectors it beats exactly), few candidates: whatever part of a run a search returns must
    # be its smallest ids.
    import asif.stores.faiss_search as store_module

    monkeypatch.setattr(store_module, "RERANK_MIN", 1)
    cut_runs = 0
    for _ in range(3):
        base = random_unit(rng, 300, 8)
        which = rng.integers(0, 300, 3000)
        which[rng.choice(3000, 400, replace=False)] = 0  # one long run besides the short ones
        x, ids = base[which], rng.permutation(10_000)[:3000].astype(np.int64)
        parts = np.split(np.arange(3000), np.sort(rng.choice(np.arange(1000, 3000), 5, replace=False)))
        store = build_store(x[parts[0]], ids[parts[0]], choose_index_spec(3000, 8, "IVF8,PQ4x4fs", rerank_factor=1.0))
        for part in parts[1:]:
            store.add(ids[part], x[part])
        q = np.concatenate([base[:2], random_unit(rng, 4, 8)])
        for k in (1, 10, 100, 350, 500):
            _, got = store.search(q, k)
            for r in range(len(q)):
                for run in np.unique(which[np.isin(ids, got[r])]):
                    members = np.sort(ids[which == run])
                    returned = np.sort(got[r][np.isin(got[r], members)])
                    np.testing.assert_array_equal(returned, members[: len(returned)])
                    cut_runs += len(returned) < len(members)
    assert cut_runs > 50  # the situation under test does occur


def test_vector_table_grows_by_blocks_without_copying_and_round_trips(tmp_path, rng):
    from asif.stores.vectors import BLOCK_ROWS, VectorTable

    table = VectorTable(4)
    n = 2 * BLOCK_ROWS + 100
    vectors = rng.standard_normal((n, 4)).astype(np.float32)
    ids = rng.permutation(3 * n)[:n].astype(np.int64)  # sparse, unordered ids
    table.add(ids[:10], vectors[:10])
    first = table.blocks[0]
    table.add(ids[10:], vectors[10:])
    assert table.blocks[0] is first and len(table.blocks) == 3  # earlier rows never moved
    gone = ids[::7]
    table.remove(gone)
    keep = np.ones(n, dtype=bool)
    keep[::7] = False
    np.testing.assert_array_equal(table.get(ids[keep]), vectors[keep])
    q = rng.standard_normal((2, 4)).astype(np.float32)
    cand = np.stack([ids[keep][::97], ids[keep][5::97]])  # candidates spread over every block
    np.testing.assert_allclose(
        table.inner_products(cand, q),
        np.einsum("bfd,bd->bf", table.get(cand.ravel()).reshape(*cand.shape, 4), q),
        atol=1e-5,
    )
    table.write(tmp_path / "t.npz", extra=np.arange(3))
    again = VectorTable.read(tmp_path / "t.npz", 4, "Flat")
    assert again.ntotal == keep.sum() and again.extra["extra"].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(again.get(ids[keep]), vectors[keep])
    with np.load(tmp_path / "t.npz") as z:  # a plain .npz for numpy too
        assert z["vectors"].shape == (keep.sum(), 4)


def test_a_refined_store_deletes_lazily_and_never_returns_a_deleted_pair(tmp_path, rng, monkeypatch):
    import asif.stores.faiss_store as store_mod

    monkeypatch.setattr(store_mod, "PURGE_AT", 50)
    n, d = 3000, 32
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    store = build_store(x, np.arange(n), choose_index_spec(n, d, "ivfpq"))
    q = x[:20] + 0.05 * rng.standard_normal((20, d)).astype(np.float32)
    victims = np.unique(store.search(q, 30)[1][:, :5])  # the best neighbours: they would surely come back
    store.remove(victims[:40])
    assert 0 < len(store._dead) < 50 and store.index.ntotal == n  # still in FAISS, filtered out
    keep = np.setdiff1d(np.arange(n), victims[:40])
    _, ref = reference.topk(q, x[keep], 30)
    assert np.array_equal(store.search(q, 30)[1], keep[ref])
    store.remove(victims[40:] if len(victims) > 40 else keep[:20])
    gone = np.setdiff1d(np.arange(n), store.ids())
    assert store.index.ntotal == n - len(gone) + len(store._dead)  # FAISS holds the live ones and the dead
    store.add(gone[:3], x[gone[:3]])  # ids deleted and added again: their old vectors are purged first
    keep = store.ids()
    _, ref = reference.topk(q, x[keep], 30)
    assert np.array_equal(store.search(q, 30)[1], keep[ref])
    store.write(tmp_path / "s.faiss")  # written without the deleted vectors
    again = FaissStore.read(tmp_path / "s.faiss", d, store.spec)
    assert np.array_equal(again.ids(), keep) and again.index.ntotal == len(keep)
    assert np.array_equal(again.search(q, 30)[1], keep[ref])


def test_duplicate_groups_bookkeeping():
    from asif.stores.duplicates import DuplicateGroups

    x = np.array([[1.0, 0], [0, 1.0], [1.0, 0], [1.0, 0]], dtype=np.float32)
    groups = DuplicateGroups()
    rows = groups.group(np.array([9, 4, 5, 7]), x)
    assert rows.tolist() == [1, 2]  # one row per group: id 4 alone, ids {5, 7, 9} keyed by 5
    assert groups.members(5) == [5, 7, 9] and groups.key_of(9) == 5 and groups.key_of(4) == 4
    assert groups.remove(np.array([5])) == ([], [(5, 7)])  # the key goes: the next smallest takes over
    assert groups.members(7) == [7, 9] and groups.key_of(9) == 7
    assert groups.remove(np.array([7, 9, 4])) == ([7, 4], [])  # a group deleted whole: its key is dropped once
    assert not groups and groups.arrays()[0].size == 0
    again = DuplicateGroups(np.array([3, 8]), np.array([2, 2]))
    assert again.members(2) == [2, 3, 8] and sorted(again.non_keys()) == [3, 8]


@pytest.mark.parametrize("kind", ["Flat", "SQ8"])
def test_a_mapped_table_answers_like_a_read_one_through_edits_and_leaves_its_file_alone(tmp_path, rng, kind):
    """read(mmap=True) maps the rows from the file (copy-on-write): the same products as a table read into memory,
    before and after adds and removes (which move mapped rows), the file unchanged by them, and a rewrite equal."""
    from asif.stores.vectors import BLOCK_ROWS, VectorTable

    n = BLOCK_ROWS + 1000  # one full mapped block and a partial one
    x = random_unit(rng, n, 8)
    table = VectorTable(8, kind)
    table.train(x)
    table.add(np.arange(n) * 2, x)
    path = tmp_path / "t.npz"
    table.write(path)
    before = path.read_bytes()
    read, mapped = VectorTable.read(path, 8, kind), VectorTable.read(path, 8, kind, mmap=True)
    assert mapped.mapped and not read.mapped
    q = random_unit(rng, 4, 8)
    cand = np.stack([rng.choice(n, 300, replace=False) * 2 for _ in range(4)])
    np.testing.assert_array_equal(mapped.inner_products(cand, q), read.inner_products(cand, q))
    gone = np.array([0, 2, 2 * (BLOCK_ROWS - 1), 2 * (n - 1)])  # rows of the mapped block and of the tail
    extra = random_unit(rng, 3, 8)
    for t in (read, mapped):
        t.remove(gone)
        t.add(np.array([1, 3, 5]), extra)
    alive = np.setdiff1d(np.arange(n) * 2, gone)
    cand = np.stack([np.concatenate([rng.choice(alive, 300, replace=False), [1, 3, 5]]) for _ in range(4)])
    np.testing.assert_array_equal(mapped.inner_products(cand, q), read.inner_products(cand, q))
    assert path.read_bytes() == before  # edits stayed in memory
    mapped.write(tmp_path / "again.npz")
    again = VectorTable.read(tmp_path / "again.npz", 8, kind)
    np.testing.assert_array_equal(again.get(alive[:500]), read.get(alive[:500]))
    assert again.ntotal == read.ntotal == n - 4 + 3


def test_flat_index_over_repeated_images_scans_each_image_once_and_equals_the_dense_reference(rng):
    """Per-caption anchors repeat each image vector (Flickr8k: 40,450 pairs, 8,090 images): the auto index keeps one
    vector per image, and its search (through removals and adds) equals the dense reference over all pairs."""
    spec = choose_index_spec(40_450, 1280, distinct=8_090)
    assert (spec.kind, spec.factory, spec.refine) == ("flat", "IDMap2,Flat", "Flat")
    assert choose_index_spec(40_450, 384, distinct=40_450).refine is None  # nothing to group: no extra table
    assert choose_index_spec(40_450, 384, distinct=40_300).refine is None  # a few repeated captions: not worth it
    x, ids = _duplicated_anchors(rng, n_distinct=600, copies=5, singles=300, dim=24)
    store = build_store(x, ids, choose_index_spec(len(x), 24, distinct=900))
    assert store.nvectors == 900 and store.ntotal == 3300
    keep = np.ones(len(ids), dtype=bool)
    q = np.concatenate([_lattice(rng, 3, 24), x[:1]])
    for step in range(4):
        for k in (1, 40, 800, len(ids)):
            sims, got = store.search(q, k)
            ref_s, rows = reference.topk(q, x[keep], min(k, int(keep.sum())), ids[keep])
            assert got.tolist() == ids[keep][rows].tolist()
            np.testing.assert_allclose(sims, ref_s, atol=1e-5)
        drop = rng.choice(np.flatnonzero(keep), 150, replace=False)
        store.remove(ids[drop])
        keep[drop] = False
        if step == 1:  # three captions of a new image, and a caption of an old image again
            new_ids = np.array([10**6, 10**6 + 1, 10**6 + 2, 10**6 + 3])
            new = np.concatenate([np.repeat(_lattice(rng, 1, 24), 3, axis=0), x[:1]])
            store.add(new_ids, new)
            x, ids, keep = np.concatenate([x, new]), np.concatenate([ids, new_ids]), np.concatenate([keep, [True] * 4])


@pytest.mark.parametrize("kind", ["Flat", "SQfp16", "SQ8"])
def test_vector_table_products_cover_every_row_across_blocks(rng, kind):
    """The exact whole-table search multiplies block by block: over more rows than one block holds, after removals
    (rows move), each query's products equal the dense ones with the vectors the table returns for its ids."""
    from asif.stores.vectors import BLOCK_ROWS, VectorTable

    x = random_unit(rng, BLOCK_ROWS + 1000, 8)
    ids = np.arange(len(x), dtype=np.int64) * 2
    table = VectorTable(8, kind)
    if table.needs_training:
        table.train(x[:5000])
    table.add(ids, x)
    table.remove(ids[10:20])
    q = random_unit(rng, 3, 8)
    sims, got_ids = table.products(q)
    assert sims.shape == (3, len(x) - 10) and sorted(got_ids.tolist()) == sorted(set(ids.tolist()) - set(ids[10:20]))
    stored = table.get(got_ids)
    np.testing.assert_allclose(sims, q.astype(np.float64) @ stored.T.astype(np.float64), atol=1e-5)
    if kind == "Flat":
        np.testing.assert_allclose(stored, x[got_ids // 2], atol=0)


def test_long_pq_cells_of_distinct_vectors_end_the_candidates_without_a_cascade(rng, monkeypatch):
    # Fast-scan similarities are quantised: deep in the ranking, dozens of distinct vectors share one. The
    # candidates must end at a cell boundary, not be fetched again with twice as many until the whole table
    # is scanned exactly (0.6-0.8 s a query at 1M), and still not depend on the order of insertion.
    import asif.stores.faiss_search as store_module

    monkeypatch.setattr(store_module, "RERANK_MIN", 1)
    x = random_unit(rng, 20_000, 8)
    ids = np.arange(len(x), dtype=np.int64) * 3 + 1
    spec = choose_index_spec(len(x), 8, "IVF8,PQ2x4fs", rerank_factor=2.0)  # coarse PQ: cells of 60-160 at 2k
    base = 4000
    stores = [build_store(x[:base], ids[:base], spec) for _ in range(2)]
    for store, order in zip(stores, [np.arange(base, len(x)), rng.permutation(np.arange(base, len(x)))], strict=True):
        for part in np.array_split(order, 7):
            store.add(ids[part], x[part])
    widest: list[int] = []
    exact_calls: list[int] = []
    reranked: list[np.ndarray] = []
    search_ivf, exact_all, rerank = FaissStore._search_ivf, FaissStore._exact_all, FaissStore._rerank
    monkeypatch.setattr(FaissStore, "_search_ivf", lambda s, q, f: (widest.append(f), search_ivf(s, q, f))[1])
    monkeypatch.setattr(FaissStore, "_exact_all", lambda s, q, k: (exact_calls.append(len(q)), exact_all(s, q, k))[1])
    monkeypatch.setattr(
        FaissStore, "_rerank", lambda s, q, c, k: (reranked.append((c >= 0).sum(1)), rerank(s, q, c, k))[1]
    )
    q = random_unit(rng, 40, 8)
    cut_off = 0
    for k in (300, 1000):
        widest.clear()
        reranked.clear()
        results = [store.search(q, k) for store in stores]
        assert not exact_calls and max(widest) == 2 * k + store_module.TIE_MARGIN  # one PQ pass per store
        np.testing.assert_array_equal(results[0][1], results[1][1])
        np.testing.assert_array_equal(results[0][0], results[1][0])
        counts = np.concatenate(reranked)
        assert counts.min() >= k  # never more than half the 2k candidates wanted are cut off
        cut_off += int((counts < 2 * k).sum())
    assert cut_off  # cells that ran past the candidates fetched were left out
