"""`asif build`'s count of the anchors: pairs, rows, captions, images and skips over the shard files (the report's
and the manifest's counts), and the distinct vectors per role that size the stores."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from asif.stores import count_distinct_rows
from index_builder.anchor_chunks import anchor_chunks
from index_builder.report import BuildReport


def count_anchors(files: list[Path], mode: str, report: BuildReport, skipped: Counter) -> tuple[int, dict[str, int]]:
    """Pairs and distinct vectors per role over all shard files; fills the report's counts."""
    n = 0
    distinct = {"image": 0, "text": 0}
    for emb, chunk in anchor_chunks(files, mode):
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
    return n, distinct
