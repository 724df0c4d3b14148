"""Process memory settings for serving: large freed blocks go back to the operating system, and the objects loaded
at start are kept out of the garbage collector's full passes."""

from __future__ import annotations

import ctypes
import gc
import logging
import sys

log = logging.getLogger("asif.memory")

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def release_large_frees() -> bool:
    """glibc: allocations of 1 MiB or more get mappings of their own, unmapped when freed. Returns whether it applied.

    glibc's default threshold is dynamic: once a mapped block is freed it rises to that block's size (up to 32 MiB),
    after which PIL's 16 MiB image blocks and large numpy arrays come from the heap, where freed ones stay in the
    process. A decoded 40 Mpx image is 160 MB of such blocks: a few requests' worth stayed resident for good.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to set
        return False


def numpy_huge_pages(enabled: bool) -> bool:
    """Whether numpy advises transparent huge pages (``MADV_HUGEPAGE``) for its large arrays; returns the old value.

    numpy does by default. Serving the 1M-pair index with it, 7 of 8 runs of 20 add/delete rounds against a
    10,000-label set had 1 to 3 single-image classifications (in about 1,200 read-lock holds) hold the read lock
    for 110-194 ms, on the CPU in the re-rank's inner products (no page fault, no run-queue wait, no steal); the
    same query and candidates took 3 ms replayed in a fresh process. With the advice off, 5 runs had none over
    52 ms. Advising only after the index was loaded did not help (the stalls follow the edits' large temporaries).
    Without huge pages, large temporaries fault in 4 KiB pages (an edit entering all 10,000 rows of a set went
    from 180 to about 400 ms), so scoring and label upkeep work in pieces small enough for the heap to reuse
    (that edit now takes ~110 ms). The kernel's ``enabled`` setting still rules: with ``always``, arrays get huge
    pages whatever numpy advises.
    """
    try:
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    if setter is None:  # pragma: no cover - a numpy without the switch
        return False
    return bool(setter(enabled))


def freeze_loaded_objects() -> None:
    """Collect once, then move every object alive now (the loaded model, encoders, libraries) to the collector's
    permanent generation.

    A full (generation 2) pass of Python's cyclic collector walks every tracked object and holds the GIL throughout:
    with a 1M-pair index and its encoders loaded that took 150-320 ms, several times a minute under edits, and any
    request returning from a native call (a FAISS search under the read lock) waited for it. Frozen objects are
    still freed by reference counting; only cycles among them are never collected (they live as long as the
    process anyway).
    """
    gc.collect()
    gc.freeze()
    log.info("%d objects loaded at start kept out of the garbage collector's passes", gc.get_freeze_count())
