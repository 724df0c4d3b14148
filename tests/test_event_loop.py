"""No request runs a lock, a SQLite read or a Milvus query on the event loop: health answers while the model is busy."""

from __future__ import annotations

import threading
import time

import pytest

from tests.conftest import build_colours, make_client
from tests.test_api import COLOUR_LABELS, b64, jpeg

# Requests that need the model's read lock (or its metadata) to answer: with a slow reader holding the lock and an
# edit queued behind it, each waits for both. They must wait in worker threads, not on the event loop.
WAITING = [
    ("GET", "/v1/label-sets", None),
    ("GET", "/v1/label-sets/colours", None),
    ("GET", "/v1/pairs/1", None),
    ("GET", "/v1/pairs/1/thumbnail", None),
    ("GET", "/v1/info", None),
    ("GET", "/metrics", None),
    ("POST", "/v1/search", {"text": "a red square"}),
    ("POST", "/v1/classify", {"images": [b64(jpeg())], "label_set": "colours"}),
    ("POST", "/v1/classify", {"images": [b64(jpeg())], "labels": ["vermilion", "ochre"]}),  # inline: its cache
]


@pytest.mark.parametrize("store", ["faiss", "milvus"])
def test_health_answers_at_once_with_a_slow_reader_and_a_queued_edit(tmp_path, store):
    target, _ = build_colours(tmp_path, store)
    with make_client(target) as client:
        assert client.put("/v1/label-sets/colours", json=COLOUR_LABELS).status_code == 200
        live = client.app.state.asif.live
        pairs = client.get("/readyz").json()["pairs"]
        held, release = threading.Event(), threading.Event()

        def slow_reader() -> None:
            with live.lock.read():
                held.set()
                release.wait(10)

        reader = threading.Thread(target=slow_reader)
        reader.start()
        assert held.wait(5)
        edit = threading.Thread(target=live.delete_pairs, args=([0],))  # queued: waits for the reader
        edit.start()
        deadline = time.monotonic() + 5
        while live.lock._waiting_writers == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert live.lock._waiting_writers == 1
        answers: dict[str, int] = {}

        def send(method: str, path: str, body: dict | None) -> None:
            answers[f"{method} {path} {sorted(body or {})}"] = client.request(method, path, json=body).status_code

        waiting = [threading.Thread(target=send, args=req) for req in WAITING]
        for t in waiting:
            t.start()
        time.sleep(0.5)  # every request has reached its handler and waits there
        try:
            for path in ("/healthz", "/readyz"):
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    r = client.get(path)
                    times.append(time.perf_counter() - t0)
                    assert r.status_code == 200, r.text
                assert min(times) < 0.05 and sorted(times)[2] < 0.05, (path, times)
            # Those that need the read lock are still waiting for the reader and the edit (the setup holds).
            assert not [a for a in answers if "label-sets" in a or "classify" in a or "pairs" in a], answers
        finally:
            release.set()
            for t in (reader, edit, *waiting):
                t.join(30)
        assert len(answers) == len(WAITING) and set(answers.values()) == {200}, answers
        assert client.get("/readyz").json()["pairs"] == pairs - 1  # the edit went through
