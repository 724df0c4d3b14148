"""Anchors formed shard by shard from the embedding files: what fills the stores, so no step of a build holds
all embeddings at once. Pair ids are numbered 0..n-1 in shard order."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from asif.math.anchors import form_anchors
from index_builder.shard_embed import ShardEmbedding


@dataclass
class AnchorChunk:
    first_id: int
    vectors: dict[str, np.ndarray]  # role (image, text) -> (anchors, dim)
    pairs: list[tuple[str, list[str]]]  # (image reference, captions) per anchor
    thumbnails: dict[str, bytes] = field(default_factory=dict)  # image reference -> JPEG, for the images used

    @property
    def ids(self) -> np.ndarray:
        return np.arange(self.first_id, self.first_id + len(self.pairs), dtype=np.int64)


def shard_anchors(emb: ShardEmbedding, mode: str, first_id: int) -> AnchorChunk:
    """One shard's anchors. Per caption, each pair keeps its own sample's reference (samples of a shard may share
    an image's bytes, embedded once); per image, the image's first sample names it."""
    image, text, meta = form_anchors(mode, emb.sample_image, emb.caption_emb, emb.image_emb, emb.image_ok, emb.captions)
    if mode == "caption":  # form_anchors keeps the rows with a readable image, in order
        rows = np.flatnonzero(emb.image_ok[emb.sample_image]) if len(emb.sample_image) else np.zeros(0, np.int64)
        refs = [emb.sample_refs[r] for r in rows]
    else:
        refs = [emb.refs[img] for img, _ in meta]
    thumbnails = {ref: emb.thumbs[img] for ref, (img, _) in zip(refs, meta, strict=True) if emb.thumbs[img]}
    return AnchorChunk(
        first_id=first_id,
        vectors={"image": np.ascontiguousarray(image), "text": np.ascontiguousarray(text)},
        pairs=[(ref, caps) for ref, (_, caps) in zip(refs, meta, strict=True)],
        thumbnails=thumbnails,
    )


def anchor_chunks(files: Sequence[Path], mode: str) -> Iterator[tuple[ShardEmbedding, AnchorChunk]]:
    """(shard embedding, its anchors) per shard file, in order, one file in memory at a time."""
    next_id = 0
    for path in files:
        emb = ShardEmbedding.from_file(path)
        chunk = shard_anchors(emb, mode, next_id)
        next_id += len(chunk.pairs)
        yield emb, chunk


def gather_rows(chunks: Iterable[AnchorChunk], picks: dict[str, np.ndarray | None]) -> dict[str, np.ndarray]:
    """Per role, the anchor vectors of the pair ids ``picks[role]`` (sorted; None: every pair), read chunk by chunk."""
    parts: dict[str, list[np.ndarray]] = {role: [] for role in picks}
    for chunk in chunks:
        for role, pick in picks.items():
            vecs = chunk.vectors[role]
            if pick is None:
                parts[role].append(vecs)
                continue
            lo, hi = np.searchsorted(pick, [chunk.first_id, chunk.first_id + len(vecs)])
            parts[role].append(vecs[pick[lo:hi] - chunk.first_id])
    return {role: np.concatenate(p) for role, p in parts.items()}
