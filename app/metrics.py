"""Prometheus metrics of one app instance (own registry, so several apps can live in one process)."""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("asif.app")

SLOW_READ_HOLD_S = 0.1  # read-lock holds longer than this are logged: every other request may wait behind them


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "asif_requests_total", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "asif_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.encoder_batch = Histogram(
            "asif_encoder_batch_size",
            "items per encoder call",
            ["encoder"],
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.read_hold = Histogram(
            "asif_read_lock_hold_seconds",
            "how long each reader (a classification, a step of making a label set, ...) held the model's read lock",
            registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
        )
        self.longest_read_hold = Gauge(
            "asif_read_lock_longest_hold_seconds",
            "the longest hold of the read lock since start",
            registry=self.registry,
        )
        self.pairs = Gauge("asif_pairs", "pairs in the model", registry=self.registry)
        self.pending_edits = Gauge("asif_pending_edits", "edits not yet in a snapshot", registry=self.registry)

    def observe_read_hold(self, held_s: float) -> None:
        """Called by the model's lock after each read hold, in the thread that held it."""
        self.read_hold.observe(held_s)
        if held_s > SLOW_READ_HOLD_S:
            log.warning("read lock held %.0f ms by thread %s", held_s * 1000, threading.current_thread().name)

    def render(self) -> bytes:
        return generate_latest(self.registry)
