"""Label sets kept current with the model's edits: searching a label set's caption-anchor neighbours in bounded
steps, preparing scorers outside the read lock, registering label sets (their neighbours stacked in one shared
table), and bringing them up to date after every edit by replaying the journal (:mod:`asif.serving.journal`).

``LabelUpkeep`` is a part of :class:`asif.serving.model.AsifModel` (its base class), split off by responsibility:
the model answers queries and edits the stores, this keeps the label sets' state in step with it. It uses the
model's stores, defaults and ``version`` (the attributes declared below).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import numpy as np

from asif.math.relrep import KeyMatrix, Weighting, WeightingLike
from asif.math.scoring import LabelScorer
from asif.serving.journal import EditJournal, JournalEntry
from asif.serving.labels import CachedLabels, LabelSet
from asif.serving.neighbours import NO_ROWS, NeighbourCache, cache_depth
from asif.stores import VectorStore

LABEL_CHUNK = 256  # labels searched per step when a label set is made under a guard (a read lock), at most
STEP_SECONDS = 0.05  # ... and as many as take about this long

Guard = Callable[[], AbstractContextManager[object]]
Scheduler = Callable[[Callable[[], None]], None]


class LabelUpkeep:
    """The label-set half of the model (see the module's docstring)."""

    # The model's (AsifModel's attributes and methods), which the upkeep uses.
    k: int
    n_pairs: int
    version: int
    text_store: VectorStore
    label_sets: dict[str, CachedLabels]
    journal: EditJournal
    _kp: Callable[[int | None, WeightingLike | None], tuple[int, Weighting]]
    make_labels: Callable[..., CachedLabels]

    def _init_upkeep(self) -> None:
        """The upkeep's own state (AsifModel.__init__ calls it).

        Background work (scorer rebuilds, bringing registered label sets up to date after an edit):
        None = done at once by the caller; the service passes an executor, and ``guard`` (its read lock),
        which background jobs enter around every step that reads the stores.
        """
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
        return self.journal.since(synced)

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

    def followed_edit(self, op: str, ids: np.ndarray, text_vectors: np.ndarray | None) -> None:
        """An edit another process made to shared stores, which already hold it: the label sets follow it.

        The pairs held before an add are taken as the pairs held now: an overestimate, with which a label row
        that cannot place a newcomer refills by search instead (exact either way).
        """
        ids = np.asarray(ids, dtype=np.int64)
        kind = "add" if op == "add" else "remove"
        self._edited(JournalEntry(self.version + 1, kind, ids.copy(), text_vectors, self.n_pairs, followed=True))

    def _edited(self, entry: JournalEntry) -> None:
        self.journal.append(entry)
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
