"""The end-to-end bench's HTTP client (``bench/e2e.py``): multipart bodies of raw JPEG bytes, the requests it sends,
one keep-alive connection (``Client``) that records every status (``Outcomes``), and the two load generators:
sequential requests and N concurrent clients over a fixed window."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.measure import percentiles

BOUNDARY = "asif-e2e-5f1c"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
JSON_TYPE = "application/json"
Request = tuple[str, str, bytes | None, str | None]  # method, path, body, content type


# -- requests ------------------------------------------------------------------------------------------------
def multipart(images: Sequence[bytes], fields: dict[str, str]) -> bytes:
    """A multipart/form-data body: ``images`` file parts (the raw JPEG bytes) and text fields."""
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="{i}.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + blob
        + b"\r\n"
        for i, blob in enumerate(images)
    ]
    parts += [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ]
    return b"".join([*parts, f"--{BOUNDARY}--\r\n".encode()])


def classify(images: Sequence[bytes], fields: dict[str, str]) -> Request:
    return ("POST", "/v1/classify", multipart(images, fields), MULTIPART)


def search(text: str) -> Request:
    return ("POST", "/v1/search", json.dumps({"text": text, "top": 12}).encode(), JSON_TYPE)


@dataclass
class Outcomes:
    """Status codes of every timed request, and the first few error bodies."""

    codes: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, status: int, body: bytes, path: str) -> None:
        with self.lock:
            self.codes[status] += 1
            if status != 200 and len(self.errors) < 5:
                self.errors.append(f"{status} {path}: {body[:300].decode(errors='replace')}")


class Client:
    """One keep-alive HTTP/1.1 connection to the server."""

    def __init__(self, port: int, outcomes: Outcomes) -> None:
        self.port, self.outcomes = port, outcomes
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def send(self, req: Request) -> tuple[int, bytes]:
        method, path, body, ctype = req
        headers = {"Content-Type": ctype} if ctype else {}
        try:
            self.conn.request(method, path, body=body, headers=headers)
            resp = self.conn.getresponse()
        except (ConnectionError, http.client.HTTPException):  # a dropped keep-alive connection: one retry
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
            self.conn.request(method, path, body=body, headers=headers)
            resp = self.conn.getresponse()
        return resp.status, resp.read()

    def timed(self, req: Request) -> tuple[float, float]:
        """(start, end) of one request, its outcome recorded."""
        start = time.perf_counter()
        status, body = self.send(req)
        end = time.perf_counter()
        self.outcomes.record(status, body, req[1])
        return start, end

    def close(self) -> None:
        self.conn.close()


# -- load ----------------------------------------------------------------------------------------------------
def sequential(client: Client, requests: Sequence[Request]) -> list[float]:
    """Latencies (s) of requests sent one after another."""
    return [end - start for start, end in map(client.timed, requests)]


def concurrent(
    port: int, outcomes: Outcomes, requests: Sequence[Request], clients: int, warmup_s: float, window_s: float
) -> dict[str, Any]:
    """``clients`` threads send requests back to back; completions inside the window after the warm-up count."""
    spans: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    lo, hi = t0 + warmup_s, t0 + warmup_s + window_s

    def worker(offset: int) -> None:
        client, mine, i = Client(port, outcomes), [], offset
        while time.perf_counter() < hi:
            mine.append(client.timed(requests[i % len(requests)]))
            i += clients
        client.close()
        spans.extend(mine)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [(s, e) for s, e in spans if lo <= e < hi]
    return {
        "clients": clients,
        "window_s": window_s,
        "requests_total": len(spans),
        "requests_in_window": len(done),
        "images_per_s": len(done) / window_s,
        "latency": percentiles([e - s for s, e in done if s >= lo]),
    }
