"""Hostile load against a running server (issue 28): the request shapes that once took a server from 347 MB to
2.2 GB peak RSS, sent from several clients at once, while a well-behaved client keeps classifying.

Every hostile request gets its 4xx (or a 200, within the bounds), never a 5xx or a dropped connection; the
well-behaved client gets every answer, 200, within LATENCY_BOUND_S; and the server's peak RSS (VmHWM) stays within
RSS_BOUND_MB of its idle RSS. ASIF_HOSTILE_SECONDS sets how long the hostile clients run (default 15).
"""

from __future__ import annotations

import base64
import io
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import write_synthetic_index
from tests.servers import Server

DURATION_S = float(os.environ.get("ASIF_HOSTILE_SECONDS", "15"))
# Peak RSS over idle at the default bounds (docs/reliability.md), issue 28's bound. Measured: +400 MB over 45 s
# (one 40 Mpx decode at a time, 160 MB; two 64 MiB bodies in flight; one fresh label list built at a time beside the
# 64 MiB inline cache). Before the process-wide pixel, body and label-build budgets and the fixed mmap threshold it
# was +741 MB in 15 s and +1,091 MB in 45 s, and 2.2 GB before the per-request bounds.
RSS_BOUND_MB = 512
LATENCY_BOUND_S = 5.0  # every answer to the well-behaved client
HOSTILE_CLIENTS = 3
N_PAIRS = 300  # so that 10,000 labels at k=300 pass ASIF_MAX_LABEL_ENTRIES (2,000,000) and 6,000 do not
BOMB_SIDE = 6324  # 39,992,976 px: just under ASIF_MAX_PIXELS; a ~39 KB PNG that decodes to 120 MB of RGB


def proc_status_mb(pid: int, name: str) -> float:
    """A /proc/<pid>/status memory line (VmRSS, VmHWM) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image_bytes(side: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


@dataclass(frozen=True)
class Shape:
    """One hostile request and the statuses it may get."""

    name: str
    send: Callable[[httpx.Client], httpx.Response]
    allowed: frozenset[int]


def chunked_body(total: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """A body with no Content-Length (sent chunked) of `total` bytes."""
    block = b" " * chunk
    for _ in range(total // chunk + 1):
        yield block


def hostile_shapes() -> list[Shape]:
    bomb = b64(image_bytes(BOMB_SIDE, "PNG"))
    huge_labels = [f"class {i}" for i in range(10_000)]
    counter = itertools.count()

    def classify(body: dict[str, object]) -> Callable[[httpx.Client], httpx.Response]:
        return lambda http: http.post("/v1/classify", json=body)

    def fresh_labels(http: httpx.Client) -> httpx.Response:
        # 6,000 labels never seen before (no cache hit) at k=300: 42,000 prompts, 1.8M label entries, within bounds.
        n = next(counter)
        labels = [f"thing {n} {i}" for i in range(6_000)]
        return http.post("/v1/classify", json={"images": [b64(image_bytes(64, "JPEG"))], "labels": labels, "k": 10_000})

    def chunked(http: httpx.Client) -> httpx.Response:
        body = chunked_body(65 << 20)  # past ASIF_MAX_REQUEST_BYTES (64 MiB), without a Content-Length
        return http.post("/v1/classify", content=body, headers={"content-type": "application/json"})

    bombs = {"images": [bomb] * 4, "labels": ["red", "blue"], "augment": ["flip", "crop"]}
    many = {"images": [bomb] * 64, "labels": ["red", "blue"]}
    templates = {"images": [bomb], "labels": huge_labels, "templates": ["{}"] * 2_000}
    prompts = {"images": [bomb], "labels": huge_labels, "templates": ["{} "] * 100}
    entries = {"images": [bomb], "labels": huge_labels, "k": 10_000}
    return [
        # 4 x 40 Mpx with flip and crop: 160 Mpx, under ASIF_MAX_REQUEST_PIXELS; decoded shrunk, two at a time.
        Shape("four bombs, flip+crop", classify(bombs), frozenset({200})),
        Shape("64 bombs", classify(many), frozenset({413})),
        Shape("chunked 65 MiB", chunked, frozenset({413})),
        Shape("10,000 labels x 2,000 templates", classify(templates), frozenset({422})),
        Shape("10,000 labels x 100 templates", classify(prompts), frozenset({422})),
        Shape("10,000 labels at k=300", classify(entries), frozenset({422})),
        Shape("6,000 fresh labels at k=300", fresh_labels, frozenset({200})),
    ]


@dataclass
class Tally:
    """What the clients saw: per shape, the statuses; and every failure."""

    statuses: dict[str, dict[int, int]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    good_latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, name: str, status: int) -> None:
        with self.lock:
            counts = self.statuses.setdefault(name, {})
            counts[status] = counts.get(status, 0) + 1

    def fail(self, message: str) -> None:
        with self.lock:
            self.failures.append(message)


def hostile_client(url: str, shapes: list[Shape], start: int, stop: threading.Event, tally: Tally) -> None:
    with httpx.Client(base_url=url, timeout=120) as http:
        for i in itertools.count(start):
            if stop.is_set():
                return
            shape = shapes[i % len(shapes)]
            try:
                r = shape.send(http)
            except httpx.TransportError as exc:  # a dropped connection or a timeout
                tally.fail(f"{shape.name}: {type(exc).__name__}: {exc}")
                continue
            tally.record(shape.name, r.status_code)
            if r.status_code not in shape.allowed:
                tally.fail(f"{shape.name}: HTTP {r.status_code}: {r.text[:300]}")


def good_client(url: str, stop: threading.Event, tally: Tally) -> None:
    body = {"images": [b64(image_bytes(64, "JPEG"))], "labels": ["red", "blue", "green"]}
    with httpx.Client(base_url=url, timeout=60) as http:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = http.post("/v1/classify", json=body)
            except httpx.TransportError as exc:
                tally.fail(f"well-behaved: {type(exc).__name__}: {exc}")
                continue
            latency = time.perf_counter() - t0
            with tally.lock:
                tally.good_latencies.append(latency)
            if r.status_code != 200:
                tally.fail(f"well-behaved: HTTP {r.status_code}: {r.text[:300]}")
            time.sleep(0.05)


def run_hostile_load(index: Path, env: dict[str, str] | None = None) -> tuple[Tally, float, float]:
    """Serve `index`, send the hostile shapes for DURATION_S; returns the tally, idle RSS and peak RSS (MB)."""
    shapes = hostile_shapes()
    server = Server(index, env)
    try:
        url = f"http://127.0.0.1:{server.port}"
        tally = Tally()
        warm = server.http.post("/v1/classify", json={"images": [b64(image_bytes(64, "JPEG"))], "labels": ["red"]})
        assert warm.status_code == 200, warm.text
        idle = proc_status_mb(server.proc.pid, "VmRSS")
        stop = threading.Event()
        threads = [threading.Thread(target=good_client, args=(url, stop, tally))]
        threads += [
            threading.Thread(target=hostile_client, args=(url, shapes, 2 * i, stop, tally))
            for i in range(HOSTILE_CLIENTS)
        ]
        for t in threads:
            t.start()
        time.sleep(DURATION_S)
        stop.set()
        for t in threads:
            t.join(timeout=180)
        assert not any(t.is_alive() for t in threads), "a client is stuck"
        assert server.http.get("/readyz").status_code == 200
        peak = proc_status_mb(server.proc.pid, "VmHWM")
    finally:
        _, out = server.stop()
    assert " 500 " not in out and "Traceback" not in out, out[-3000:]
    return tally, idle, peak


@pytest.mark.slow
def test_hostile_load_keeps_memory_bounded_and_other_clients_served(tmp_path):
    index = tmp_path / "index"
    write_synthetic_index(index, n=N_PAIRS)
    tally, idle, peak = run_hostile_load(index)
    lat = sorted(tally.good_latencies)
    print(
        f"hostile load {DURATION_S:g} s: idle RSS {idle:.1f} MB, peak {peak:.1f} MB (+{peak - idle:.1f} MB); "
        f"well-behaved: {len(lat)} answers, p50 {lat[len(lat) // 2]:.3f} s, max {lat[-1]:.3f} s; "
        f"hostile: {tally.statuses}"
    )
    assert not tally.failures, tally.failures[:10]
    for shape in hostile_shapes():
        assert tally.statuses.get(shape.name), f"{shape.name} was never sent"
    assert len(lat) >= 10 and lat[-1] < LATENCY_BOUND_S, lat[-5:]
    assert peak - idle < RSS_BOUND_MB, f"peak RSS {peak:.0f} MB is {peak - idle:.0f} MB over idle {idle:.0f} MB"
