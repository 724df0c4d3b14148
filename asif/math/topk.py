"""Exact top-k neighbours with one tie order: by decreasing similarity, ties (within ``TIE_GRID``) by increasing
id. Every top-k selection in the project goes through :func:`top_sorted`, so the dense reference
(:func:`exact_topk`), the anchor stores and the label caches pick the same neighbours when anchors are duplicated."""

from __future__ import annotations

import numpy as np


def effective_k(k: int, n_anchors: int) -> int:
    """k is capped at the number of anchors."""
    return max(0, min(int(k), int(n_anchors)))


TIE_MARGIN = 64  # extra neighbours kept so that ties at the k-th place are settled by id, not by chance
TIE_GRID = 2.0**-17  # similarities closer than ~8e-6 count as equal (duplicated anchors differ by rounding)


def top_sorted(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by decreasing similarity, ties (within TIE_GRID) by increasing id; first k kept.

    Every top-k selection in the project goes through this order, so the dense reference, the
    FAISS indices and the label caches pick the same neighbours when anchors are duplicated
    (one image with five captions gives five identical image anchors).
    """
    keep = k + TIE_MARGIN
    if sims.shape[1] <= 2 * keep:
        order = np.lexsort((ids, -np.floor(sims / TIE_GRID)), axis=-1)[:, :k]
        return np.take_along_axis(sims, order, axis=1), np.take_along_axis(ids, order, axis=1)
    # Long rows (re-ranked candidates): an O(n) partition to the best k + TIE_MARGIN first, then a sort.
    part = np.argpartition(-sims, keep - 1, axis=1)[:, :keep]
    part_s, part_i = np.take_along_axis(sims, part, axis=1), np.take_along_axis(ids, part, axis=1)
    order = np.lexsort((part_i, -np.floor(part_s / TIE_GRID)), axis=-1)[:, :k]
    out_s, out_i = np.take_along_axis(part_s, order, axis=1), np.take_along_axis(part_i, order, axis=1)
    # The partition settled ties in no particular order: where the last entry kept (the smallest) is in
    # the k-th one's cell, the cell may go on past it (more than TIE_MARGIN equal similarities). Such
    # rows are redone over every entry of the row in that cell or above.
    kth_cell = np.floor(out_s[:, -1] / TIE_GRID)
    for r in np.flatnonzero(part_s.min(axis=1) >= kth_cell * TIE_GRID):  # the cell's lower bound, exactly
        cells = np.floor(sims[r] / TIE_GRID)
        sel = np.flatnonzero(cells >= kth_cell[r])
        top = sel[np.lexsort((ids[r, sel], -cells[sel]))[:k]]
        out_s[r], out_i[r] = sims[r, top], ids[r, top]
    return out_s, out_i


def exact_topk(queries: np.ndarray, anchors: np.ndarray, k: int, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products of each query against all anchors (rows), sorted descending.

    Chunked over anchors so memory stays at ``len(queries) x chunk``. Returns (sims, row indices).
    Between chunks each row keeps its best k + TIE_MARGIN entries, and every entry of the k-th one's
    similarity cell when that cell is longer (rows are padded with ``-inf``, index ``-1``).
    """
    queries = np.asarray(queries, dtype=np.float32)
    anchors = np.asarray(anchors, dtype=np.float32)
    n = anchors.shape[0]
    k = effective_k(k, n)
    keep = min(n, k + TIE_MARGIN)
    b = queries.shape[0]
    best_s = np.full((b, 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((b, 0), dtype=np.int64)
    for start in range(0, n, chunk):
        block = queries @ anchors[start : start + chunk].T
        cand_s = np.concatenate([best_s, block], axis=1)
        cand_i = np.concatenate(
            [best_i, np.broadcast_to(np.arange(start, start + block.shape[1]), block.shape)], axis=1
        )
        if cand_s.shape[1] > keep:
            part = np.argpartition(-cand_s, keep - 1, axis=1)[:, :keep]
            part_s, part_i = np.take_along_axis(cand_s, part, axis=1), np.take_along_axis(cand_i, part, axis=1)
            cells = np.floor(part_s / TIE_GRID)
            last = cells.min(axis=1)  # the cell of the keep-th best
            long_tie = (cells > last[:, None]).sum(axis=1) < k  # the k-th best is in it: it may go on
            if long_tie.any():
                part_s, part_i = _with_whole_cells(cand_s, cand_i, part_s, part_i, long_tie, last)
            cand_s, cand_i = part_s, part_i
        best_s, best_i = cand_s, cand_i
    return top_sorted(best_s, best_i, k)


def _with_whole_cells(
    cand_s: np.ndarray, cand_i: np.ndarray, part_s: np.ndarray, part_i: np.ndarray, rows: np.ndarray, cell: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """exact_topk's kept entries, where the masked rows get every candidate of cell ``cell[r]`` or above."""
    wide = [np.flatnonzero(np.floor(cand_s[r] / TIE_GRID) >= cell[r]) for r in np.flatnonzero(rows)]
    width = max(part_s.shape[1], *(len(w) for w in wide))
    out_s = np.full((len(part_s), width), -np.inf, dtype=part_s.dtype)
    out_i = np.full((len(part_s), width), -1, dtype=np.int64)
    out_s[:, : part_s.shape[1]], out_i[:, : part_s.shape[1]] = part_s, part_i
    for r, sel in zip(np.flatnonzero(rows), wide, strict=True):
        out_s[r], out_i[r] = -np.inf, -1
        out_s[r, : len(sel)], out_i[r, : len(sel)] = cand_s[r, sel], cand_i[r, sel]
    return out_s, out_i
