"""Image decoding for `asif build`, in worker processes: JPEG decoding is CPU work that threads share badly.

This module imports only PIL and :mod:`asif.images`, so spawned workers start fast (no torch, no FAISS).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from asif.images import ImageError, open_image, thumbnail_jpeg

Decoded = tuple[Image.Image | None, bytes]  # (RGB image, thumbnail JPEG), or (None, b"") when unreadable
CHUNK = 16  # images per task sent to a worker


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: exit when the build process is gone (killed with SIGKILL, its pool never says stop)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def decode_many(sources: Sequence[bytes | Path], max_pixels: int) -> tuple[list[Decoded], float]:
    """Decode images; returns the results and the seconds spent (the decode stage's busy time)."""
    t0 = time.perf_counter()
    out: list[Decoded] = []
    for source in sources:
        try:
            img = open_image(source, max_pixels=max_pixels)
        except ImageError:
            out.append((None, b""))
            continue
        out.append((img, thumbnail_jpeg(img)))
    return out, time.perf_counter() - t0


class Decoder:
    """Decodes batches of images in ``workers`` spawned processes (0: in the calling thread).

    ``submit`` starts a batch and returns a function that waits for it, so the caller can read and decode the
    next batch while it encodes this one.
    """

    def __init__(self, workers: int, max_pixels: int) -> None:
        self.workers = max(0, workers)
        self.max_pixels = max_pixels
        self.busy_seconds = 0.0
        self._pool = (
            ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_exit_with_parent,
                initargs=(os.getpid(),),
            )
            if self.workers
            else None
        )

    def submit(self, sources: Sequence[bytes | Path]) -> Callable[[], list[Decoded]]:
        if self._pool is None:
            done = decode_many(sources, self.max_pixels)
            return lambda: self._collect([done])
        futures: list[Future] = [
            self._pool.submit(decode_many, sources[i : i + CHUNK], self.max_pixels)
            for i in range(0, len(sources), CHUNK)
        ]
        return lambda: self._collect([f.result() for f in futures])

    def _collect(self, parts: list[tuple[list[Decoded], float]]) -> list[Decoded]:
        out: list[Decoded] = []
        for decoded, seconds in parts:
            out.extend(decoded)
            self.busy_seconds += seconds
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
