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
