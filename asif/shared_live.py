"""A live model over shared state in Milvus: several API replicas (processes) serve one collection of pairs.

``SharedLiveModel`` is a ``LiveModel`` whose stores are ``MilvusStore`` collections and whose metadata, edit log and
label sets are ``MilvusMetadata`` collections, all in one Milvus database. Durability is Milvus's: there is no
local edit log and no index folder (a snapshot does nothing).

**How a replica sees the others' edits.** Every edit is written to the stores first, then recorded in the
``edits`` collection with a time-ordered id (``asif.milvus_meta.IdClock``). Before each classification a replica
reads (Strong) the edits newer than the last ones it saw, minus ``FOLLOW_WINDOW_MS`` (ids from two processes may
commit slightly out of order), skips those it already applied, and lets its cached label sets follow the rest
(``AsifModel.followed_edit``: caption vectors of added pairs come from the caption store). Anchor searches are
Strong reads of the stores themselves, so once a delete through one replica is acknowledged, the pair can no
longer be a neighbour of any image on any replica, and so can never be in an explanation; following the edit
makes the label side exact too. Label-set changes are recorded as edits (op ``labels``) and re-read on follow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from asif.encoders import ImageEncoder, TextEncoder
from asif.labels import CachedLabels, LabelSet
from asif.live import (
    COMPACT_RATIO,
    INLINE_CACHE_BYTES,
    RESTORABLE,
    Answer,
    LiveModel,
    SnapshotInfo,
    stacked_embeddings,
)
from asif.metadata import NewPair, StoredLabelSet
from asif.milvus_meta import IdClock, MilvusMetadata
from asif.model import AsifModel
from asif.relrep import DEFAULT_K, DEFAULT_P, Weighting
from asif.stores.base import StoreError
from asif.stores.milvus_store import MilvusIndex, MilvusStore

FOLLOW_WINDOW_MS = 30_000  # edits up to this much older than the newest one seen are looked at again


def open_shared(
    client: Any,
    prefix: str,
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
    k: int = DEFAULT_K,
    p: float = DEFAULT_P,
    index: MilvusIndex | None = None,
    inline_cache_bytes: int = INLINE_CACHE_BYTES,
) -> SharedLiveModel:
    """Open (or create) the shared model ``prefix`` in a Milvus database; the encoders must match its manifest."""
    metadata = MilvusMetadata(client, prefix, text_encoder.identity.dim)
    identities = {"image_encoder": image_encoder.identity.to_dict(), "text_encoder": text_encoder.identity.to_dict()}
    manifest = metadata.get_meta("manifest")
    if manifest is None:
        manifest = {**identities, "defaults": {"k": int(k), "p": float(p)}, "anchors": "caption", "store": "milvus"}
        metadata.set_meta("manifest", manifest)
    for role in ("image_encoder", "text_encoder"):
        if manifest[role] != identities[role]:
            raise StoreError(f"{prefix}: built with {manifest[role]['spec']}, not {identities[role]['spec']}")
    stores = [
        MilvusStore(client, f"{prefix}_{role}", enc.identity.dim, index)
        for role, enc in (("image", image_encoder), ("text", text_encoder))
    ]
    defaults = manifest.get("defaults", {})
    model = AsifModel(
        *stores,
        k=int(defaults.get("k", k)),
        p=float(defaults.get("p", p)),
        weighting=Weighting.from_defaults(defaults, p),
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        captions=metadata.captions,
    )
    return SharedLiveModel(model, metadata, manifest, inline_cache_bytes)


class SharedLiveModel(LiveModel):
    """See the module doc."""

    def __init__(
        self,
        model: AsifModel,
        metadata: MilvusMetadata,
        manifest: dict[str, Any],
        inline_cache_bytes: int = INLINE_CACHE_BYTES,
    ) -> None:
        self.path = None
        self.verify = False
        self._applied: dict[int, int] = {}  # edit ids seen (own and followed) in the window -> their ms
        self._start(model, metadata, manifest, inline_cache_bytes, COMPACT_RATIO)
        self._seen_ms = IdClock.ms_of(self._seq)

    def _replay(self, after: int) -> int:
        return 0  # the stores are the shared state: nothing to replay

    # -- following the other replicas -------------------------------------------------------------------------
    def _mark(self, seqs: Sequence[int]) -> None:
        for s in seqs:
            self._applied[int(s)] = IdClock.ms_of(s)
        if seqs:
            self._seq = max(self._seq, *seqs)
            self._seen_ms = max(self._seen_ms, IdClock.ms_of(max(seqs)))

    def follow(self) -> int:
        """Apply the edits other replicas made since the last follow; returns how many."""
        start = max(0, self._seen_ms - FOLLOW_WINDOW_MS) << 22
        with self._edit_lock:
            edits = [e for e in self.metadata.edits_after(start) if e.seq not in self._applied]
            if not edits:
                return 0
            labels_changed = any(e.op == "labels" for e in edits)
            with self.lock.write():
                for op in ("add", "delete"):
                    ids = np.array(sorted({e.pair_id for e in edits if e.op == op}), dtype=np.int64)
                    if op == "add" and len(ids):
                        ids = ids[self.model.text_store.contains(ids)]  # not deleted since
                        if len(ids):
                            self.model.followed_edit("add", ids, self.model.text_store.reconstruct(ids))
                    elif len(ids):
                        self.model.followed_edit("remove", ids, None)
                if labels_changed:
                    self._reload_label_sets()
            self._mark([e.seq for e in edits])
            horizon = self._seen_ms - 2 * FOLLOW_WINDOW_MS
            self._applied = {s: ms for s, ms in self._applied.items() if ms >= horizon}
            return len(edits)

    def _reload_label_sets(self) -> None:
        stored = {s.name: s for s in self.metadata.label_sets()}
        for name in set(self.model.label_sets) - set(stored):
            self.model.unregister_labels(name)
        for name, s in stored.items():
            self.model.register_labels(name, LabelSet(tuple(s.classes), tuple(s.templates)), s.embeddings)

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

    # -- edits: stores first, then the record the others follow ---------------------------------------------
    def add_pairs(self, pairs: Sequence[NewPair]) -> list[int]:
        if not pairs:
            return []
        img, txt = stacked_embeddings(pairs)
        self.model.check_new_pairs(np.arange(-len(pairs), 0), img, txt)
        with self._edit_lock:
            ids = self.metadata.log_add(pairs)
            try:
                with self.lock.write():
                    self.model.add_pairs(np.array(ids, dtype=np.int64), img, txt)
            except Exception:
                self.metadata.revert_add(ids)
                raise
            self._mark(self.metadata.record_edits("add", ids))
        return ids

    def delete_pairs(self, ids: Sequence[int]) -> list[int]:
        with self._edit_lock:
            arr = np.unique(np.asarray(ids, dtype=np.int64))
            present = arr[self.model.image_store.contains(arr)]
            if len(present):
                kept = self._keep_for_restore(present[-RESTORABLE:])
                with self.lock.write():
                    self.model.remove_pairs(present)
                self.metadata.log_delete([int(i) for i in present])
                self._mark(self.metadata.record_edits("delete", present.tolist()))
                self._remember_deleted(kept)
        return [int(i) for i in present]

    def put_label_set(self, name: str, label_set: LabelSet, embeddings: np.ndarray) -> CachedLabels:
        cached = self.make_labels(label_set, embeddings)
        with self._edit_lock:
            stored = StoredLabelSet(name, list(label_set.classes), list(label_set.templates), embeddings)
            self.metadata.put_label_set(stored)
            self._mark(self.metadata.record_edits("labels", [0]))
            with self.lock.write():
                return self.model.register_labels(name, label_set, cached=cached)

    def delete_label_set(self, name: str) -> bool:
        with self._edit_lock:
            found = self.metadata.delete_label_set(name)
            self._mark(self.metadata.record_edits("labels", [0]))
            with self.lock.write():
                self.model.unregister_labels(name)
        return found

    # -- persistence is Milvus's ------------------------------------------------------------------------------
    def snapshot(self) -> SnapshotInfo:
        return SnapshotInfo(0, self._seq, self.model.n_pairs, 0, False)

    def compact(self) -> SnapshotInfo:
        return self.snapshot()

    def pending_edits(self) -> int:
        return 0
