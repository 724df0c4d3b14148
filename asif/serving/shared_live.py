"""A live model over shared state in Milvus: several API replicas (processes) serve one collection of pairs.

``SharedLiveModel`` is a ``LiveModel`` whose stores are ``MilvusStore`` collections and whose metadata, edit log and
label sets are ``MilvusMetadata`` collections, all in one Milvus database. Durability is Milvus's: there is no
local edit log and no index folder (a snapshot does nothing).

**The stores are the truth.** Anchor searches are Strong reads of the shared stores, so a pair deleted through one
replica is never a neighbour (nor in an explanation) on any replica once the delete was acknowledged. What each
replica keeps of its own is the label sets' neighbour tables; following the edit log keeps them exact.

**Edits** (``asif.state.milvus_meta``): each process writes its own numbered records (a *writer*), before the stores
change (an intent), and commits them after (``writers.committed``). A failed edit is undone as far as it can be,
then committed anyway, and answered with ``StoreUnavailable`` (503); its records then mean "look at these ids".

**Following**: before a classification (and a label-set lookup), a replica reads every writer's committed number
and pages through the records it has not applied, in order, until none are left. All of that, and the reads
that applying needs (caption vectors, a changed label set), run outside the model's locks and the edit lock; only
the application itself takes them, briefly. A record is applied from the stores' state, not its op: an id held
by both stores is an add (label tables that already hold it leave it), any other id a removal. So records may be
applied late, twice, or in any order across writers, and a pair deleted meanwhile (by anyone) is simply dropped.
A label-set record re-reads that one set (versioned: whole or not at all), and only it is rebuilt.

**Dead writers**: records past a writer's ``committed`` that stay so for ``pending_timeout_s`` (its process died
between intent and commit) are settled from the stores: a pair held by only one store is removed from it, then
the ids are applied as above. A writer slower than that timeout could see its edit settled the other way.

**Restore** works through any replica: a delete keeps the last ``RESTORABLE`` pairs (records and vectors) in the
``trash`` collection.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from asif.math.relrep import Weighting
from asif.serving.labels import CachedLabels, LabelSet
from asif.serving.live import (
    COMPACT_RATIO,
    INLINE_CACHE_BYTES,
    RESTORABLE,
    Answer,
    LiveModel,
    SnapshotInfo,
    stacked_embeddings,
)
from asif.serving.model import AsifModel
from asif.state import faults
from asif.state.metadata import NewPair, StoredLabelSet
from asif.state.milvus_meta import LOG_PAGE, LogRecord, MilvusMetadata
from asif.stores.base import StoreError, StoreUnavailable

log = logging.getLogger("asif.shared")

PENDING_TIMEOUT_S = 60.0  # records a writer has not committed for this long are settled from the stores


class SharedLiveModel(LiveModel):
    """See the module doc."""

    def __init__(
        self,
        model: AsifModel,
        metadata: MilvusMetadata,
        manifest: dict[str, Any],
        cursors: dict[int, int],
        inline_cache_bytes: int = INLINE_CACHE_BYTES,
        pending_timeout_s: float = PENDING_TIMEOUT_S,
    ) -> None:
        self.path = None
        self.verify = False
        self.pending_timeout_s = float(pending_timeout_s)
        self._cursors = dict(cursors)  # writer -> the last of its records applied here
        now = time.monotonic()
        self._committed_since = {w: (c, now) for w, c in cursors.items()}  # writer -> (committed, seen since)
        self._follow_lock = threading.Lock()  # one follow at a time (its reads run outside every other lock)
        self._deleted_here: set[int] = set()  # ids this process deleted while a follow was reading
        self._labels_here: set[str] = set()  # label sets this process wrote while a follow was reading
        self._labels_unsure: set[str] = set()  # sets written here since: the next follow checks their version
        self._label_versions: dict[str, int] = {}
        self._writer = metadata.register_writer()
        self._n = 0  # the last record number this process wrote
        self._start(model, metadata, manifest, inline_cache_bytes, COMPACT_RATIO)

    def _replay(self, after: int) -> int:
        return 0  # the stores are the shared state: nothing to replay

    def _stored_label_sets(self) -> list[StoredLabelSet]:
        stored = self.metadata.label_sets()
        self._label_versions = {s.name: s.version for s in stored}
        return stored

    # -- following the other writers ---------------------------------------------------------------------------
    def follow(self) -> int:
        """Apply what other writers committed since the last follow (and settle dead writers' intents); returns
        how many records were applied."""
        with self._follow_lock:
            try:
                return self._follow()
            except (StoreError, StoreUnavailable):
                raise
            except Exception as exc:  # Milvus unreachable: nothing was applied; the next request tries again
                raise StoreUnavailable(f"could not read the shared edit log: {exc}") from exc

    def _follow(self) -> int:
        """``follow`` (call with the follow lock): reads outside every other lock, then applies briefly."""
        with self._edit_lock:
            self._deleted_here.clear()
            self._labels_here.clear()
            unsure = set(self._labels_unsure)
        records, settle, heads = self._unapplied()
        if not records and not settle and not unsure:
            return 0
        touched = sorted({r.pair_id for r in records + settle if r.op != "labels"})
        if settle:
            self._settle_partial([r.pair_id for r in settle if r.op != "labels"])
        held, vectors = self._held(np.array(touched, dtype=np.int64))
        names = sorted({r.name for r in records + settle if r.op == "labels"} | unsure)
        changed = self._changed_label_sets(names)
        with self._edit_lock:
            # A set written here since it was read: what was read may be older than that write. Left as it is,
            # and checked again next time (the write may itself have lost to another replica's).
            changed = {name: new for name, new in changed.items() if name not in self._labels_here}
            self._labels_unsure -= set(names) - self._labels_here
            self._apply(np.array(touched, dtype=np.int64), held, vectors, changed)
            for w, n in heads.items():
                self._cursors[w] = max(self._cursors.get(w, 0), n)
        self.model.sync_registered()
        return len(records) + len(settle)

    def _unapplied(self) -> tuple[list[LogRecord], list[LogRecord], dict[int, int]]:
        """(committed records not applied yet, dead writers' intents to settle, writer -> where that leaves it)."""
        now = time.monotonic()
        records: list[LogRecord] = []
        settle: list[LogRecord] = []
        heads: dict[int, int] = {}
        for writer, committed in self.metadata.writers().items():
            if writer == self._writer:
                continue
            cursor = self._cursors.get(writer, 0)
            seen, since = self._committed_since.get(writer, (None, now))
            if seen != committed:
                self._committed_since[writer] = (committed, now)
            if committed > cursor:
                records += self.metadata.records(writer, cursor, committed)
                heads[writer] = committed
            elif seen == committed and now - since >= self.pending_timeout_s:
                # Nothing new committed for a while: records past it are intents of a dead (or stuck) writer.
                self._committed_since[writer] = (committed, now)
                pending = self.metadata.records(writer, cursor, cursor + LOG_PAGE)
                if pending:
                    log.warning("settling %d uncommitted edit records of writer %d", len(pending), writer)
                    settle += pending
                    heads[writer] = pending[-1].n
        return records, settle, heads

    def _held(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids held by both stores now, with their caption vectors (one read each; none is an error)."""
        if len(ids) == 0:
            return ids, np.zeros((0, self.model.text_store.dim), dtype=np.float32)
        found, vectors = self.model.text_store.vectors_of(ids)
        in_image = self.model.image_store.contains(found)
        return found[in_image], vectors[in_image]

    def _settle_partial(self, ids: Sequence[int]) -> None:
        """Intents of a dead writer: a pair held by one store only (half an add, half a delete) leaves both, and
        pair records without vectors go."""
        arr = np.unique(np.asarray(ids, dtype=np.int64))
        if len(arr) == 0:
            return
        in_image = self.model.image_store.contains(arr)
        in_text = self.model.text_store.contains(arr)
        half = arr[in_image != in_text]
        for store in (self.model.image_store, self.model.text_store):
            store.remove(half)
        gone = arr[~(in_image & in_text)]
        self.metadata.log_delete([int(i) for i in gone])

    def _changed_label_sets(self, names: Sequence[str]) -> dict[str, tuple[int, CachedLabels] | None]:
        """The named sets whose stored version is not the one held here: their new state (prepared outside the
        locks, like a PUT), or None where the set is gone."""
        out: dict[str, tuple[int, CachedLabels] | None] = {}
        current = self.metadata.label_versions() if names else {}
        for name in names:
            if current.get(name) is not None and current[name] == self._label_versions.get(name):
                continue  # the version held here (one query for all of them, no rows read)
            stored = self.metadata.label_set(name)
            if stored is None:
                if name in self._label_versions:
                    out[name] = None
            elif self._label_versions.get(name) != stored.version:
                label_set = LabelSet(tuple(stored.classes), tuple(stored.templates))
                out[name] = (stored.version, self.make_labels(label_set, stored.embeddings))
        return out

    def _apply(
        self,
        touched: np.ndarray,
        held: np.ndarray,
        vectors: np.ndarray,
        changed: dict[str, tuple[int, CachedLabels] | None],
    ) -> None:
        """Bring the label tables to the stores' state for these ids (call with the edit lock)."""
        fresh = ~np.isin(held, np.fromiter(self._deleted_here, dtype=np.int64, count=len(self._deleted_here)))
        held, vectors = held[fresh], vectors[fresh]
        gone = np.setdiff1d(touched, held)
        with self.lock.write():
            if len(held):
                self.model.followed_edit("add", held, vectors)  # label rows already holding one leave it
            if len(gone):
                self.model.followed_edit("remove", gone, None)  # ids not held anywhere here are no-ops
            for name, new in changed.items():
                if new is None:
                    self.model.unregister_labels(name)
                    self._label_versions.pop(name, None)
                else:
                    version, cached = new
                    self.model.register_labels(name, cached.label_set, cached=cached)
                    self._label_versions[name] = version
            if len(touched) or changed:
                self._seq += 1

    def classify(
        self, embeddings: np.ndarray, labels: CachedLabels, k: int, p: Weighting | float, **options: object
    ) -> Answer:
        self.follow()
        return super().classify(embeddings, labels, k, p, **options)

    def label_set(self, name: str) -> CachedLabels | None:
        self.follow()  # a set another replica stored is found by name
        return super().label_set(name)

    def stored_label_sets(self) -> dict[str, CachedLabels]:
        self.follow()
        return super().stored_label_sets()

    # -- edits: intent records, the stores, then the commit -----------------------------------------------------
    def _intend(self, op: str, pair_ids: Sequence[int], name: str = "") -> None:
        """Write this edit's records before anything changes (call with the edit lock). Their numbers are used up
        even if the write fails: a later commit covers them, and followers read them from the stores' state."""
        first = self._n + 1
        self._n = first + len(pair_ids) - 1
        try:
            self.metadata.log_intents(self._writer, first, op, pair_ids, name)
        except Exception as exc:
            raise StoreUnavailable(f"the edit could not be recorded, nothing was changed: {exc}") from exc

    def _commit(self) -> None:
        self.metadata.commit(self._writer, self._n)
        self._seq += 1

    def _failed(self, what: str, exc: Exception, ids: np.ndarray | None = None) -> StoreUnavailable:
        """After a failed edit (call with the edit lock): the label tables here follow the stores' state for its
        ids, and its records are committed if possible (followers then do the same)."""
        try:
            if ids is not None:
                held, vectors = self._held(ids)
                self._apply(ids, held, vectors, {})
            self._commit()
        except Exception:  # followers settle the intents once pending_timeout_s has passed
            log.exception("settling after a failed %s failed too", what)
        return StoreUnavailable(f"the {what} failed, and was undone as far as it could be: {exc}")

    def add_pairs(self, pairs: Sequence[NewPair]) -> list[int]:
        if not pairs:
            return []
        img, txt = stacked_embeddings(pairs)
        self.model.check_new_pairs(np.arange(-len(pairs), 0), img, txt)
        with self._edit_lock:
            ids = self.metadata.clock.take(len(pairs))
            self._intend("add", ids)
            arr = np.array(ids, dtype=np.int64)
            try:
                self.metadata.log_add(pairs, ids)
                with self.lock.write():
                    self.model.add_pairs(arr, img, txt)
                faults.hit("shared.before_commit")
                self._commit()
            except Exception as exc:
                self._undo_add(arr)
                raise self._failed("add", exc, arr) from exc
        self.model.sync_registered()
        return ids

    def _undo_add(self, ids: np.ndarray) -> None:
        try:
            with self.lock.write():
                self.model.remove_pairs(ids)
            self.metadata.revert_add([int(i) for i in ids])
        except Exception:  # followers settle it: a pair in one store only is removed, in both is kept
            log.exception("undoing a failed add failed")

    def delete_pairs(self, ids: Sequence[int]) -> list[int]:
        with self._edit_lock:
            arr = np.unique(np.asarray(ids, dtype=np.int64))
            present = arr[self.model.image_store.contains(arr)]
            if len(present):
                kept = self._keep_for_restore(present[-RESTORABLE:])
                self._intend("delete", present.tolist())
                try:
                    self.metadata.trash(kept, RESTORABLE)
                    with self.lock.write():
                        self.model.remove_pairs(present)
                    self._deleted_here.update(present.tolist())
                    self.metadata.log_delete([int(i) for i in present])
                    faults.hit("shared.before_commit")
                    self._commit()
                except Exception as exc:
                    raise self._failed("delete", exc, present) from exc
        if len(present):
            self.model.sync_registered()
        return [int(i) for i in present]

    def restore_pairs(self, ids: Sequence[int]) -> dict[int, int]:
        """Add back pairs deleted through any replica (the last RESTORABLE deletions kept in Milvus)."""
        with self._restore_lock:
            wanted = list(dict.fromkeys(int(i) for i in ids))
            kept = self.metadata.trashed(wanted)
            missing = [i for i in wanted if i not in kept]
            if missing:
                raise KeyError(missing)
            new = self.add_pairs([kept[i] for i in wanted])
            self.metadata.untrash(wanted)
            return dict(zip(wanted, new, strict=True))

    def put_label_set(self, name: str, label_set: LabelSet, embeddings: np.ndarray) -> CachedLabels:
        cached = self.make_labels(label_set, embeddings)
        with self._edit_lock:
            self._intend("labels", [0], name)
            try:
                stored = StoredLabelSet(name, list(label_set.classes), list(label_set.templates), embeddings)
                version = self.metadata.put_label_set(stored)
                self._commit()
            except Exception as exc:
                raise self._failed("label set write", exc) from exc
            with self.lock.write():
                self._label_versions[name] = version
                self._labels_here.add(name)
                self._labels_unsure.add(name)  # another replica's write may have landed after this one
                return self.model.register_labels(name, label_set, cached=cached)

    def delete_label_set(self, name: str) -> bool:
        with self._edit_lock:
            self._intend("labels", [0], name)
            try:
                found = self.metadata.delete_label_set(name)
                self._commit()
            except Exception as exc:
                raise self._failed("label set delete", exc) from exc
            with self.lock.write():
                self.model.unregister_labels(name)
                self._label_versions.pop(name, None)
                self._labels_here.add(name)
                self._labels_unsure.add(name)
        return found

    # -- persistence is Milvus's ------------------------------------------------------------------------------
    def snapshot(self) -> SnapshotInfo:
        return SnapshotInfo(0, self._seq, self.model.n_pairs, 0, False)

    def compact(self) -> SnapshotInfo:
        return self.snapshot()

    def pending_edits(self) -> int:
        return 0
