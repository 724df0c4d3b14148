"""Live edits under concurrency: answers equal the dense reference of the pair set they saw, snapshots
never block classification, edits are validated before they are logged."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

import asif.serving.labels
import asif.serving.live
import asif.serving.model
import asif.serving.neighbours
from asif.serving.labels import LabelSet
from asif.serving.live import LiveModel
from asif.state.metadata import NewPair
from asif.state.persist import read_manifest
from asif.stores import StoreError
from tests import reference
from tests.conftest import HashTextEncoder, PixelEncoder, random_unit, write_synthetic_index

K, P = 30, 8.0


def open_live(path, **kw) -> LiveModel:
    return LiveModel(path, PixelEncoder(), HashTextEncoder(), **kw)


def labels(n: int, name: str = "class") -> LabelSet:
    return LabelSet(tuple(f"{name} {i}" for i in range(n)), ("{}",))


class History:
    """The pair set at every model version, recorded from the edit log calls (made under the write lock)."""

    def __init__(self, live: LiveModel, img: np.ndarray, txt: np.ndarray) -> None:
        self.vectors = {i: (img[i], txt[i]) for i in range(len(img))}
        self.edits: list[tuple[str, list[int]]] = []
        self.seqs = [live.version]  # seqs[i]: the log's sequence number after the first i edits
        meta = live.metadata
        log_add, log_delete = meta.log_add, meta.log_delete

        def add(pairs):
            ids = log_add(pairs)
            for i, pair in zip(ids, pairs, strict=True):
                self.vectors[i] = (pair.image_vec, pair.text_vec)
            self.edits.append(("add", ids))
            self.seqs.append(meta.last_seq())
            return ids

        def delete(ids):
            log_delete(ids)
            self.edits.append(("delete", list(ids)))
            self.seqs.append(meta.last_seq())

        live.metadata.log_add = add
        live.metadata.log_delete = delete
        self.base = set(range(len(img)))
        self._memo: dict[int, list[int]] = {}

    def pairs_at(self, version: int) -> list[int]:
        """The pairs after the edits up to log sequence number ``version``."""
        version = self.seqs.index(version)
        if version not in self._memo:
            ids = set(self.base)
            for op, changed in self.edits[:version]:
                ids = ids | set(changed) if op == "add" else ids - set(changed)
            self._memo[version] = sorted(ids)
        return self._memo[version]

    def reference_scores(self, version: int, queries: np.ndarray, label_emb: np.ndarray, k: int) -> np.ndarray:
        ids = self.pairs_at(version)  # rows in id order: the reference breaks ties by row
        img = np.stack([self.vectors[i][0] for i in ids])
        txt = np.stack([self.vectors[i][1] for i in ids])
        return reference.scores(queries, label_emb, img, txt, k, P)


def new_pair(rng: np.random.Generator, name: str) -> NewPair:
    return NewPair(name, [name], None, random_unit(rng, 1, 48)[0], random_unit(rng, 1, 64)[0])


@pytest.mark.parametrize("n_stored", [12, 2000])
def test_concurrent_classify_edits_and_snapshots_equal_the_dense_reference(tmp_path, n_stored):
    img, txt = write_synthetic_index(tmp_path / "index", n=300, k=K, p=P)
    live = open_live(tmp_path / "index", compact_ratio=0.05)  # compactions happen during the run too
    history = History(live, img, txt)
    rng = np.random.default_rng(5)
    stored_emb, inline_emb = random_unit(rng, n_stored, 64), random_unit(rng, 8, 64)
    stored = live.put_label_set("stored", labels(n_stored), stored_emb)
    inline_set = labels(8, "inline")
    answers: list[tuple[int, int, np.ndarray, np.ndarray, str]] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    snapshots: list[asif.serving.live.SnapshotInfo] = []

    def reader(seed: int) -> None:
        r = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                q = random_unit(r, 2, 48)
                which = "stored" if r.random() < 0.5 else "inline"
                if which == "stored":
                    cached = stored
                else:
                    cached = live.cached_inline(inline_set) or live.add_inline(inline_set, inline_emb)
                n = len(cached.classes)
                ans = live.classify(q, cached, k=K, p=P, top=n)
                got = np.array([[dict(pred.scores)[c] for c in cached.classes] for pred in ans.predictions])
                answers.append((ans.version, ans.k, q, got, which))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def writer(seed: int) -> None:
        r = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                if r.random() < 0.55:
                    live.add_pairs([new_pair(r, f"w{seed}") for _ in range(int(r.integers(1, 3)))])
                else:
                    live.delete_pairs([int(r.integers(0, 300 + 2 * len(history.edits) + 1))])
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    def snapshotter() -> None:
        try:
            while not stop.is_set():
                snapshots.append(live.snapshot())
                time.sleep(0.02)
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    threads += [threading.Thread(target=writer, args=(10 + s,)) for s in range(2)]
    threads.append(threading.Thread(target=snapshotter))
    for t in threads:
        t.start()
    time.sleep(3.0)
    deadline = time.monotonic() + 20  # 2,000-label answers are slow to check in Python: give the edits time
    while time.monotonic() < deadline and (len(history.edits) < 25 or len({a[0] for a in answers}) < 12):
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    versions = {a[0] for a in answers}
    assert len(history.edits) >= 20 and len(versions) >= 10, (len(history.edits), len(versions))
    assert any(s.edits for s in snapshots) and any(s.compacted for s in snapshots)
    # Every answer against the reference; with 2,000 labels, 60 of them spread over the run (each costs a dense
    # computation of 2,000 label representations).
    checked = answers if n_stored <= 100 else [answers[i] for i in np.linspace(0, len(answers) - 1, 60).astype(int)]
    assert any(a[4] == "stored" for a in checked)
    for version, k, q, got, which in checked:
        emb = stored_emb if which == "stored" else inline_emb
        assert k == min(K, len(history.pairs_at(version)))
        np.testing.assert_allclose(got, history.reference_scores(version, q, emb, k), atol=2e-5)

    # What is on disk after the last snapshot plus the log is the final pair set, and answers alike.
    live.snapshot()
    final = history.pairs_at(live.version)
    assert sorted(live.model.image_store.ids().tolist()) == final
    live.close()
    again = open_live(tmp_path / "index")
    assert sorted(again.model.image_store.ids().tolist()) == final == sorted(again.metadata.ids())
    q = random_unit(rng, 3, 48)
    ans = again.classify(q, again.label_set("stored"), k=K, p=P, top=n_stored)
    got = np.array([[dict(pred.scores)[c] for c in labels(n_stored).classes] for pred in ans.predictions])
    assert ans.version == live.version == history.seqs[-1]
    np.testing.assert_allclose(got, history.reference_scores(ans.version, q, stored_emb, K), atol=2e-5)


def test_snapshot_never_blocks_classification_or_edits(tmp_path, monkeypatch):
    write_synthetic_index(tmp_path / "index", n=200)
    live = open_live(tmp_path / "index")
    rng = np.random.default_rng(1)
    cached = live.put_label_set("s", labels(5), random_unit(rng, 5, 64))
    live.add_pairs([new_pair(rng, "before")])
    inside, release = threading.Event(), threading.Event()
    real_write = asif.serving.live.write_delta

    def slow_write(*args, **kwargs):
        inside.set()
        assert release.wait(30)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(asif.serving.live, "write_delta", slow_write)
    snap = threading.Thread(target=live.snapshot)
    snap.start()
    assert inside.wait(10)
    # The snapshot is stuck writing: an edit, then a classification, both go through at once.
    done = threading.Event()

    def edit_then_classify() -> None:
        live.add_pairs([new_pair(rng, "during")])
        live.classify(random_unit(rng, 1, 48), cached, k=K, p=P)
        done.set()

    worker = threading.Thread(target=edit_then_classify)
    worker.start()
    assert done.wait(5), "an edit or a classification waited for the snapshot"
    assert snap.is_alive()
    release.set()
    snap.join(10)
    worker.join(10)
    # The snapshot holds the edit logged before it started; the later one is still pending.
    assert live.pending_edits() == 1
    assert read_manifest(tmp_path / "index")["deltas"][0]["adds"] == 1


def test_snapshot_writes_what_changed_not_the_collection(tmp_path):
    write_synthetic_index(tmp_path / "index", n=2000)
    folder = tmp_path / "index"
    live = open_live(folder, compact_ratio=0.5)

    def base_files() -> dict[str, tuple[int, int]]:
        return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.glob("[it]*-g000001*")}

    base = base_files()
    rng = np.random.default_rng(2)
    live.add_pairs([new_pair(rng, f"n{i}") for i in range(3)])
    live.delete_pairs([5, 6])
    info = live.snapshot()
    assert info.edits == 5 and info.generation == 1 and not info.compacted
    assert base_files() == base and len(base) == 2
    (delta,) = read_manifest(folder)["deltas"]
    assert (delta["adds"], delta["deletes"]) == (3, 2)
    size = (folder / delta["file"]).stat().st_size
    assert size < 3 * (48 + 64) * 4 + 2 * 8 + 2048  # the three added pairs' vectors and two ids, plus headers
    assert live.snapshot().edits == 0 and len(read_manifest(folder)["deltas"]) == 1  # nothing new: nothing written
    reopened = open_live(folder)
    assert reopened.replayed == 0 and reopened.model.n_pairs == 2001
    assert sorted(reopened.model.image_store.ids().tolist()) == sorted(live.model.image_store.ids().tolist())


def test_live_edits_snapshots_and_compaction_on_compact_sq8_reranking(tmp_path):
    """An IVF-PQ index folder whose re-ranking tables hold 8-bit codes: live adds and deletes, a delta snapshot,
    a compaction into a new base and a reopen all keep the same pairs and the same answers."""
    folder = tmp_path / "index"
    img, _ = write_synthetic_index(folder, n=3000, k=50, index_type="ivfpq", refine="SQ8")
    live = open_live(folder, compact_ratio=0.002)
    assert live.model.image_store.spec.refine == "SQ8" and not live.model.image_store.exact_vectors
    rng = np.random.default_rng(5)
    lab = labels(6)
    emb = random_unit(rng, 6, 64)
    live.put_label_set("s", lab, emb)
    added = live.add_pairs([new_pair(rng, f"n{i}") for i in range(4)])
    live.delete_pairs([3, 4, added[0]])
    queries = np.concatenate([img[:5], random_unit(rng, 3, 48)])
    before = [p.scores for p in live.classify(queries, live.label_set("s"), 50, 8.0).predictions]
    ids_before = sorted(live.model.image_store.ids().tolist())
    assert live.snapshot().generation == 1  # a delta: 4 adds and 3 deletes
    reopened = open_live(folder)
    assert sorted(reopened.model.image_store.ids().tolist()) == ids_before
    after = [p.scores for p in reopened.classify(queries, reopened.label_set("s"), 50, 8.0).predictions]
    # Equal up to rounding: the live scorer sums its base and patches, the reopened one a fresh base.
    for a, b in zip(after, before, strict=True):
        assert dict(a).keys() == dict(b).keys()
        np.testing.assert_allclose([dict(a)[c] for c in dict(b)], [s for _, s in b], rtol=1e-5, atol=1e-9)
    reopened.add_pairs([new_pair(rng, "late")])
    info = reopened.compact()
    assert info.compacted and read_manifest(folder)["deltas"] == []
    again = open_live(folder)
    assert again.model.image_store.spec.refine == "SQ8" and again.model.n_pairs == 3000 + 4 - 3 + 1
    np.testing.assert_allclose(
        [[s for _, s in p.scores] for p in again.classify(queries, again.label_set("s"), 50, 8.0).predictions],
        [[s for _, s in p.scores] for p in reopened.classify(queries, reopened.label_set("s"), 50, 8.0).predictions],
        atol=1e-6,
    )


def test_a_rejected_edit_is_never_logged_nor_replayed(tmp_path):
    write_synthetic_index(tmp_path / "index", n=50)
    live = open_live(tmp_path / "index")
    rng = np.random.default_rng(3)
    good = new_pair(rng, "good")
    bad_nan = NewPair("nan", ["nan"], None, np.full(48, np.nan, np.float32), random_unit(rng, 1, 64)[0])
    bad_dim = NewPair("dim", ["dim"], None, random_unit(rng, 1, 32)[0], random_unit(rng, 1, 64)[0])
    for bad in (bad_nan, bad_dim):
        with pytest.raises(StoreError):
            live.add_pairs([good, bad])
    assert live.pending_edits() == 0 and live.model.n_pairs == 50 and live.metadata.count() == 50
    assert live.add_pairs([good]) == [50]  # no id was spent on the rejected ones
    assert open_live(tmp_path / "index").model.n_pairs == 51


def test_a_label_state_rebuilt_after_edits_never_answers_from_a_stale_memo(tmp_path):
    """Issue point 3: make labels, classify, delete the labels' nearest caption anchors, classify again."""
    img, txt = write_synthetic_index(tmp_path / "index", n=300, k=K)
    live = open_live(tmp_path / "index")
    model = live.model
    rng = np.random.default_rng(4)
    emb = random_unit(rng, 6, 64)
    detached = model.make_labels(labels(6), emb)  # not registered: catches up when used
    q = random_unit(rng, 4, 48)
    first = model.classify(q, detached, k=K, p=P, top=6)
    keep = np.ones(300, dtype=bool)
    np.testing.assert_allclose(
        [[dict(pr.scores)[c] for c in labels(6).classes] for pr in first],
        reference.scores(q, emb, img, txt, K, P),
        atol=2e-5,
    )
    nearest = np.argsort(-(emb @ txt.T), axis=1)[:, :5].ravel()
    model.remove_pairs(nearest)
    keep[nearest] = False
    for k in (K, 10, K):  # the default, another k, and back (each must follow the deletes)
        again = model.classify(q, detached, k=k, p=P, top=6)
        np.testing.assert_allclose(
            [[dict(pr.scores)[c] for c in labels(6).classes] for pr in again],
            reference.scores(q, emb, img[keep], txt[keep], k, P),
            atol=2e-5,
        )


def test_edits_that_cancel_out_write_no_delta_file(tmp_path):
    write_synthetic_index(tmp_path / "index", n=40)
    live = open_live(tmp_path / "index")
    (added,) = live.add_pairs([new_pair(np.random.default_rng(6), "gone again")])
    live.delete_pairs([added])
    info = live.snapshot()
    manifest = read_manifest(tmp_path / "index")
    assert info.edits == 2 and manifest["deltas"] == [] and manifest["applied_seq"] == live.version == 2
    assert not list((tmp_path / "index").glob("delta-*")) and live.pending_edits() == 0
    assert open_live(tmp_path / "index").model.n_pairs == 40


def test_stored_label_sets_are_current_when_an_edit_answers(tmp_path):
    img, txt = write_synthetic_index(tmp_path / "index", n=200, k=K)
    live = open_live(tmp_path / "index")
    history = History(live, img, txt)
    rng = np.random.default_rng(8)
    emb = random_unit(rng, 10, 64)
    cached = live.put_label_set("s", labels(10), emb)
    for step in range(6):
        live.add_pairs([new_pair(rng, f"a{step}")])
        # The edit paid for its label upkeep before it answered: the set and its scorers are current.
        assert cached.synced == live.model.version and cached.shared and not cached.pending.any()
        live.delete_pairs([int(cached.neighbours.ids[step, 0])])
        assert cached.synced == live.model.version and not cached.pending.any()
    # A classification now searches no caption anchor and patches nothing.
    searches = []
    real_search = live.model.text_store.search
    live.model.text_store.search = lambda *a: searches.append(1) or real_search(*a)
    q = random_unit(rng, 3, 48)
    ans = live.classify(q, cached, k=K, p=P, top=10)
    assert searches == [] and not cached.pending.any()
    got = np.array([[dict(pr.scores)[c] for c in cached.classes] for pr in ans.predictions])
    np.testing.assert_allclose(got, history.reference_scores(ans.version, q, emb, K), atol=2e-5)


def test_a_thumbnail_goes_with_the_last_pair_that_shows_its_image(tmp_path):
    from asif.state.metadata import PairMetadata

    meta = PairMetadata(tmp_path / "m.sqlite")
    vec = np.zeros(4, np.float32)
    ids = meta.log_add([NewPair("same.jpg", [c], b"jpeg", vec, vec) for c in ("one", "two")])
    (other,) = meta.log_add([NewPair("other.jpg", ["three"], b"jpeg2", vec, vec)])
    meta.log_delete([ids[0]])
    assert meta.thumbnail("same.jpg") == b"jpeg"  # the other caption's pair still shows it
    meta.log_delete([ids[1]])
    assert meta.thumbnail("same.jpg") is None and meta.thumbnail("other.jpg") == b"jpeg2"
    meta.revert_add([other])
    assert meta.thumbnail("other.jpg") is None and meta.count() == 0


class HeldReads:
    """Wraps a live model's read lock: records what runs while it is held (searches' entries, scorers built)."""

    def __init__(self, live: LiveModel, monkeypatch) -> None:
        import asif.serving.label_upkeep
        import asif.serving.labels

        self.held = 0
        self.searches: list[tuple[int, bool]] = []  # (queries x depth, under the read lock)
        self.scorers: list[bool] = []  # a LabelScorer made under the read lock?
        real_read, real_search = live.lock.read, live.model.text_store.search

        @contextmanager
        def read():
            with real_read():
                self.held += 1
                try:
                    yield
                finally:
                    self.held -= 1

        def search(queries, k):
            self.searches.append((len(queries) * int(k), self.held > 0))
            return real_search(queries, k)

        real_scorer = asif.serving.label_upkeep.LabelScorer

        def scorer(*args, **kw):
            self.scorers.append(self.held > 0)
            return real_scorer(*args, **kw)

        live.lock.read = read
        live.model.guard = read
        live.model.text_store.search = search
        monkeypatch.setattr(asif.serving.label_upkeep, "LabelScorer", scorer)
        monkeypatch.setattr(asif.serving.labels, "LabelScorer", scorer)


def test_a_deep_k_is_searched_in_bounded_steps_and_scorers_are_built_outside_the_read_lock(tmp_path, monkeypatch):
    img, txt = write_synthetic_index(tmp_path / "index", n=3000, k=K, p=P)
    live = open_live(tmp_path / "index")
    history = History(live, img, txt)
    watch = HeldReads(live, monkeypatch)
    rng = np.random.default_rng(3)
    emb = random_unit(rng, 300, 64)
    cached = live.add_inline(labels(300), emb)
    deep = 2_500  # 300 labels x 2,500: 750,000 entries, each step searches ~256 labels' worth at the default depth
    for step in range(3):
        q = random_unit(rng, 2, 48)
        ans = live.classify(q, cached, k=deep, p=P, top=300)
        got = np.array([[dict(pr.scores)[c] for c in cached.classes] for pr in ans.predictions])
        np.testing.assert_allclose(got, history.reference_scores(ans.version, q, emb, deep), atol=2e-5)
        live.add_pairs([new_pair(rng, f"n{step}")])  # the next one catches up (rows changed since the copy)
    step_entries = asif.serving.model.LABEL_CHUNK * asif.serving.neighbours.cache_depth(K)
    under_lock = [n for n, held in watch.searches if held]
    assert under_lock and max(under_lock) <= step_entries + asif.serving.neighbours.cache_depth(deep)
    assert watch.scorers and not any(watch.scorers)  # every scorer (default, deep) built with the lock free
    assert sum(n for n, _ in watch.searches) >= 300 * deep  # the deep search did happen, in steps


def test_the_inline_cache_is_counted_after_every_use(tmp_path):
    write_synthetic_index(tmp_path / "index", n=1000, k=K, p=P)
    cap = 4 << 20
    live = open_live(tmp_path / "index", inline_cache_bytes=cap)
    rng = np.random.default_rng(4)
    small = live.add_inline(labels(20, "small"), random_unit(rng, 20, 64))
    big = live.add_inline(labels(500), random_unit(rng, 500, 64))
    count, used = live.inline_cache_usage()
    assert count == 2 and used <= cap
    # As the route does: look the list up (most recently used now), then classify.
    live.classify(random_unit(rng, 1, 48), live.cached_inline(labels(20, "small")), k=K, p=P)
    live.classify(random_unit(rng, 1, 48), live.cached_inline(labels(500)), k=900, p=P)  # big grows: a k=900 scorer
    assert big.nbytes() > cap  # over the cap on its own now
    count, used = live.inline_cache_usage()
    assert used <= cap and count == 1  # big is dropped from the cache (this request still had it); small stays
    assert live.cached_inline(labels(20, "small")) is small and live.cached_inline(labels(500)) is None
