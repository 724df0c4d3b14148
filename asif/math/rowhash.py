"""Content hashes of rows: a 64-bit key per row of an array, equal for byte-identical rows and the same in every
process (blake2b, not Python's salted ``hash``), so that a streamed build and an in-memory one agree."""

from __future__ import annotations

import hashlib

import numpy as np


def row_hashes(x: np.ndarray) -> np.ndarray:
    """A 64-bit content hash of each row's bytes (uint64): byte-identical rows share their key."""
    rows = np.ascontiguousarray(x)
    return np.array(
        [int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little") for row in rows],
        dtype=np.uint64,
    )
