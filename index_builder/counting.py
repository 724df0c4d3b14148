"""`asif build`'s first pass over the shard files: the anchors counted (pairs, rows, captions, images and skips: the
report's and the manifest's counts) with the distinct vectors per role that size the stores, while other work that
needs every anchor once before the pair count is known (``--auto``'s image keys) observes the same pass."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asif.stores import count_distinct_rows
from index_builder.anchor_chunks import ChunkWork, anchor_pass
from index_builder.report import BuildReport


@dataclass(frozen=True)
class Counted:
    """The anchors of the shard files ``files``: ``n`` pairs, ``distinct`` vectors per role."""

    files: list[Path]
    n: int
    distinct: dict[str, int]


def count_anchors(
    files: list[Path],
    mode: str,
    report: BuildReport,
    skipped: Counter,
    observers: Mapping[str, ChunkWork] | None = None,
) -> Counted:
    """Pairs and distinct vectors per role over all shard files; fills the report's counts. Each chunk is handed to
    ``observers`` (by what they do) on the way."""
    n = 0
    distinct = {"image": 0, "text": 0}
    for emb, chunk in anchor_pass(files, mode, "counting anchors", observers):
        skipped.update(emb.counts)
        report.rows += len(emb.captions) + sum(emb.counts.values())
        usable = emb.image_ok[emb.sample_image] if len(emb.sample_image) else np.zeros(0, bool)
        skipped["unreadable_images"] += int((~emb.image_ok).sum())
        skipped["captions_of_unreadable_images"] += int((~usable).sum())
        report.captions += int(usable.sum())
        report.images += int(emb.image_ok.sum())
        n += len(chunk.pairs)
        for role, vecs in chunk.vectors.items():
            distinct[role] += count_distinct_rows(vecs)  # within a shard: stores group duplicates per add
    return Counted(files, n, distinct)
