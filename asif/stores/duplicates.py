"""Bitwise-identical rows: with one anchor per caption, every image is repeated once per caption."""

from __future__ import annotations

import numpy as np


def rows_by_hash(x: np.ndarray) -> dict[int, list[int]]:
    """Row numbers of x bucketed by a hash of the row's bytes (equal rows share a bucket)."""
    buckets: dict[int, list[int]] = {}
    for row, vec in enumerate(np.ascontiguousarray(x)):
        buckets.setdefault(hash(vec.tobytes()), []).append(row)
    return buckets


def count_distinct_rows(x: np.ndarray) -> int:
    """Distinct rows of x (a hash collision undercounts by one: harmless for sizing an index)."""
    return len(rows_by_hash(x))
