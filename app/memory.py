"""Process memory settings for serving: large freed blocks go back to the operating system."""

from __future__ import annotations

import ctypes
import sys

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
