"""Process-wide memory settings `asif serve` applies: large freed blocks leave the process; objects loaded at start
are kept out of the cyclic collector's full passes (which held the GIL for 150-320 ms with a 1M-pair index)."""

from __future__ import annotations

import gc
import sys

import numpy as np
import pytest

from app.memory import freeze_loaded_objects, release_large_frees


def test_loaded_objects_are_frozen_out_of_full_collections():
    loaded = [{"i": i, "row": [i, (i,)]} for i in range(20_000)]  # containers a loaded model holds
    try:
        freeze_loaded_objects()
        assert gc.get_freeze_count() >= 20_000
        assert not gc.get_objects(generation=2)  # a full pass now walks only what comes after
        later = [[i] for i in range(10)]
        assert len(gc.get_objects(generation=2)) < 1000 and later
    finally:
        gc.unfreeze()  # this is a test process: its objects must go on being collected
    assert loaded


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_blocks_are_given_back_when_freed():
    def rss_mb() -> float:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmRSS:"))

    assert release_large_frees()
    before = rss_mb()
    blocks = [np.ones(4 << 20, dtype=np.uint8) for _ in range(64)]  # 256 MB in 4 MiB blocks
    assert rss_mb() > before + 200
    del blocks
    assert rss_mb() < before + 50  # unmapped on free, not kept in the heap
