"""`asif build --auto`: choose the served k and weighting from the pairs being built, without labels.

The selection is :func:`asif.tuning.autoselect.auto_kp`'s (hold out whole images over a few seeded splits, score the
grid by the held-out images' mean reciprocal rank of their own captions among the held-out captions), with memory
bounded as in the rest of the build. It needs three passes over the shard files, and the build makes none for it
alone: it rides on the build's own three (:class:`StreamedSelection`). The count pass also takes a content hash of
every image vector (rows of one image share it: that is how whole images are held out); the pass that reads the
index's training sample also gathers the held-out rows' vectors (a pass of its own only when the index needs no
training sample); the pass that fills the stores (or loads Milvus) also searches each chunk for the held-out rows'
neighbours among each split's other anchors, kept per query as the best ``max(ks)`` so far and merged shard by shard.
Nothing of the choice feeds the stores: only the manifest's defaults, written last. :func:`auto_select` runs the same
steps over the files in passes of its own.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TextIO

import numpy as np

from asif.math.relrep import WeightingLike
from asif.math.topk import effective_k, exact_topk, top_sorted
from asif.tuning.autoselect import (
    AUTO_KS,
    AUTO_SPLITS,
    AUTO_WEIGHTINGS,
    AutoChoice,
    HoldOut,
    Neighbours,
    TooFewImagesError,
    choose_from_neighbours,
    holdouts,
    image_keys,
)
from index_builder.anchor_chunks import AnchorChunk, RowGather, read_pass
from index_builder.errors import AutoTooFewImagesError

ROLES = ("image", "text")
# What --auto does in each of its three passes (the names its progress bars show)
KEYS_PASS, HELD_OUT_PASS, NEIGHBOURS_PASS = "auto: image keys", "auto: held-out pairs", "auto: neighbours"


class HeldOutSearch:
    """Per split: its held-out images' (``queries``) and captions' (``held``) top-``k`` neighbours among its other
    anchors (k capped at their number), under pair ids, from two passes over the anchors in pair id order:
    :meth:`gather` the held-out rows' vectors, then :meth:`search` every chunk."""

    def __init__(self, splits: Sequence[HoldOut], k: int) -> None:
        self.splits = splits
        self.depth = [effective_k(k, len(s.train)) for s in splits]
        self.union = np.unique(np.concatenate([s.held for s in splits]))
        self._rows: RowGather | None = RowGather(dict.fromkeys(ROLES, self.union))
        self._queries: list[dict[str, np.ndarray]] = []
        self._best: list[dict[str, Neighbours]] = []

    def gather(self, chunk: AnchorChunk) -> None:
        """First pass: keep the held-out rows of ``chunk``."""
        if self._rows is None:
            raise RuntimeError("the held-out rows are gathered before the search")
        self._rows.add(chunk)

    def _start(self) -> None:
        """The queries of every split from the gathered rows, and no neighbours yet (once, before the search)."""
        if self._rows is None:
            return
        vectors, self._rows = self._rows.rows(), None
        rows = [{"image": np.searchsorted(self.union, s.queries), "text": np.searchsorted(self.union, s.held)}
                for s in self.splits]  # fmt: skip
        self._queries = [{role: vectors[role][r[role]] for role in ROLES} for r in rows]
        self._best = [
            {role: (np.zeros((len(q[role]), 0), np.float32), np.zeros((len(q[role]), 0), np.int64)) for role in ROLES}
            for q in self._queries
        ]

    def search(self, chunk: AnchorChunk) -> None:
        """Second pass: merge ``chunk``'s anchors (those of each split not held out) into the neighbours so far."""
        self._start()
        for split, q, found, k_split in zip(self.splits, self._queries, self._best, self.depth, strict=True):
            others = np.flatnonzero(~np.isin(chunk.ids, split.held))
            if not len(others):
                continue
            for role in ROLES:
                sims, rows = exact_topk(q[role], chunk.vectors[role][others], k_split)
                ids = chunk.first_id + others[rows]
                best_s, best_i = found[role]
                merged_s, merged_i = np.concatenate([best_s, sims], axis=1), np.concatenate([best_i, ids], axis=1)
                found[role] = top_sorted(merged_s, merged_i, min(k_split, merged_s.shape[1]))

    def neighbours(self) -> list[tuple[Neighbours, Neighbours]]:
        """Per split, (the held-out images' neighbours, the held-out captions' neighbours)."""
        self._start()
        return [(found["image"], found["text"]) for found in self._best]


class StreamedSelection:
    """``--auto``'s choice, fed the anchors chunk by chunk (in pair id order) over three passes that may be passes
    the build makes anyway: :meth:`add_keys` in the first, :meth:`hold_out` after it, :meth:`gather` in the second,
    :meth:`search` in the third, then :meth:`choice`. ``seconds``: the time spent in them (the reads not counted)."""

    def __init__(
        self,
        seed: int = 0,
        ks: Sequence[int] = AUTO_KS,
        weightings: Sequence[WeightingLike] = AUTO_WEIGHTINGS,
        splits: int = AUTO_SPLITS,
    ) -> None:
        self.seed, self.ks, self.weightings, self.splits = seed, ks, weightings, splits
        self.seconds = 0.0
        self._keys: list[np.ndarray] = []
        self._search: HeldOutSearch | None = None

    @contextmanager
    def _timed(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0

    def _held(self) -> HeldOutSearch:
        if self._search is None:
            raise RuntimeError("hold_out() comes before the held-out rows are gathered and searched")
        return self._search

    def add_keys(self, chunk: AnchorChunk) -> None:
        """First pass: :func:`asif.tuning.autoselect.image_keys` of the chunk's image vectors."""
        with self._timed():
            self._keys.append(image_keys(chunk.vectors["image"]))

    def hold_out(self, n_pairs: int, log: TextIO = sys.stderr) -> None:
        """The held-out splits over the ``n_pairs`` anchors keyed; AutoTooFewImagesError when they have too few
        images."""
        with self._timed():
            keys = np.concatenate(self._keys) if self._keys else np.zeros(0, np.uint64)
            if len(keys) != n_pairs:
                raise RuntimeError(f"image keys of {len(keys)} anchors, not {n_pairs}")
            try:
                chosen = holdouts(keys, self.seed, self.splits)
            except TooFewImagesError as exc:
                raise AutoTooFewImagesError(f"--auto: {exc}") from None
            print(f"auto: choosing k and the weighting on {len(chosen[0].queries)} held-out images of "
                  f"{len(np.unique(keys))} ({n_pairs} pairs), {self.splits} splits from seed {self.seed}",
                  file=log)  # fmt: skip
            self._keys = []
            self._search = HeldOutSearch(chosen, max(self.ks))

    def gather(self, chunk: AnchorChunk) -> None:
        """Second pass: the held-out rows of ``chunk``."""
        with self._timed():
            self._held().gather(chunk)

    def search(self, chunk: AnchorChunk) -> None:
        """Third pass: the held-out rows' neighbours among ``chunk``'s anchors."""
        with self._timed():
            self._held().search(chunk)

    def choice(self) -> AutoChoice:
        """The (k, weighting) of the grid that :func:`asif.tuning.autoselect.auto_kp` picks over the same anchors."""
        with self._timed():
            search = self._held()
            choice = choose_from_neighbours(search.splits, search.neighbours(), self.ks, self.weightings)
        return replace(choice, seconds=self.seconds)


def _search_passes(files: Sequence[Path], mode: str, search: HeldOutSearch | StreamedSelection) -> None:
    """The held-out rows gathered in one pass over the shard files, their neighbours searched in a second."""
    read_pass(files, mode, {HELD_OUT_PASS: search.gather})
    read_pass(files, mode, {NEIGHBOURS_PASS: search.search})


def held_out_neighbours(
    files: Sequence[Path], mode: str, splits: Sequence[HoldOut], k: int
) -> list[tuple[Neighbours, Neighbours]]:
    """:class:`HeldOutSearch`'s neighbours, streamed from the shard files in two passes of their own."""
    search = HeldOutSearch(splits, k)
    _search_passes(files, mode, search)
    return search.neighbours()


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
    anchors in memory, read from the shard files in three passes of its own (the build shares its passes instead)."""
    t0 = time.perf_counter()
    selection = StreamedSelection(seed, ks, weightings, splits)
    read_pass(files, mode, {KEYS_PASS: selection.add_keys})
    selection.hold_out(n_pairs, log)
    _search_passes(files, mode, selection)
    return replace(selection.choice(), seconds=time.perf_counter() - t0)
