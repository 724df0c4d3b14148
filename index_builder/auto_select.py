"""`asif build --auto`: choose the served k and weighting from the pairs being built, without labels.

The selection is :func:`asif.tuning.autoselect.auto_kp`'s (hold out whole images over a few seeded splits, score the
grid by the held-out images' mean reciprocal rank of their own captions among the held-out captions), with memory
bounded as in the rest of the build: the shard files are read three times more, once for a content hash of every image
vector (rows of one image share it: that is how whole images are held out), once for the held-out rows' vectors and once
for their neighbours among each split's other anchors, kept per query as the best ``max(ks)`` so far and merged shard by
shard.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TextIO

import numpy as np
from tqdm import tqdm

from asif.math.relrep import WeightingLike
from asif.math.topk import effective_k, exact_topk, top_sorted
from asif.tuning.autoselect import (
    AUTO_KS,
    AUTO_SPLITS,
    AUTO_WEIGHTINGS,
    AutoChoice,
    HoldOut,
    Neighbours,
    choose_from_neighbours,
    holdouts,
    image_keys,
)
from index_builder.anchor_chunks import AnchorChunk, anchor_chunks, gather_rows
from index_builder.errors import BuildError

ROLES = ("image", "text")


def _chunks(files: Sequence[Path], mode: str, desc: str) -> Iterator[AnchorChunk]:
    """The anchors shard by shard, with a progress bar on stderr."""
    with tqdm(total=len(files), desc=desc, unit="shard", file=sys.stderr) as bar:
        for _, chunk in anchor_chunks(files, mode):
            yield chunk
            bar.update(1)


def streamed_image_keys(files: Sequence[Path], mode: str, n_pairs: int) -> np.ndarray:
    """:func:`asif.tuning.autoselect.image_keys` of every anchor's image vector, by pair id."""
    keys = np.zeros(n_pairs, dtype=np.uint64)
    for chunk in _chunks(files, mode, "auto: image keys"):
        keys[chunk.ids] = image_keys(chunk.vectors["image"])
    return keys


def held_out_neighbours(
    files: Sequence[Path], mode: str, splits: Sequence[HoldOut], k: int
) -> list[tuple[Neighbours, Neighbours]]:
    """Per split: its held-out images' (``queries``) and captions' (``held``) top-``k`` neighbours among its other
    anchors (k capped at their number), under pair ids, streamed from the shard files in two passes."""
    depth = [effective_k(k, len(s.train)) for s in splits]
    union = np.unique(np.concatenate([s.held for s in splits]))
    vectors = gather_rows(_chunks(files, mode, "auto: held-out pairs"), dict.fromkeys(ROLES, union))
    rows = [{"image": np.searchsorted(union, s.queries), "text": np.searchsorted(union, s.held)} for s in splits]
    queries = [{role: vectors[role][r[role]] for role in ROLES} for r in rows]
    best = [
        {role: (np.zeros((len(q[role]), 0), np.float32), np.zeros((len(q[role]), 0), np.int64)) for role in ROLES}
        for q in queries
    ]
    for chunk in _chunks(files, mode, "auto: neighbours"):
        for split, q, found, k_split in zip(splits, queries, best, depth, strict=True):
            others = np.flatnonzero(~np.isin(chunk.ids, split.held))
            if not len(others):
                continue
            for role in ROLES:
                sims, rows = exact_topk(q[role], chunk.vectors[role][others], k_split)
                ids = chunk.first_id + others[rows]
                best_s, best_i = found[role]
                merged_s, merged_i = np.concatenate([best_s, sims], axis=1), np.concatenate([best_i, ids], axis=1)
                found[role] = top_sorted(merged_s, merged_i, min(k_split, merged_s.shape[1]))
    return [(found["image"], found["text"]) for found in best]


def auto_select(
    files: Sequence[Path],
    mode: str,
    n_pairs: int,
    seed: int = 0,
    ks: Sequence[int] = AUTO_KS,
    weightings: Sequence[WeightingLike] = AUTO_WEIGHTINGS,
    splits: int = AUTO_SPLITS,
    log: TextIO = sys.stderr,
) -> AutoChoice:
    """The (k, weighting) of the grid that :func:`asif.tuning.autoselect.auto_kp` picks over the same ``n_pairs``
    anchors in memory, read from the shard files."""
    t0 = time.perf_counter()
    keys = streamed_image_keys(files, mode, n_pairs)
    try:
        chosen = holdouts(keys, seed, splits)
    except ValueError as exc:
        raise BuildError(f"--auto: {exc}") from None
    print(f"auto: choosing k and the weighting on {len(chosen[0].queries)} held-out images of "
          f"{len(np.unique(keys))} ({n_pairs} pairs), {splits} splits from seed {seed}", file=log)  # fmt: skip
    neighbours = held_out_neighbours(files, mode, chosen, max(ks))
    choice = choose_from_neighbours(chosen, neighbours, ks, weightings)
    return replace(choice, seconds=time.perf_counter() - t0)
