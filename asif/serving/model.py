"""An ASIF model: two anchor stores (images, captions) sharing pair ids, plus cached label sets.

Works on embeddings; encoders are applied by the caller (the service batches them) or through
the ``*_images`` / ``*_texts`` conveniences when encoders are attached.

Edits and label sets. Every edit bumps ``version`` and is kept in a short journal (the ids, and the
caption vectors of adds). A label set's state (neighbours, scorers) records the version it reflects
and catches up by replaying the journal: registered label sets right away, inside the edit; others
(ad-hoc label lists) when next used. Catching up costs what the edits changed; a label set that fell
off the journal is recomputed.

Concurrency: searches may run in parallel; edits need exclusion (the service wraps the model in a
readers-writer lock). Each label set's state has its own lock, so concurrent readers of one label
set take turns on its (short) scoring step while image searches run in parallel.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from asif.encoders.augment import check_views, image_view
from asif.encoders.base import ImageEncoder, TextEncoder
from asif.math.relrep import (
    DEFAULT_K,
    DEFAULT_P,
    KeyMatrix,
    SparseRR,
    Weighting,
    WeightingLike,
    as_weighting,
    average_relreps,
    check_k_p,
    effective_k,
    shared_anchors,
    sparsify,
)
from asif.math.scoring import LabelScorer
from asif.math.variants import Balance
from asif.serving.labels import NO_ROWS, CachedLabels, LabelSet, NeighbourCache, cache_depth, combine_prompt_embeddings
from asif.stores import StoreError, VectorStore, as_matrix

UNKNOWN = "unknown"
JOURNAL_BYTES = 64 << 20  # recent edits kept for label sets to catch up (ids + caption vectors)
LABEL_CHUNK = 256  # labels searched per step when a label set is made under a guard (a read lock), at most
STEP_SECONDS = 0.05  # ... and as many as take about this long

CaptionLookup = Callable[[Sequence[int]], dict[int, str]]
Guard = Callable[[], AbstractContextManager[object]]
Scheduler = Callable[[Callable[[], None]], None]


@dataclass(frozen=True)
class JournalEntry:
    """One edit, as label sets need it to catch up."""

    version: int
    op: str  # "add" or "remove"
    ids: np.ndarray
    vectors: np.ndarray | None  # caption vectors (an add's; a remove's when the store holds them exactly)
    n_before: int  # pairs held before the edit
    followed: bool = False  # made by another process: a label row may already hold the ids (built after it)

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes + (self.vectors.nbytes if self.vectors is not None else 0))


@dataclass(frozen=True)
class AnchorContribution:
    pair_id: int
    contribution: float
    caption: str | None = None


@dataclass(frozen=True)
class Prediction:
    """Ranked labels for one image; ``label`` is ``unknown`` when nothing supports an answer."""

    label: str
    scores: list[tuple[str, float]]  # top-n (label, score), best first
    unknown: bool
    explanation: list[AnchorContribution] = field(default_factory=list)


class AsifModel:
    def __init__(
        self,
        image_store: VectorStore,
        text_store: VectorStore,
        k: int = DEFAULT_K,
        p: float = DEFAULT_P,
        image_encoder: ImageEncoder | None = None,
        text_encoder: TextEncoder | None = None,
        captions: CaptionLookup | None = None,
        journal_bytes: int = JOURNAL_BYTES,
        weighting: Weighting | None = None,
    ) -> None:
        check_k_p(k, p)
        if image_store.ntotal != text_store.ntotal:
            raise StoreError(f"image index holds {image_store.ntotal} anchors, caption index {text_store.ntotal}")
        self.image_store = image_store
        self.text_store = text_store
        self.k = int(k)
        self.p = float(p)  # the power weighting's exponent when a request asks for it without one
        self.weighting = weighting or Weighting("power", self.p)  # the default weighting
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.captions = captions
        self.label_sets: dict[str, CachedLabels] = {}
        self.version = 0  # bumped by every edit
        self.journal_bytes = int(journal_bytes)
        self._journal: deque[JournalEntry] = deque()
        self._journal_size = 0
        self._journal_lock = threading.Lock()  # the journal is read without the read lock (label upkeep)
        # Background work (scorer rebuilds, bringing registered label sets up to date after an edit):
        # None = done at once by the caller; the service passes an executor, and ``guard`` (its read lock),
        # which background jobs enter around every step that reads the stores.
        self.schedule: Scheduler | None = None
        self.guard: Guard = nullcontext
        self._sync_pending = False
        # The neighbours of registered label sets, stacked in one table so that an edit updates them all in
        # one vectorised pass; each set's ``neighbours`` is a view of its rows (``_shared_sets``: set, start, stop).
        self._shared: NeighbourCache | None = None
        self._shared_sets: list[tuple[CachedLabels, int, int]] = []
        self._shared_synced = 0  # the version the table reflects, its rows' top-k searched again where needed
        self._shared_replayed = 0  # the version whose journal entries the table has taken (>= _shared_synced)
        self._shared_lock = threading.Lock()

    @property
    def n_pairs(self) -> int:
        return self.image_store.ntotal

    def _kp(self, k: int | None, p: WeightingLike | None) -> tuple[int, Weighting]:
        """(k capped at the pairs held, the weighting): the model's defaults where None; a bare number is the power
        weighting's p."""
        k = self.k if k is None else k
        check_k_p(k, 1.0)
        weighting = self.weighting if p is None else as_weighting(p)
        return effective_k(k, self.n_pairs), weighting

    # -- relative representations ---------------------------------------------------------------
    # ``p`` everywhere below: a Weighting, or a number (the paper's power p), or None (the model's default weighting).
    def image_relrep(self, embeddings: np.ndarray, k: int | None = None, p: WeightingLike | None = None) -> SparseRR:
        k, w = self._kp(k, p)
        sims, ids = self.image_store.search(embeddings, k)
        return sparsify(sims, ids, w)

    def text_relrep(self, embeddings: np.ndarray, k: int | None = None, p: WeightingLike | None = None) -> SparseRR:
        k, w = self._kp(k, p)
        sims, ids = self.text_store.search(embeddings, k)
        return sparsify(sims, ids, w)

    def similarity(
        self,
        image_embeddings: np.ndarray,
        text_embeddings: np.ndarray,
        k: int | None = None,
        p: WeightingLike | None = None,
    ) -> np.ndarray:
        """(n_images, n_texts) ASIF similarity matrix."""
        keys = KeyMatrix.from_rr(self.text_relrep(text_embeddings, k, p))
        return keys.score(self.image_relrep(image_embeddings, k, p))

    # -- label sets -----------------------------------------------------------------------------
    def embed_labels(self, label_set: LabelSet) -> np.ndarray:
        if self.text_encoder is None:
            raise RuntimeError("no text encoder attached: pass label embeddings explicitly")
        prompts = self.text_encoder.encode(label_set.prompts())
        return combine_prompt_embeddings(prompts, len(label_set.classes))

    def _checked_label_embeddings(self, label_set: LabelSet, embeddings: np.ndarray | None) -> np.ndarray:
        emb = self.embed_labels(label_set) if embeddings is None else np.asarray(embeddings, dtype=np.float32)
        if emb.shape != (len(label_set.classes), self.text_store.dim):
            raise ValueError(f"label embeddings must be ({len(label_set.classes)}, {self.text_store.dim})")
        if not np.isfinite(emb).all():
            raise ValueError("label embeddings contain NaN or infinity")
        return emb

    def make_labels(
        self,
        label_set: LabelSet,
        embeddings: np.ndarray | None = None,
        guard: Guard = nullcontext,
        chunk: int = LABEL_CHUNK,
    ) -> CachedLabels:
        """Label set -> cached representation over the caption anchors (not registered).

        ``guard`` is entered around each step that reads the stores (the service passes its read lock): the
        neighbours are searched a bounded number of entries at a time (:meth:`neighbours_in_steps`), and the default
        scorer is built outside the guard (the state is private until it is registered, which catches it up).
        """
        emb = self._checked_label_embeddings(label_set, embeddings)
        cache, synced = self.neighbours_in_steps(emb, cache_depth(self.k), guard, chunk)
        cached = CachedLabels(label_set, emb, cache, synced=synced)
        if self.n_pairs:
            cached.scorer(*self._kp(None, None))  # the default scorer, so the first classify finds it
        return cached

    def neighbours_in_steps(
        self,
        emb: np.ndarray,
        depth: int,
        guard: Guard = nullcontext,
        chunk: int = LABEL_CHUNK,
        step_seconds: float = STEP_SECONDS,
    ) -> tuple[NeighbourCache, int]:
        """Caption-anchor neighbours of ``emb`` to ``depth``, and the model version they reflect.

        The labels are searched in batches under ``guard``, each hold of it ending once ``step_seconds`` have passed
        (so a large index, where one label's search can take tens of ms, holds it no longer than a small one). A
        batch starts at one label and doubles while batches stay quick, up to ``chunk`` labels' worth of entries at
        the default depth (fewer labels at a deeper depth). The batches are then brought to one version from the
        journal under the guard, joined outside it, and the joined table caught up with the edits made meanwhile.
        """
        most = max(1, chunk * cache_depth(self.k) // depth)
        batch, start = 1, 0
        per_label = 0.0  # seconds one label's search took in the last batch
        parts: list[tuple[NeighbourCache, int]] = []
        while start < len(emb):
            with guard():
                held = time.perf_counter()
                while start < len(emb):
                    t0 = time.perf_counter()
                    part = NeighbourCache(emb[start : start + batch], depth=depth)
                    part.fill(np.arange(len(part.queries)), self.text_store.search, self.n_pairs)
                    parts.append((part, self.version))
                    start += len(part.queries)
                    now = time.perf_counter()
                    took = now - t0
                    per_label = took / len(part.queries)
                    batch = min(most, batch * 2) if took < step_seconds / 4 else max(1, batch // 2)
                    # End the hold before a batch that would take it past step_seconds, not after.
                    if now - held + per_label * min(batch, len(emb) - start) > step_seconds:
                        break
        with guard():
            synced = self.version
            for part, version in parts:
                if self._catch_up(part, version, self.k) is None:  # the journal no longer reaches back
                    part.fill(np.arange(len(part.queries)), self.text_store.search, self.n_pairs)
        if len(parts) == 1:
            return parts[0][0], synced
        cache = NeighbourCache.concat([part for part, _ in parts])  # a copy: outside the guard
        with guard():
            if self._catch_up(cache, synced, self.k) is None:
                cache.fill(np.arange(len(cache.queries)), self.text_store.search, self.n_pairs)
            return cache, self.version

    def prepare_scorer(self, labels: CachedLabels, k: int, p: WeightingLike, guard: Guard = nullcontext) -> None:
        """Make the label set's scorer for (k, weighting) ready without holding ``guard`` (a read lock) for long.

        A deeper k than the neighbours hold is searched in steps (:meth:`neighbours_in_steps`); a new scorer is built
        outside the guard from a copy of the rows, then brought up to date under it with the rows that changed
        meanwhile. A classification then finds everything ready, or catches up the few edits made since.
        """
        if k <= 0 or self.n_pairs == 0:
            return  # nothing to prepare: the classification answers that the model holds no pairs
        key = self._kp(k, p)
        need = max(key[0], self.k)
        with labels.lock:
            if key in labels.scorers and labels.neighbours.depth >= need:
                return
            deeper = labels.neighbours.depth < max(need, labels.max_k())
        if deeper:
            fresh, synced = self.neighbours_in_steps(labels.embeddings, cache_depth(max(need, labels.max_k())), guard)
            with guard(), self._current(labels, None) as _:
                if self._catch_up(fresh, synced, need) is None:
                    fresh.fill(np.arange(len(fresh.queries)), self.text_store.search, self.n_pairs)
                # The same anchor set, deeper: the scorers' rows (top-k of fewer) are unchanged and stay.
                labels.neighbours, labels.shared, labels.synced = fresh, False, self.version
        with guard(), self._current(labels, key[0]) as _:
            if key in labels.scorers:
                return
            sims, ids = (a.copy() for a in labels.neighbours.topk(key[0]))
            watch = labels.watch()
        scorer = LabelScorer(key[0], key[1], sims, ids)  # the costly part, outside every lock
        with guard(), self._current(labels, key[0]) as _:
            changed = np.flatnonzero(labels.unwatch(watch))
            if len(changed):
                sims, ids = labels.neighbours.topk(key[0])
                scorer.update(changed, sims[changed], ids[changed])
            labels.add_scorer(key, scorer, pinned=self._kp(None, None))

    @contextmanager
    def _current(self, labels: CachedLabels, k: int | None) -> Iterator[None]:
        """Hold the label set's lock with its neighbours and scorers current with the model (call under the guard);
        ``k`` None: without deepening its neighbours."""
        k = self.k if k is None else k  # None: the depth already covers self.k
        if labels.shared:
            with self._shared_lock:
                self._sync_shared_locked()
                with labels.lock:
                    self._sync(labels, k)
        with labels.lock:
            if not labels.shared:
                self._sync(labels, k)
            labels.flush()
            yield

    def register_labels(
        self,
        name: str,
        label_set: LabelSet,
        embeddings: np.ndarray | None = None,
        cached: CachedLabels | None = None,
        restack: bool = True,
    ) -> CachedLabels:
        """Add (or replace) a named label set whose representations follow every edit.

        ``cached``: a state made earlier by :meth:`make_labels` (e.g. off the write lock); it is brought
        up to date here. ``restack=False`` defers the shared table's rebuild (registering many sets at
        once: call :meth:`restack` after the last).
        """
        if cached is None:
            cached = self.make_labels(label_set, embeddings)
        with cached.lock:
            self._sync(cached, self.k)
        old = self.label_sets.get(name)
        self.label_sets[name] = cached
        if restack:
            self.restack(detach=old)
        return cached

    def unregister_labels(self, name: str) -> CachedLabels | None:
        """Stop updating a named label set (it still catches up if used); returns it."""
        old = self.label_sets.pop(name, None)
        if old is not None:
            self.restack(detach=old)
        return old

    def restack(self, detach: CachedLabels | None = None) -> None:
        """Rebuild the shared table from the registered label sets (registration is rare: a copy of their rows).

        Needs exclusive use of the model (the service holds its write lock).
        """
        with self._shared_lock:
            self._sync_shared_locked()
            if detach is not None and detach.shared and all(c is not detach for c in self.label_sets.values()):
                with detach.lock:
                    detach.neighbours, detach.shared = detach.neighbours.copy(), False
            depth = cache_depth(self.k)
            members = []
            for cached in self.label_sets.values():
                with cached.lock:
                    if cached.neighbours.depth == depth:
                        self._sync(cached, self.k)
                        cached.flush()
                        members.append(cached)
            if not members:
                self._shared, self._shared_sets = None, []
                return
            table = NeighbourCache.concat([c.neighbours for c in members])
            spans, start = [], 0
            for cached in members:
                stop = start + len(cached.embeddings)
                with cached.lock:
                    cached.neighbours, cached.shared = table.view(start, stop), True
                spans.append((cached, start, stop))
                start = stop
            self._shared, self._shared_sets = table, spans
            self._shared_synced = self._shared_replayed = self.version

    def _sync_shared_locked(self) -> None:
        """Bring the shared table up to the current version in one pass (hold ``_shared_lock``)."""
        table = self._shared
        if table is None or self._shared_synced == self.version:
            return
        rows = self._catch_up(table, self._shared_replayed, self.k)
        if rows is None:  # the journal no longer reaches back: recompute every row
            rows = table.fill(np.arange(len(table.queries)), self.text_store.search, self.n_pairs)
        self._shared_synced = self._shared_replayed = self.version
        self._mark_shared(rows, synced=True)

    def _replay_shared_locked(self) -> None:
        """Replay the journal on the shared table without the guard (hold ``_shared_lock``): the heavy part of
        following an edit, which reads no store. Rows that ran out of neighbours wait for the guarded sync."""
        table = self._shared
        missed = self._missed(self._shared_replayed) if table is not None else None
        if not missed:
            return
        self._mark_shared(self._replay(table, missed), synced=False)
        self._shared_replayed = missed[-1].version

    def _mark_shared(self, rows: np.ndarray, synced: bool) -> None:
        """Note changed rows of the shared table in the label sets that own them (hold ``_shared_lock``)."""
        for cached, start, stop in self._shared_sets:
            lo, hi = np.searchsorted(rows, [start, stop])
            with cached.lock:
                if cached.shared:
                    cached.mark_changed(rows[lo:hi] - start)
                    if synced:
                        cached.synced = self.version

    def _missed(self, synced: int) -> list[JournalEntry] | None:
        """The journal's entries after version ``synced``, oldest first; None when it no longer holds them all."""
        with self._journal_lock:
            if synced == self.version:
                return []
            if synced > self.version or not self._journal or self._journal[0].version > synced + 1:
                return None
            missed = []
            for entry in reversed(self._journal):  # the newest first: costs the edits missed, not the journal
                if entry.version <= synced:
                    break
                missed.append(entry)
            return missed[::-1]

    @staticmethod
    def _replay(cache: NeighbourCache, entries: Sequence[JournalEntry]) -> np.ndarray:
        """Apply journal entries to a neighbour cache (their ids and caption vectors only: no store is read);
        returns the rows changed."""
        changed = [NO_ROWS]
        for entry in entries:
            if entry.op == "add":
                changed.append(cache.add(entry.ids, entry.vectors, entry.n_before, known=entry.followed))
            else:
                changed.append(cache.remove(entry.ids, entry.vectors))
        return np.unique(np.concatenate(changed))

    def _catch_up(self, cache: NeighbourCache, synced: int, k: int) -> np.ndarray | None:
        """Replay the edits after version ``synced`` on ``cache`` and make its rows know their top-k (call under the
        guard: rows that ran out of neighbours are searched again).

        Returns the rows that changed, or None when the journal no longer holds those edits.
        """
        missed = self._missed(synced)
        if missed is None:
            return None
        if not missed:
            return NO_ROWS
        rows = self._replay(cache, missed)
        return np.union1d(rows, cache.ensure(k, self.text_store.search, self.n_pairs))

    def _sync(self, labels: CachedLabels, k: int) -> None:
        """Bring a label set up to the current version with neighbours for ``k`` (hold its lock; for a set in
        the shared table, also ``_shared_lock``, after syncing the table)."""
        need = max(k, labels.max_k(), self.k)
        if labels.shared:
            if need <= labels.neighbours.depth:
                labels.mark_changed(labels.neighbours.ensure(need, self.text_store.search, self.n_pairs))
                return
            # A deeper k than the shared table keeps: this set goes on its own (its rows there go unused).
            labels.neighbours, labels.shared = labels.neighbours.copy(), False
        if labels.synced != self.version or labels.neighbours.depth < need:
            rows = self._catch_up(labels.neighbours, labels.synced, need) if labels.neighbours.depth >= need else None
            if rows is None:
                fresh = NeighbourCache(labels.embeddings, depth=cache_depth(need))
                fresh.fill(np.arange(len(labels.embeddings)), self.text_store.search, self.n_pairs)
                labels.reset(fresh, self.version)
                return
            labels.synced = self.version
            labels.rows_changed(rows)
        else:
            labels.rows_changed(labels.neighbours.ensure(need, self.text_store.search, self.n_pairs))

    def _maybe_rebuild(self, labels: CachedLabels) -> None:
        for scorer in labels.scorers.values():
            if scorer.needs_rebuild() and not scorer.rebuilding:
                self._rebuild_later(labels, scorer)

    def _rebuild_later(self, labels: CachedLabels, scorer: LabelScorer) -> None:
        if self.schedule is None:
            scorer.rebuild()
            return
        scorer.rebuilding = True

        def rebuild() -> None:
            try:
                with labels.lock:
                    rr, clock = scorer.rebuild_inputs()
                base = KeyMatrix.from_rr(rr)  # the costly part, outside the lock
                with labels.lock:
                    scorer.install(base, clock)
            finally:
                scorer.rebuilding = False

        self.schedule(rebuild)

    @contextmanager
    def label_scorer(self, labels: CachedLabels, k: int, p: WeightingLike) -> Iterator[LabelScorer]:
        """The label set's scorer for (k, weighting), current with the model, used under the label set's lock."""
        with self._current(labels, k):
            scorer = labels.scorer(k, p, pinned=self._kp(None, None) if self.n_pairs else None)
            self._maybe_rebuild(labels)
            yield scorer

    # -- classification -------------------------------------------------------------------------
    def classify(
        self,
        image_embeddings: np.ndarray,
        labels: CachedLabels,
        k: int | None = None,
        p: WeightingLike | None = None,
        top: int = 5,
        threshold: float = 0.0,
        explain: int = 0,
        explain_label: int | None = None,
        views: Sequence[np.ndarray] = (),
        balance: Balance | None = None,
    ) -> list[Prediction]:
        """Classify a batch of image embeddings; ``explain`` = how many contributing anchors to return, for the
        best label or, with ``explain_label``, for the label of that index. ``views``: embeddings of other views of
        the same images (test-time augmentation, :mod:`asif.encoders.augment`), each like ``image_embeddings``; an
        image's representation is then the normalised mean of its views' representations. ``balance``: a batch of two or
        more images is ranked by its balanced label probabilities (:class:`asif.math.variants.Balance`), which are the
        scores returned; a lone image keeps its ASIF scores."""
        k, p = self._kp(k, p)
        if balance is not None:
            balance.check(len(labels.classes))
        if explain_label is not None and not 0 <= explain_label < len(labels.classes):
            raise IndexError(f"explain_label {explain_label} out of range for {len(labels.classes)} labels")
        if any(np.shape(v) != np.shape(image_embeddings) for v in views):
            raise ValueError("every view's embeddings must have the shape of the image embeddings")
        image_rr = average_relreps([self.image_relrep(e, k, p) for e in (image_embeddings, *views)])
        with self.label_scorer(labels, k, p) as scorer:
            scores = scorer.score(image_rr)
            balanced = balance.probabilities(scores) if balance is not None and scores.size else None
            ranking = scores if balanced is None else balanced
            best_rows = np.argmax(ranking, axis=1) if scores.size else np.zeros(len(image_rr), dtype=np.int64)
            if explain_label is not None:
                best_rows = np.full(len(image_rr), explain_label, dtype=np.int64)
            best_ids, best_weights = np.maximum(scorer.ids[best_rows], 0), scorer.row_weights(best_rows)
        top = max(1, min(int(top), scores.shape[1]))
        order = np.argsort(-ranking, axis=1, kind="stable")[:, :top]
        wanted_ids: list[int] = []
        raw: list[tuple[list[tuple[str, float]], bool, np.ndarray, np.ndarray]] = []
        for b in range(len(image_rr)):
            ranked = [(labels.classes[j], float(ranking[b, j])) for j in order[b]]
            best = int(order[b, 0])
            unknown = scores[b, best] <= 0.0 or ranking[b, best] < threshold
            explained = int(best_rows[b])
            ids, contrib = np.zeros(0, np.int64), np.zeros(0)
            if explain > 0 and scores[b, explained] > 0:
                ids, contrib = shared_anchors(image_rr.ids[b], image_rr.weights[b], best_ids[b], best_weights[b])
                ids, contrib = ids[:explain], contrib[:explain]
                wanted_ids.extend(int(i) for i in ids)
            raw.append((ranked, bool(unknown), ids, contrib))
        texts = self.captions(sorted(set(wanted_ids))) if (self.captions and wanted_ids) else {}
        return [
            Prediction(
                label=UNKNOWN if unknown else ranked[0][0],
                scores=ranked,
                unknown=unknown,
                explanation=[
                    AnchorContribution(int(i), float(c), texts.get(int(i))) for i, c in zip(ids, contrib, strict=True)
                ],
            )
            for ranked, unknown, ids, contrib in raw
        ]

    def classify_images(
        self, images: Sequence[Image.Image], labels: CachedLabels, augment: Sequence[str] = (), **options: object
    ) -> list[Prediction]:
        """Encode and classify images; ``augment`` names extra views (:data:`asif.encoders.augment.VIEWS`) averaged
        in."""
        if self.image_encoder is None:
            raise RuntimeError("no image encoder attached")
        encode = self.image_encoder.encode
        views = [encode([image_view(im, name) for im in images]) for name in check_views(augment)]
        return self.classify(encode(images), labels, views=views, **options)  # type: ignore[arg-type]

    # -- edits ----------------------------------------------------------------------------------
    def check_new_pairs(self, ids: np.ndarray, image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> None:
        """Raise StoreError unless these pairs can be added (shapes, finite values, new distinct ids)."""
        ids = np.asarray(ids)
        if not (len(ids) == len(image_embeddings) == len(text_embeddings)):
            raise StoreError("ids, image and text embeddings must have the same length")
        roles = (("image", image_embeddings, self.image_store), ("text", text_embeddings, self.text_store))
        for role, x, store in roles:
            try:
                as_matrix(x, store.dim)  # the stores' own check: shape and finite values
            except StoreError as exc:
                raise StoreError(f"{role} embeddings: {exc}") from exc
        if len(np.unique(ids)) != len(ids):
            raise StoreError("duplicate ids in one add")
        present = self.image_store.contains(ids.astype(np.int64))
        if present.any():
            raise StoreError(f"ids already present: {ids[present][:10].tolist()}")

    def add_pairs(self, ids: np.ndarray, image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> None:
        """Add pairs to both stores and update every registered label set."""
        ids = np.asarray(ids, dtype=np.int64)
        self.check_new_pairs(ids, image_embeddings, text_embeddings)
        n_before = self.n_pairs
        self.image_store.add(ids, image_embeddings)
        try:
            self.text_store.add(ids, text_embeddings)
        except Exception:
            self.image_store.remove(ids)  # keep the two stores in step
            raise
        vectors = np.array(text_embeddings, dtype=np.float32)
        self._edited(JournalEntry(self.version + 1, "add", ids.copy(), vectors, n_before))

    def remove_pairs(self, ids: np.ndarray) -> int:
        """Remove pairs by id from both stores and every label set; returns how many were present."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        present = ids[self.image_store.contains(ids)]
        if len(present) == 0:
            return 0
        n_before = self.n_pairs
        store = self.text_store
        # Their exact caption vectors let label sets look only at the rows that can hold them.
        vectors = None
        if store.exact_vectors:
            try:
                vectors = store.reconstruct(present)
            except StoreError:  # shared stores: some were deleted meanwhile by another process; rows search instead
                vectors = None
        self.image_store.remove(present)
        self.text_store.remove(present)
        self._edited(JournalEntry(self.version + 1, "remove", present, vectors, n_before))
        return len(present)

    def followed_edit(self, op: str, ids: np.ndarray, text_vectors: np.ndarray | None) -> None:
        """An edit another process made to shared stores, which already hold it: the label sets follow it.

        The pairs held before an add are taken as the pairs held now: an overestimate, with which a label row
        that cannot place a newcomer refills by search instead (exact either way).
        """
        ids = np.asarray(ids, dtype=np.int64)
        kind = "add" if op == "add" else "remove"
        self._edited(JournalEntry(self.version + 1, kind, ids.copy(), text_vectors, self.n_pairs, followed=True))

    def _edited(self, entry: JournalEntry) -> None:
        with self._journal_lock:
            self.version = entry.version
            self._journal.append(entry)
            self._journal_size += entry.nbytes
            while len(self._journal) > 1 and self._journal_size > self.journal_bytes:
                self._journal_size -= self._journal.popleft().nbytes
        if self.schedule is None:
            self.sync_registered()
        elif not self._sync_pending:  # the edit returns now; registered label sets follow in the background
            self._sync_pending = True
            self.schedule(self.sync_registered)

    def sync_registered(self) -> None:
        """Bring every registered label set up to the current version.

        The shared table takes the journal's new entries and its sets' scorers are patched without the guard (that
        reads no store; ``_shared_lock`` keeps it from readers of the table); then, under the guard, the edits that
        came meanwhile and the rows that ran out of neighbours, and the sets outside the table, one at a time. A
        classification that uses a set before this reaches it brings the set up to date itself.
        """
        self._sync_pending = False
        with self._shared_lock:
            self._replay_shared_locked()
            for cached, _, _ in self._shared_sets:
                with cached.lock:
                    if cached.shared:
                        cached.flush()
        with self.guard():
            with self._shared_lock:
                self._sync_shared_locked()
            sets = list(self.label_sets.values())
        for cached in sets:  # under the guard no edit lands: the shared table stays as synced above
            with self.guard(), cached.lock:
                if not cached.shared:
                    self._sync(cached, self.k)
                cached.flush()  # the scorers take what changed now, not on the next classification
                self._maybe_rebuild(cached)
