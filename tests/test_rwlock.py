"""The phase-fair readers-writer lock that guards the live model."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

import pytest

from asif.serving.rwlock import RWLock

WAIT = 5.0  # generous bound for things that must happen
BLOCKED = 0.2  # how long something that must not happen is given to happen anyway


def start(target: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


def hold(lock_cm: Callable, entered: threading.Event, leave: threading.Event) -> threading.Thread:
    """A thread that takes the lock, says so, and keeps it until told to leave."""

    def run() -> None:
        with lock_cm():
            entered.set()
            leave.wait(WAIT)

    return start(run)


def wait_until(cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


def test_readers_share_the_lock():
    lock = RWLock()
    n = 4
    together = threading.Barrier(n, timeout=WAIT)  # broken unless all n readers are inside at once
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            with lock.read():
                together.wait()
        except BaseException as exc:
            errors.append(exc)

    threads = [start(reader) for _ in range(n)]
    for t in threads:
        t.join(WAIT)
    assert not errors and not any(t.is_alive() for t in threads)


def test_writer_excludes_readers_and_writers():
    lock = RWLock()
    w_in, w_leave = threading.Event(), threading.Event()
    writer = hold(lock.write, w_in, w_leave)
    assert w_in.wait(WAIT)
    w2_in, w2_leave = threading.Event(), threading.Event()
    writer2 = hold(lock.write, w2_in, w2_leave)
    r_in, r_leave = threading.Event(), threading.Event()
    reader = hold(lock.read, r_in, r_leave)
    assert not r_in.wait(BLOCKED) and not w2_in.is_set()
    w_leave.set()
    writer.join(WAIT)
    assert r_in.wait(WAIT) or w2_in.wait(WAIT)
    assert r_in.is_set() != w2_in.is_set()  # never both: the reader and the second writer take turns
    r_leave.set()
    w2_leave.set()
    for t in (reader, writer2):
        t.join(WAIT)
        assert not t.is_alive()


def test_readers_waiting_when_a_writer_finishes_go_before_the_next_writer():
    """Phase fairness: a stream of edits cannot hold a search off for more than one edit."""
    lock = RWLock()
    w_in, w_leave = threading.Event(), threading.Event()
    writer = hold(lock.write, w_in, w_leave)
    assert w_in.wait(WAIT)
    r_in, r_leave = threading.Event(), threading.Event()
    reader = hold(lock.read, r_in, r_leave)
    wait_until(lambda: lock._waiting_readers == 1)
    w2_in, w2_leave = threading.Event(), threading.Event()
    writer2 = hold(lock.write, w2_in, w2_leave)  # arrives after the reader, while the first writer holds
    wait_until(lambda: lock._waiting_writers == 1)
    w_leave.set()
    assert r_in.wait(WAIT)  # the reader that waited goes first ...
    assert not w2_in.wait(BLOCKED)  # ... and the next writer waits for it
    r_leave.set()
    assert w2_in.wait(WAIT)
    w2_leave.set()
    for t in (writer, reader, writer2):
        t.join(WAIT)
        assert not t.is_alive()


def test_readers_exclude_a_writer_until_all_leave():
    lock = RWLock()
    ins = [threading.Event() for _ in range(2)]
    leaves = [threading.Event() for _ in range(2)]
    readers = [hold(lock.read, i, lv) for i, lv in zip(ins, leaves, strict=True)]
    assert all(e.wait(WAIT) for e in ins)
    w_in, w_leave = threading.Event(), threading.Event()
    writer = hold(lock.write, w_in, w_leave)
    assert not w_in.wait(BLOCKED)
    leaves[0].set()
    readers[0].join(WAIT)
    assert not w_in.wait(BLOCKED)  # one reader is still inside
    leaves[1].set()
    assert w_in.wait(WAIT)
    w_leave.set()
    writer.join(WAIT)
    assert not writer.is_alive()


def test_waiting_writer_blocks_new_readers():
    lock = RWLock()
    r1_in, r1_leave = threading.Event(), threading.Event()
    r1 = hold(lock.read, r1_in, r1_leave)
    assert r1_in.wait(WAIT)
    w_in, w_leave = threading.Event(), threading.Event()
    writer = hold(lock.write, w_in, w_leave)
    wait_until(lambda: lock._waiting_writers == 1)  # the writer is queued behind r1
    r2_in, r2_leave = threading.Event(), threading.Event()
    r2 = hold(lock.read, r2_in, r2_leave)
    assert not r2_in.wait(BLOCKED)  # a new reader does not overtake the waiting writer
    r1_leave.set()
    assert w_in.wait(WAIT)  # the writer gets the lock once the current reader leaves
    assert not r2_in.is_set()
    w_leave.set()
    assert r2_in.wait(WAIT)
    r2_leave.set()
    for t in (r1, writer, r2):
        t.join(WAIT)
        assert not t.is_alive()


@pytest.mark.parametrize("mode", ["read", "write"])
def test_an_exception_inside_releases_the_lock(mode):
    lock = RWLock()
    with pytest.raises(ValueError), getattr(lock, mode)():
        raise ValueError("boom")
    done = threading.Event()

    def writer() -> None:
        with lock.write():
            done.set()

    start(writer)
    assert done.wait(WAIT)


def test_randomized_stress_keeps_invariants_and_finishes():
    lock = RWLock()
    state = {"readers": 0, "writers": 0, "max_readers": 0, "value": 0}
    guard = threading.Lock()  # protects the counters, not the tested section
    violations: list[str] = []
    go = threading.Barrier(12, timeout=WAIT)

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        go.wait()
        for _ in range(300):
            with lock.read():
                with guard:
                    state["readers"] += 1
                    state["max_readers"] = max(state["max_readers"], state["readers"])
                    if state["writers"]:
                        violations.append("reader inside with a writer")
                    seen = state["value"]
                time.sleep(rng.random() * 1e-4)  # let others run while inside
                if state["value"] != seen:
                    violations.append("value changed under a reader")
                with guard:
                    state["readers"] -= 1

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        go.wait()
        for _ in range(100):
            time.sleep(rng.random() * 5e-4)  # spread the writes over the readers' run
            with lock.write():
                with guard:
                    state["writers"] += 1
                    if state["writers"] > 1 or state["readers"]:
                        violations.append("writer not alone")
                state["value"] += 1
                time.sleep(rng.random() * 1e-4)
                with guard:
                    state["writers"] -= 1

    threads = [start(lambda s=s: reader(s)) for s in range(9)] + [start(lambda s=s: writer(100 + s)) for s in range(3)]
    deadline = time.monotonic() + 20
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "deadlock or starvation: threads still waiting"
    assert not violations, violations[:5]
    assert state["value"] == 300 and state["readers"] == state["writers"] == 0
    assert state["max_readers"] > 1  # readers really did overlap


def test_a_long_read_hold_is_logged_with_its_thread(caplog):
    from app.metrics import SLOW_READ_HOLD_S, Metrics

    metrics = Metrics()
    lock = RWLock()
    lock.on_read_hold = metrics.observe_read_hold
    with caplog.at_level(logging.WARNING, logger="asif.app"):
        with lock.read():
            pass  # quick: not logged
        with lock.read():
            time.sleep(SLOW_READ_HOLD_S + 0.02)
    slow = [r.getMessage() for r in caplog.records if "read lock held" in r.getMessage()]
    assert len(slow) == 1 and threading.current_thread().name in slow[0], slow
    assert b"asif_read_lock_hold_seconds_count 2.0" in metrics.render()
