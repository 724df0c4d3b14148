"""The service's one middleware, as plain ASGI (Starlette's ``BaseHTTPMiddleware`` costs every request a task group
and a body stream): refuse bodies over the limit, by their Content-Length and by the bytes received (a chunked body
has no length), refuse more once the bodies held by every request in flight pass their own limit (503), and count
and time every request."""

from __future__ import annotations

import json
import time
from typing import Any

from app.core.config import Settings
from app.core.errors import ApiError
from app.metrics import Metrics

Scope = dict[str, Any]


class LimitsAndMetrics:
    def __init__(self, app: Any, settings: Settings, metrics: Metrics) -> None:
        self.app = app
        self.max_bytes = settings.max_request_bytes
        self.max_in_flight = settings.max_body_bytes_in_flight
        self.in_flight = 0  # body bytes received by requests not finished yet (the event loop's: no lock needed)
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await _refuse(send, 413, f"request body larger than the limit of {self.max_bytes} bytes")
            return
        start = time.perf_counter()
        status = 500  # what the client gets when the app raises before answering
        received = 0

        async def counted_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                received += size
                self.in_flight += size
                if received > self.max_bytes:  # the route answers 413 (the ApiError handler)
                    raise ApiError(413, f"request body larger than the limit of {self.max_bytes} bytes")
                if self.in_flight > self.max_in_flight:
                    raise ApiError(
                        503,
                        f"busy: requests in flight hold {self.in_flight:,} body bytes, over the limit of "
                        f"{self.max_in_flight:,}; retry",
                        {"Retry-After": "1"},
                    )
            return message

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, counted_receive, send_status)
        finally:
            self.in_flight -= received
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], path, str(status)).inc()
            self.metrics.latency.labels(scope["method"], path).observe(time.perf_counter() - start)


async def _refuse(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
