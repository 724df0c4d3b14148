"""A served ASIF model: the loaded index plus durable live edits, label sets and snapshots.

Durability: an add or delete is validated, then committed to the SQLite metadata database (pair
rows and an edit-log row holding the vectors, one transaction), then applied in memory, then
acknowledged. A rejected edit is never logged; one that fails to apply after logging is taken out of
the log again. On load, the edits newer than the snapshot named by the manifest (``applied_seq``) are
replayed over it.

Snapshots never touch the in-memory model: a snapshot turns the edit log's entries since the last one
into a delta file of the index folder (:func:`asif.state.persist.write_delta`) and compacts the log, so it
costs what changed since the last snapshot and takes no lock that classification or edits wait on.
When the deltas add up to ``compact_ratio`` of the pairs, :func:`asif.state.persist.compact_index_folder`
writes a new base generation from the files, also without any model lock.

Concurrency: edits run one at a time (an edit mutex: the log's order is the order of application). An
edit writes the log (an fsync) holding only that mutex, then takes the write side of a phase-fair
readers-writer lock just to apply itself to the two stores; then, under the read side, it brings the
registered label sets up to date before it answers (its cost is the label rows it changed), so the next
classification finds them current (one that gets there first brings its label set up to date itself). Searches take
the read side, so readers never see half an edit. Anything an unauthenticated request can trigger (an
ad-hoc label list) runs under the read side only, in short steps, and its cache is bounded in bytes.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asif.encoders import ImageEncoder, RuntimeOptions, TextEncoder
from asif.math.relrep import Weighting, as_weighting
from asif.serving.labels import CachedLabels, LabelSet
from asif.serving.loading import open_index
from asif.serving.model import AsifModel, Prediction
from asif.serving.rwlock import RWLock
from asif.state.metadata import NewPair, StoredLabelSet
from asif.state.persist import compact_index_folder, delta_pairs, net_delta, write_delta
from asif.stores import StoreError

log = logging.getLogger("asif.serving.live")

INLINE_CACHE_BYTES = 64 << 20
RESTORABLE = 1_000  # the last deleted pairs kept in memory (vectors, captions, thumbnail) so they can be restored
COMPACT_RATIO = 0.25  # fold deltas into a new base once they touch this fraction of the pairs


class NoPairsError(StoreError):
    """Classification asked of a model that holds no pairs."""


@dataclass(frozen=True)
class SnapshotInfo:
    generation: int
    applied_seq: int
    pairs: int
    edits: int  # edit-log entries this snapshot wrote
    compacted: bool  # whether a new base generation was written


@dataclass(frozen=True)
class Answer:
    """Predictions and the model state they were computed on."""

    predictions: list[Prediction]
    k: int
    weighting: Weighting
    pairs: int
    version: int  # edit-log sequence number of the last edit the model held (durable across restarts)


def stacked_embeddings(pairs: Sequence[NewPair]) -> tuple[np.ndarray, np.ndarray]:
    """(image, text) embeddings of new pairs as matrices (StoreError when their sizes differ)."""
    try:
        img = np.stack([np.asarray(p.image_vec, dtype=np.float32) for p in pairs])
        txt = np.stack([np.asarray(p.text_vec, dtype=np.float32) for p in pairs])
    except ValueError as exc:
        raise StoreError(f"pairs' embeddings must all have the index's dimensions: {exc}") from exc
    return img, txt


class LiveModel:
    def __init__(
        self,
        path: str | Path,
        image_encoder: ImageEncoder | str | None = None,
        text_encoder: TextEncoder | str | None = None,
        device: str | None = None,
        verify: bool = True,
        inline_cache_bytes: int = INLINE_CACHE_BYTES,
        compact_ratio: float = COMPACT_RATIO,
        runtime: RuntimeOptions | str | None = None,
    ) -> None:
        self.path = Path(path)
        loaded = open_index(self.path, image_encoder, text_encoder, device=device, verify=verify, runtime=runtime)
        self.verify = verify
        self._start(loaded.model, loaded.metadata, loaded.folder.manifest, inline_cache_bytes, compact_ratio)

    def _start(
        self, model: AsifModel, metadata: Any, manifest: dict[str, Any], inline_cache_bytes: int, compact_ratio: float
    ) -> None:
        """State shared by every kind of live model: locks, caches, the label sets, the maintenance thread."""
        self.model = model
        self.metadata = metadata
        self.manifest = manifest
        self.lock = RWLock()
        # Edits one at a time, so that the log's order is the order they are applied in; the log is written
        # (an fsync) outside the readers-writer lock, which an edit takes only to apply itself in memory.
        self._edit_lock = threading.Lock()
        self._snapshot_lock = threading.Lock()
        self._inline: OrderedDict[str, CachedLabels] = OrderedDict()
        self._deleted: OrderedDict[int, NewPair] = OrderedDict()  # the last RESTORABLE deleted pairs, by old id
        self._restore_lock = threading.Lock()  # one restore at a time: a pair is added back once
        self._inline_lock = threading.Lock()
        self.inline_cache_bytes = int(inline_cache_bytes)
        self.compact_ratio = float(compact_ratio)
        self.replayed = self._replay(int(self.manifest.get("applied_seq", 0)))
        self._seq = self.metadata.last_seq()  # every logged edit is applied now
        for stored in self._stored_label_sets():
            self.model.register_labels(
                stored.name, LabelSet(tuple(stored.classes), tuple(stored.templates)), stored.embeddings, restack=False
            )
        self.model.restack()  # one shared table for all of them
        # Label sets follow edits, and their scorers are rebuilt, here: off the request path, one job at a time.
        self._maintenance = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asif-labels")
        self.model.schedule = self._schedule
        self.model.guard = self.lock.read

    def _stored_label_sets(self) -> list[StoredLabelSet]:
        """The label sets to register on start."""
        return self.metadata.label_sets()

    def _schedule(self, job) -> None:
        def run() -> None:
            try:
                job()
            except Exception:  # pragma: no cover - label sets then catch up when next used, still exact
                log.exception("label maintenance job failed")

        self._maintenance.submit(run)

    def wait_idle(self) -> None:
        """Wait until the background label maintenance queued so far has run."""
        self._maintenance.submit(lambda: None).result()

    def _replay(self, after: int) -> int:
        edits = self.metadata.edits_after(after)
        for e in edits:
            ids = np.array([e.pair_id], dtype=np.int64)
            if e.op == "add" and not self.model.image_store.contains(ids)[0]:
                assert e.image_vec is not None and e.text_vec is not None
                self.model.add_pairs(ids, e.image_vec[None, :], e.text_vec[None, :])
            elif e.op == "delete":
                self.model.remove_pairs(ids)
        return len(edits)

    @property
    def image_encoder(self) -> ImageEncoder:
        assert self.model.image_encoder is not None
        return self.model.image_encoder

    @property
    def text_encoder(self) -> TextEncoder:
        assert self.model.text_encoder is not None
        return self.model.text_encoder

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self.lock.read():
            yield

    def classify(
        self, embeddings: np.ndarray, labels: CachedLabels, k: int, p: Weighting | float, **options: object
    ) -> Answer:
        """Classify under the read lock; ``k`` is capped at the pairs held (0 pairs: StoreError). ``p``: the
        weighting (a number: the power p)."""
        # A new (k, weighting) or a deeper k is made ready in bounded steps, never in one long hold of the read lock.
        self.model.prepare_scorer(labels, min(int(k), self.model.n_pairs), p, guard=self.lock.read)
        with self.lock.read():
            model = self.model
            k_eff = min(int(k), model.n_pairs)
            if k_eff == 0:
                raise NoPairsError("the model holds no pairs")
            preds = model.classify(embeddings, labels, k=k_eff, p=p, **options)  # type: ignore[arg-type]
            answer = Answer(preds, k_eff, as_weighting(p), model.n_pairs, self._seq)
        if labels.inline:
            self._trim_inline()  # a use can grow an entry (a scorer for a new k, deeper neighbours)
        return answer

    # -- edits -------------------------------------------------------------------------------------
    def add_pairs(self, pairs: Sequence[NewPair]) -> list[int]:
        """Validate, log durably, apply; returns the new ids. Invalid pairs raise StoreError, unlogged."""
        if not pairs:
            return []
        img, txt = stacked_embeddings(pairs)
        with self._edit_lock:
            # The ids the log will assign are not in the stores (never reused): validate with stand-ins.
            self.model.check_new_pairs(np.arange(-len(pairs), 0), img, txt)
            ids = self.metadata.log_add(pairs)
            seq = self.metadata.last_seq()
            try:
                with self.lock.write():
                    self.model.add_pairs(np.array(ids, dtype=np.int64), img, txt)
                    self._seq = seq
            except Exception:
                self.metadata.revert_add(ids)  # never replayed
                raise
        self.model.sync_registered()  # the edit pays its label upkeep, not the next classification
        return ids

    def delete_pairs(self, ids: Sequence[int]) -> list[int]:
        """Delete the pairs that exist; returns the ids actually deleted."""
        with self._edit_lock:  # the only writer: the stores' ids can be read without the RW lock
            arr = np.unique(np.asarray(ids, dtype=np.int64))
            present = arr[self.model.image_store.contains(arr)]
            if len(present):
                kept = self._keep_for_restore(present[-RESTORABLE:])  # no more than can be kept
                self.metadata.log_delete([int(i) for i in present])
                seq = self.metadata.last_seq()
                with self.lock.write():
                    self.model.remove_pairs(present)
                    self._seq = seq
                self._remember_deleted(kept)
        if len(present):
            self.model.sync_registered()  # the edit pays its label upkeep, not the next classification
        return [int(i) for i in present]

    def _remember_deleted(self, kept: dict[int, NewPair]) -> None:
        """Keep what restore_pairs needs for the last RESTORABLE deleted pairs (call with the edit lock)."""
        self._deleted.update(kept)
        while len(self._deleted) > RESTORABLE:
            self._deleted.popitem(last=False)

    def _keep_for_restore(self, ids: np.ndarray) -> dict[int, NewPair]:
        """What restore_pairs needs to add these pairs back (call with the edit lock, before deleting)."""
        image_vecs = self.model.image_store.reconstruct(ids)
        text_vecs = self.model.text_store.reconstruct(ids)
        kept = {}
        for row, pid in enumerate(ids.tolist()):
            rec = self.metadata.get(pid)
            if rec is not None:
                thumb = self.metadata.thumbnail(rec.image)
                kept[pid] = NewPair(rec.image, list(rec.captions), thumb, image_vecs[row], text_vecs[row])
        return kept

    def restore_pairs(self, ids: Sequence[int]) -> dict[int, int]:
        """Add recently deleted pairs back (same image reference, captions, thumbnail and vectors; new ids, since
        ids are never reused); returns {old id: new id}. Ids not among the last RESTORABLE deletions raise
        KeyError, and nothing is restored."""
        with self._restore_lock:
            with self._edit_lock:
                wanted = list(dict.fromkeys(int(i) for i in ids))
                missing = [i for i in wanted if i not in self._deleted]
                if missing:
                    raise KeyError(missing)
                pairs = [self._deleted[i] for i in wanted]
            new = self.add_pairs(pairs)
            with self._edit_lock:
                for i in wanted:
                    self._deleted.pop(i, None)
            return dict(zip(wanted, new, strict=True))

    def search(self, role: str, vectors: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest anchors of the image ("image") or caption ("text") index, by cosine: (similarities, ids)."""
        store = {"image": self.model.image_store, "text": self.model.text_store}[role]
        with self.lock.read():
            return store.search(np.asarray(vectors, dtype=np.float32), int(top))

    def has_pair(self, pair_id: int) -> bool:
        with self.lock.read():
            return bool(self.model.image_store.contains(np.array([pair_id]))[0])

    @property
    def version(self) -> int:
        """Edit-log sequence number of the last edit applied: grows with every add or delete, across restarts."""
        return self._seq

    # -- label sets ----------------------------------------------------------------------------------
    def make_labels(self, label_set: LabelSet, embeddings: np.ndarray) -> CachedLabels:
        """A label set's cached state, computed under the read lock in short steps (never the write lock)."""
        return self.model.make_labels(label_set, embeddings, guard=self.lock.read)

    def put_label_set(self, name: str, label_set: LabelSet, embeddings: np.ndarray) -> CachedLabels:
        cached = self.make_labels(label_set, embeddings)
        with self._edit_lock:
            self.metadata.put_label_set(
                StoredLabelSet(name, list(label_set.classes), list(label_set.templates), embeddings)
            )
            with self.lock.write():  # brief: brings the state up to the last edit and registers it
                return self.model.register_labels(name, label_set, cached=cached)

    def delete_label_set(self, name: str) -> bool:
        with self._edit_lock:
            found = self.metadata.delete_label_set(name)
            with self.lock.write():
                self.model.unregister_labels(name)
        return found

    def label_set(self, name: str) -> CachedLabels | None:
        with self.lock.read():
            return self.model.label_sets.get(name)

    def stored_label_sets(self) -> dict[str, CachedLabels]:
        with self.lock.read():  # registration changes the dict under the write side
            return dict(self.model.label_sets)

    @staticmethod
    def inline_key(label_set: LabelSet) -> str:
        return hashlib.sha256(repr((label_set.classes, label_set.templates)).encode()).hexdigest()[:24]

    def cached_inline(self, label_set: LabelSet) -> CachedLabels | None:
        key = self.inline_key(label_set)
        with self._inline_lock:
            cached = self._inline.get(key)
            if cached is not None:
                self._inline.move_to_end(key)
            return cached

    def add_inline(self, label_set: LabelSet, embeddings: np.ndarray) -> CachedLabels:
        """An ad-hoc label list's state. It is not registered (edits do not update it): it catches up from
        the model's edit journal when next used. Cached least-recently-used within ``inline_cache_bytes``."""
        cached = self.make_labels(label_set, embeddings)
        cached.inline = True
        key = self.inline_key(label_set)
        with self._inline_lock:
            self._inline[key] = cached
            self._inline.move_to_end(key)
        self._trim_inline()
        return cached

    def _trim_inline(self) -> None:
        """Count the inline cache's bytes as they are now: drop an entry over the cap on its own (the request that
        grew it still has it), then the least recently used ones while the total is over."""
        with self._inline_lock:
            sizes = {key: c.nbytes() for key, c in self._inline.items()}
            for key in [key for key, size in sizes.items() if size > self.inline_cache_bytes]:
                del self._inline[key], sizes[key]
            total = sum(sizes.values())
            while self._inline and total > self.inline_cache_bytes:
                key, _ = self._inline.popitem(last=False)
                total -= sizes[key]

    def inline_cache_usage(self) -> tuple[int, int]:
        """(label lists cached, bytes they hold)."""
        with self._inline_lock:
            return len(self._inline), sum(c.nbytes() for c in self._inline.values())

    # -- snapshots ------------------------------------------------------------------------------------
    def snapshot(self) -> SnapshotInfo:
        """Write the edits since the last snapshot as a delta of the index folder; compact when due.

        Reads only the durable edit log: no model lock is taken, so classification and edits go on.
        """
        with self._snapshot_lock:
            with self._edit_lock:  # a moment: no edit is between its log commit and its apply
                seq = self.metadata.last_seq()
            applied = int(self.manifest.get("applied_seq", 0))
            edits = self.metadata.edits_after(applied, upto=seq)
            manifest = self.manifest
            if edits:
                manifest = write_delta(self.path, manifest, net_delta(edits, seq))
                self.manifest = manifest
                self.metadata.compact_log(seq)
            compacted = False
            pairs = int(manifest.get("counts", {}).get("pairs", 0))
            if manifest.get("deltas") and delta_pairs(manifest) >= self.compact_ratio * max(pairs, 1):
                self.manifest = compact_index_folder(self.path, verify=self.verify)
                compacted = True
            return SnapshotInfo(
                int(self.manifest["generation"]), int(self.manifest.get("applied_seq", 0)), pairs, len(edits), compacted
            )

    def compact(self) -> SnapshotInfo:
        """Snapshot, then fold every delta into a new base generation (from the files; no model lock)."""
        info = self.snapshot()
        with self._snapshot_lock:
            if self.manifest.get("deltas"):
                self.manifest = compact_index_folder(self.path, verify=self.verify)
            return SnapshotInfo(int(self.manifest["generation"]), info.applied_seq, info.pairs, info.edits, True)

    def pending_edits(self) -> int:
        return self.metadata.last_seq() - int(self.manifest.get("applied_seq", 0))

    def close(self) -> None:
        self._maintenance.shutdown(wait=True)
        self.metadata.close()
