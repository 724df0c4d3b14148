"""Anchors formed shard by shard from the embedding files: what fills the stores, so no step of a build holds
all embeddings at once. Pair ids are numbered 0..n-1 in shard order. A pass (:func:`anchor_pass`) reads every file
once; work that can share a pass observes its chunks instead of reading the files again."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

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


ChunkWork = Callable[[AnchorChunk], None]  # what is done with each chunk of a pass


def anchor_pass(
    files: Sequence[Path], mode: str, desc: str | None, observers: Mapping[str, ChunkWork] | None = None
) -> Iterator[tuple[ShardEmbedding, AnchorChunk]]:
    """:func:`anchor_chunks`: one read of every shard file, each chunk handed to every one of ``observers`` (by what
    they do) before it is yielded: work that shares the pass. A progress bar of the shards on stderr names ``desc``
    and the observers (no bar when ``desc`` is None)."""
    observers = observers or {}
    names = ", ".join(name for name in [desc, *observers] if name)
    with tqdm(total=len(files), desc=names, unit="shard", file=sys.stderr, disable=desc is None) as bar:
        for emb, chunk in anchor_chunks(files, mode):
            for observe in observers.values():
                observe(chunk)
            yield emb, chunk
            bar.update(1)


def read_pass(files: Sequence[Path], mode: str, consumers: Mapping[str, ChunkWork]) -> None:
    """One pass over the shard files that hands every chunk to each of ``consumers`` (none: no pass)."""
    if consumers:
        for _ in anchor_pass(files, mode, "", consumers):
            pass


class RowGather:
    """Per role, the anchor vectors of the pair ids ``picks[role]`` (sorted; None: every pair), gathered chunk by
    chunk (:meth:`add`, in pair id order), so several gathers can share one pass over the shard files."""

    def __init__(self, picks: dict[str, np.ndarray | None]) -> None:
        self.picks = picks
        self.parts: dict[str, list[np.ndarray]] = {role: [] for role in picks}

    def add(self, chunk: AnchorChunk) -> None:
        for role, pick in self.picks.items():
            vecs = chunk.vectors[role]
            if pick is None:
                self.parts[role].append(vecs)
                continue
            lo, hi = np.searchsorted(pick, [chunk.first_id, chunk.first_id + len(vecs)])
            self.parts[role].append(vecs[pick[lo:hi] - chunk.first_id])

    def rows(self) -> dict[str, np.ndarray]:
        """The rows gathered, per role; the gather lets its parts go (call it once, after the pass)."""
        rows = {role: np.concatenate(p) for role, p in self.parts.items()}
        self.parts = {role: [] for role in self.picks}
        return rows
