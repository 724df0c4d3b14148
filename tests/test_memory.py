"""Process-wide memory settings `asif serve` applies: large freed blocks leave the process; objects loaded at start
are kept out of the cyclic collector's full passes (which held the GIL for 150-320 ms with a 1M-pair index)."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import pytest

from app.memory import freeze_loaded_objects, numpy_huge_pages, release_large_frees
from tests.conftest import make_client


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


def _anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping holding ``address`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    return 0


THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(
    not THP_MODE.is_file() or "[madvise]" not in THP_MODE.read_text(),
    reason="numpy's advice only matters where the kernel gives huge pages on request (enabled=madvise)",
)
def test_numpy_asks_for_no_huge_pages_once_switched_off():
    old = numpy_huge_pages(False)
    try:
        block = np.ones(64 << 20, dtype=np.uint8)  # touched: faulted in now
        assert _anon_huge_kb(block.ctypes.data + (32 << 20)) == 0  # past the first page, which numpy does not advise
    finally:
        numpy_huge_pages(old)


@pytest.mark.parametrize("enabled", [False, True])
def test_the_served_app_applies_the_huge_page_setting(built_index, enabled):
    from numpy._core import multiarray

    old = numpy_huge_pages(not enabled)
    try:
        with make_client(built_index[0], numpy_huge_pages=enabled) as client:
            assert client.get("/readyz").status_code == 200
            assert multiarray._get_madvise_hugepage() is enabled
    finally:
        numpy_huge_pages(old)
