"""Image decoding for `asif build`, in worker processes: JPEG decoding is CPU work that threads share badly.

A worker decodes each image, makes its thumbnail and, given the image encoder's ``preparer()`` (resize and crop to
the uint8 array its network takes), prepares it too: the build process then only runs the network on what comes
back, and a (224, 224, 3) array pickles cheaper than a decoded photo. Without a preparer (an encoder that does not
split its steps) the decoded RGB image comes back and the build process encodes it whole.

This module imports only PIL, numpy and :mod:`asif.encoders.images` (a preparer, :mod:`asif.encoders.prepare`, no
more), so spawned workers start fast (no torch, no FAISS).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from asif.encoders.images import ImageError, open_image, thumbnail_jpeg

# (the prepared image, or the RGB image without a preparer; thumbnail JPEG), or (None, b"") when unreadable
Decoded = tuple[Image.Image | Any | None, bytes]
Preparer = Callable[[Image.Image], Any]
CHUNK = 16  # images per task sent to a worker


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: exit when the build process is gone (killed with SIGKILL, its pool never says stop)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def decode_many(
    sources: Sequence[bytes | Path], max_pixels: int, prepare: Preparer | None = None
) -> tuple[list[Decoded], float]:
    """Decode (and prepare) images; returns the results and the seconds spent (the decode stage's busy time)."""
    t0 = time.perf_counter()
    out: list[Decoded] = []
    for source in sources:
        try:
            img = open_image(source, max_pixels=max_pixels)
        except ImageError:
            out.append((None, b""))
            continue
        thumb = thumbnail_jpeg(img)
        out.append((img if prepare is None else prepare(img), thumb))
    return out, time.perf_counter() - t0


class Decoder:
    """Decodes batches of images in ``workers`` spawned processes (0: in the calling thread), and prepares them with
    ``prepare`` (a picklable image encoder's ``preparer()``) when given.

    ``submit`` starts a batch and returns a function that waits for it, so the caller can read and decode the
    next batch while it encodes this one.
    """

    def __init__(self, workers: int, max_pixels: int, prepare: Preparer | None = None) -> None:
        self.workers = max(0, workers)
        self.max_pixels = max_pixels
        self.prepare = prepare
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
            done = decode_many(sources, self.max_pixels, self.prepare)
            return lambda: self._collect([done])
        futures: list[Future] = [
            self._pool.submit(decode_many, sources[i : i + CHUNK], self.max_pixels, self.prepare)
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
