"""Live model: durable edits (edit log replay), snapshots, concurrency; and the encoder micro-batcher."""

import asyncio
import threading
import time

import numpy as np

from app.batching import MicroBatcher
from asif.serving.labels import LabelSet
from asif.state.metadata import NewPair
from asif.state.persist import read_manifest
from tests.conftest import COLOURS, open_live


def new_pair(live, rgb, caption):
    from PIL import Image

    img = Image.new("RGB", (16, 16), rgb)
    return NewPair(
        f"{caption}.jpg", [caption], None, live.image_encoder.encode([img])[0], live.text_encoder.encode([caption])[0]
    )


def state_of(live):
    m = live.model
    return sorted(m.image_store.ids().tolist()), sorted(m.text_store.ids().tolist()), sorted(live.metadata.ids())


def test_unsnapshotted_edits_are_replayed_after_a_crash(built_index):
    index, _ = built_index
    live = open_live(index)
    labels = LabelSet(tuple(COLOURS), ("a {} square",))
    live.put_label_set("colours", labels, live.model.embed_labels(labels))
    ids = live.add_pairs([new_pair(live, (150, 20, 160), "a purple square"), new_pair(live, (0, 0, 0), "black")])
    assert live.delete_pairs([3, ids[1], 12345]) == [3, ids[1]]
    before = state_of(live)
    live.wait_idle()  # registered label sets follow edits in the background
    cache_before = live.model.label_sets["colours"].neighbours.topk(10)[1].copy()
    # No snapshot, no close: as if the process had been killed here.
    again = open_live(index)
    assert again.replayed == 4 and state_of(again) == before
    assert read_manifest(index)["generation"] == 1
    np.testing.assert_array_equal(again.model.label_sets["colours"].neighbours.topk(10)[1], cache_before)
    info = again.snapshot()  # 4 edits: a delta file, no new base
    assert info.generation == 1 and info.edits == 4 and not info.compacted
    assert again.pending_edits() == 0 and info.pairs == len(before[0])
    third = open_live(index)
    assert third.replayed == 0 and state_of(third) == before
    assert third.compact().generation == 2 and read_manifest(index)["deltas"] == []
    assert state_of(open_live(index)) == before
    # New ids keep counting after compaction of the log.
    assert third.add_pairs([new_pair(third, (1, 2, 3), "new")]) == [ids[1] + 1]


def test_concurrent_classify_and_edits_lose_nothing(served_index):
    live = open_live(served_index[0])
    labels = LabelSet(tuple(COLOURS), ("a {} square",))
    cached = live.put_label_set("colours", labels, live.model.embed_labels(labels))
    query = live.image_encoder.encode([__import__("PIL.Image").Image.new("RGB", (8, 8), (220, 30, 30))])
    errors, added, deleted = [], [], []
    stop = threading.Event()

    def reader():
        try:
            while not stop.is_set():
                with live.reading():
                    pred = live.model.classify(query, cached, k=10, explain=50)[0]
                    present = live.model.image_store.contains(np.array([a.pair_id for a in pred.explanation]))
                    assert present.all()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def writer(seed):
        rng = np.random.default_rng(seed)
        for j in range(30):
            rgb = tuple(int(v) for v in rng.integers(0, 255, 3))
            added.extend(live.add_pairs([new_pair(live, rgb, f"w{seed} {j}")]))
            if j % 3 == 0:
                deleted.extend(live.delete_pairs([added[-1]]))

    readers = [threading.Thread(target=reader) for _ in range(3)]
    writers = [threading.Thread(target=writer, args=(s,)) for s in range(2)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors
    assert len(set(added)) == 60
    img_ids, txt_ids, meta_ids = state_of(live)
    expected = sorted(set(range(20)) | set(added) - set(deleted))
    assert img_ids == txt_ids == meta_ids == expected
    fresh = live.model.make_labels(labels, cached.embeddings)
    # The hashed test captions tie a lot: compare the top-k similarities, which ties do not change.
    np.testing.assert_allclose(cached.neighbours.topk(10)[0], fresh.neighbours.topk(10)[0], atol=1e-6)
    assert set(cached.neighbours.topk(10)[1].ravel()) <= set(expected)


def test_micro_batcher_merges_concurrent_requests():
    sizes = []

    def encode(items):
        time.sleep(0.05)
        return np.array([[float(x)] for x in items])

    batcher = MicroBatcher(encode, max_batch=64, max_wait_s=0.02, on_batch=sizes.append)

    async def main():
        return await asyncio.gather(*(batcher.encode([i, i + 100]) for i in range(10)))

    results = asyncio.run(main())
    batcher.close()
    for i, rows in enumerate(results):
        assert rows[:, 0].tolist() == [i, i + 100]
    assert sum(sizes) == 20 and len(sizes) < 10  # fewer encoder calls than requests


def test_micro_batcher_reports_encoder_errors():
    def encode(items):
        raise RuntimeError("model failed")

    batcher = MicroBatcher(encode, max_batch=4, max_wait_s=0.001)

    async def main():
        return await batcher.encode(["a"])

    try:
        asyncio.run(main())
        raise AssertionError("expected the error")
    except RuntimeError as exc:
        assert "model failed" in str(exc)
    finally:
        batcher.close()
