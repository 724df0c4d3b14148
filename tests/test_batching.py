"""The encoder micro-batcher: errors reach callers, the worker survives or is restarted, long inputs go in chunks."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest

from app.batching import MicroBatcher, Overloaded
from tests.test_api import COLOUR_LABELS, b64, jpeg

# A worker killed on purpose lets its BaseException escape the thread; pytest reports that as a warning.
thread_death = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


class Killed(BaseException):
    """Not an Exception: ends the worker thread instead of failing one batch."""


def rows_of(items: Sequence[int]) -> np.ndarray:
    return np.array([[float(x)] for x in items], dtype=np.float32)


@pytest.fixture
def make_batcher() -> Iterator[Callable[..., MicroBatcher]]:
    made: list[MicroBatcher] = []

    def make(encode: Callable[[Sequence], np.ndarray], **kw) -> MicroBatcher:
        kw = {"max_batch": 8, "max_wait_s": 0.001, "timeout_s": 5.0, **kw}
        made.append(MicroBatcher(encode, **kw))
        return made[-1]

    yield make
    for b in made:
        b.close()


def test_encoder_error_reaches_caller_and_next_request_succeeds(make_batcher):
    def encode(items):
        if "bad" in items:
            raise ValueError("model failed on bad input")
        return rows_of([len(x) for x in items])

    batcher = make_batcher(encode)
    with pytest.raises(ValueError, match="model failed"):
        asyncio.run(batcher.encode(["bad"]))
    assert batcher.alive
    assert asyncio.run(batcher.encode(["ab", "abc"]))[:, 0].tolist() == [2, 3]
    assert batcher.alive and batcher.restarts == 0


def test_on_batch_hook_error_does_not_fail_requests_or_kill_worker(make_batcher):
    def hook(n: int) -> None:
        raise RuntimeError("metrics broke")

    batcher = make_batcher(rows_of, on_batch=hook)
    for _ in range(3):
        assert asyncio.run(batcher.encode([1, 2]))[:, 0].tolist() == [1, 2]
    assert batcher.alive and batcher.restarts == 0


@pytest.mark.parametrize("extra", [-1, 1])
def test_wrong_row_count_fails_every_caller_of_the_batch(make_batcher, extra):
    wrong = threading.Event()
    wrong.set()
    sizes: list[int] = []

    def encode(items):
        sizes.append(len(items))
        n = len(items) + extra if wrong.is_set() else len(items)
        return rows_of(range(n))

    # A long wait so that the three requests below share one encoder call.
    batcher = make_batcher(encode, max_wait_s=0.2, timeout_s=10.0)

    async def three() -> list:
        return await asyncio.gather(*(batcher.encode([i, i + 10]) for i in range(3)), return_exceptions=True)

    results = asyncio.run(three())
    assert sizes[0] > 2  # at least two requests were batched together
    for res in results:
        assert type(res) is RuntimeError, res  # a clear error, not a result, not a timeout (Overloaded)
        assert "encoder returned" in str(res) and "rows for" in str(res)
    assert f"returned {sizes[0] + extra} rows for {sizes[0]} inputs" in str(results[0])
    assert batcher.alive
    wrong.clear()
    assert asyncio.run(batcher.encode([5, 6, 7]))[:, 0].tolist() == [0, 1, 2]
    assert batcher.alive and batcher.restarts == 0


@thread_death
def test_dead_worker_is_restarted_by_the_next_submit(make_batcher):
    def encode(items):
        if "die" in items:
            raise Killed("simulated kill")
        return rows_of([len(x) for x in items])

    batcher = make_batcher(encode)
    first = batcher._thread
    with pytest.raises(Overloaded, match="worker died"):  # the dying worker fails its batch: no hang
        asyncio.run(batcher.encode(["die"]))
    first.join(timeout=5)
    assert not first.is_alive() and not batcher.alive
    assert asyncio.run(batcher.encode(["abcd"]))[:, 0].tolist() == [4]
    assert batcher.alive and batcher.restarts == 1


@thread_death
def test_items_queued_before_the_worker_died_are_served_after_restart(make_batcher):
    gate = threading.Event()

    def encode(items):
        gate.wait(5)
        if "die" in items:
            raise Killed("simulated kill")
        return rows_of([len(x) for x in items])

    batcher = make_batcher(encode, max_batch=1)
    dying = batcher.submit(["die"])[0]
    waiting = batcher.submit(["abc"])[0]  # queued behind the batch that kills the worker
    gate.set()
    assert isinstance(dying.exception(timeout=5), Overloaded)
    assert not batcher.alive and not waiting.done()
    assert batcher.ensure_alive() and batcher.restarts == 1
    assert waiting.result(timeout=5).tolist() == [3.0]


@thread_death
def test_failed_restart_answers_overloaded_and_closed_batcher_stays_down(make_batcher, monkeypatch):
    def encode(items):
        raise Killed("simulated kill")

    batcher = make_batcher(encode)
    with pytest.raises(Overloaded):
        asyncio.run(batcher.encode(["x"]))

    def cannot_start() -> threading.Thread:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(batcher, "_start_worker", cannot_start)
    assert not batcher.ensure_alive()
    with pytest.raises(Overloaded, match="worker is not running"):
        batcher.submit(["x"])
    monkeypatch.undo()
    batcher.close()
    assert not batcher.ensure_alive() and not batcher.alive
    with pytest.raises(Overloaded, match="shut down"):
        batcher.submit(["x"])


def test_long_input_is_chunked_under_the_queue_cap(make_batcher):
    sizes: list[int] = []
    queued: list[int] = []
    batcher: MicroBatcher

    def encode(items):
        sizes.append(len(items))
        queued.append(batcher._queue.qsize())
        return rows_of(items)

    batcher = make_batcher(encode, max_queue=100, max_batch=8)
    out = asyncio.run(batcher.encode(list(range(1000))))
    assert out.shape == (1000, 1) and out[:, 0].tolist() == list(range(1000))
    assert max(sizes) <= 8 and sum(sizes) == 1000
    assert max(queued) < 100  # one request never fills the queue by itself


def test_big_and_small_requests_run_concurrently(make_batcher):
    def encode(items):
        threading.Event().wait(0.001)  # a little model time per call
        return rows_of(items)

    batcher = make_batcher(encode, max_queue=100, max_batch=8)
    finished: list[str] = []

    async def run(name: str, items: list[int]) -> np.ndarray:
        out = await batcher.encode(items)
        finished.append(name)
        return out

    async def main() -> list[np.ndarray]:
        big = [run("big", list(range(2000)))]
        small = [run(f"small{i}", [10_000 + i, 20_000 + i]) for i in range(5)]
        return await asyncio.gather(*big, *small)

    results = asyncio.run(main())
    assert results[0][:, 0].tolist() == list(range(2000))
    for i, rows in enumerate(results[1:]):
        assert rows[:, 0].tolist() == [10_000 + i, 20_000 + i]
    assert finished[-1] == "big"  # the small requests did not wait for the whole big one


def test_full_queue_is_still_overloaded(make_batcher):
    started, release = threading.Event(), threading.Event()

    def encode(items):
        started.set()
        release.wait(5)
        return rows_of(items)

    batcher = make_batcher(encode, max_queue=4, max_batch=1)
    try:
        running = batcher.submit([0])
        assert started.wait(5)  # the worker holds item 0; the queue is empty
        queued = batcher.submit([1, 2, 3, 4])
        with pytest.raises(Overloaded, match="queue full"):
            batcher.submit([5])
        with pytest.raises(Overloaded, match="queue full"):
            asyncio.run(batcher.encode(list(range(50))))
    finally:
        release.set()
    assert [f.result(timeout=5)[0] for f in running + queued] == [0, 1, 2, 3, 4]


# -- over HTTP ------------------------------------------------------------------------------------


@thread_death
def test_readyz_restarts_a_dead_worker_or_answers_503(client, monkeypatch):
    texts: MicroBatcher = client.app.state.asif.texts

    def killer(items):
        raise Killed("simulated kill")

    monkeypatch.setattr(texts, "_encode", killer)
    assert isinstance(texts.submit(["x"])[0].exception(timeout=5), Overloaded)
    assert not texts.alive

    def cannot_start() -> threading.Thread:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(texts, "_start_worker", cannot_start)
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["detail"] == "text encoder worker is not running"
    r = client.post("/v1/classify", json={"images": [b64(jpeg())], **COLOUR_LABELS})
    assert r.status_code == 503 and "text encoder worker is not running" in r.json()["detail"]

    monkeypatch.undo()  # the real encoder and a working restart
    assert client.get("/readyz").json()["status"] == "ready"
    assert texts.alive and texts.restarts == 1
    r = client.post("/v1/classify", json={"images": [b64(jpeg())], **COLOUR_LABELS})
    assert r.status_code == 200 and r.json()["results"][0]["label"] == "red"
