"""A served ASIF model: the loaded index plus durable live edits, stored label sets and snapshots.

Durability: an add or delete is first committed to the SQLite metadata database (pair rows and
an edit-log row holding the vectors, one transaction), then applied in memory, then
acknowledged. On load, the edits newer than the snapshot named by the manifest
(``applied_seq``) are replayed over it. A snapshot writes both indices and a new manifest
atomically (see :mod:`asif.persist`), then drops the edits it contains from the log.

Concurrency: a readers-writer lock; classification and similarity take the read side, edits
and label-set changes the write side, so readers never see half an edit.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asif.encoders import ImageEncoder, TextEncoder
from asif.labels import CachedLabels, LabelSet
from asif.loading import open_index
from asif.metadata import NewPair, StoredLabelSet
from asif.persist import save_index_folder
from asif.rwlock import RWLock

INLINE_PREFIX = "\x00inline:"


@dataclass(frozen=True)
class SnapshotInfo:
    generation: int
    applied_seq: int
    pairs: int


class LiveModel:
    def __init__(
        self,
        path: str | Path,
        image_encoder: ImageEncoder | str | None = None,
        text_encoder: TextEncoder | str | None = None,
        device: str | None = None,
        verify: bool = True,
        inline_cache_size: int = 64,
    ) -> None:
        self.path = Path(path)
        loaded = open_index(self.path, image_encoder, text_encoder, device=device, verify=verify)
        self.model = loaded.model
        self.metadata = loaded.metadata
        self.manifest = loaded.folder.manifest
        self.lock = RWLock()
        self._snapshot_lock = threading.Lock()
        self._inline: OrderedDict[str, CachedLabels] = OrderedDict()
        self._inline_lock = threading.Lock()
        self.inline_cache_size = inline_cache_size
        self.replayed = self._replay(int(self.manifest.get("applied_seq", 0)))
        for stored in self.metadata.label_sets():
            self.model.register_labels(
                stored.name, LabelSet(tuple(stored.classes), tuple(stored.templates)), stored.embeddings
            )

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

    # -- edits -------------------------------------------------------------------------------------
    def add_pairs(self, pairs: Sequence[NewPair]) -> list[int]:
        if not pairs:
            return []
        img = np.stack([p.image_vec for p in pairs]).astype(np.float32)
        txt = np.stack([p.text_vec for p in pairs]).astype(np.float32)
        with self.lock.write():
            ids = self.metadata.log_add(pairs)
            self.model.add_pairs(np.array(ids, dtype=np.int64), img, txt)
        return ids

    def delete_pairs(self, ids: Sequence[int]) -> list[int]:
        """Delete the pairs that exist; returns the ids actually deleted."""
        with self.lock.write():
            arr = np.unique(np.asarray(ids, dtype=np.int64))
            present = arr[self.model.image_store.contains(arr)]
            if len(present):
                self.metadata.log_delete([int(i) for i in present])
                self.model.remove_pairs(present)
        return [int(i) for i in present]

    def has_pair(self, pair_id: int) -> bool:
        return bool(self.model.image_store.contains(np.array([pair_id]))[0])

    # -- label sets ----------------------------------------------------------------------------------
    def put_label_set(self, name: str, label_set: LabelSet, embeddings: np.ndarray) -> CachedLabels:
        with self.lock.write():
            self.metadata.put_label_set(
                StoredLabelSet(name, list(label_set.classes), list(label_set.templates), embeddings)
            )
            return self.model.register_labels(name, label_set, embeddings)

    def delete_label_set(self, name: str) -> bool:
        with self.lock.write():
            found = self.metadata.delete_label_set(name)
            self.model.label_sets.pop(name, None)
        return found

    def label_set(self, name: str) -> CachedLabels | None:
        return None if name.startswith(INLINE_PREFIX) else self.model.label_sets.get(name)

    def stored_label_sets(self) -> dict[str, CachedLabels]:
        return {k: v for k, v in self.model.label_sets.items() if not k.startswith(INLINE_PREFIX)}

    @staticmethod
    def inline_key(label_set: LabelSet) -> str:
        digest = hashlib.sha256(repr((label_set.classes, label_set.templates)).encode()).hexdigest()[:24]
        return INLINE_PREFIX + digest

    def cached_inline(self, label_set: LabelSet) -> CachedLabels | None:
        key = self.inline_key(label_set)
        with self._inline_lock:
            cached = self._inline.get(key)
            if cached is not None:
                self._inline.move_to_end(key)
            return cached

    def add_inline(self, label_set: LabelSet, embeddings: np.ndarray) -> CachedLabels:
        """Register ad-hoc labels so their cache follows edits; least recently used ones are evicted."""
        key = self.inline_key(label_set)
        with self.lock.write():
            cached = self.model.register_labels(key, label_set, embeddings)
            with self._inline_lock:
                self._inline[key] = cached
                while len(self._inline) > self.inline_cache_size:
                    old, _ = self._inline.popitem(last=False)
                    self.model.label_sets.pop(old, None)
        return cached

    # -- snapshots ------------------------------------------------------------------------------------
    def snapshot(self) -> SnapshotInfo:
        """Write both indices and a new manifest; edits wait, searches go on."""
        with self._snapshot_lock:
            with self.lock.read():
                seq = self.metadata.last_seq()
                manifest = dict(self.manifest)  # kept current by every snapshot
                manifest["applied_seq"] = seq
                manifest["counts"] = dict(manifest.get("counts", {}), pairs=self.model.n_pairs)
                self.manifest = save_index_folder(self.path, self.model.image_store, self.model.text_store, manifest)
            self.metadata.compact_log(seq)
            return SnapshotInfo(int(self.manifest["generation"]), seq, self.model.n_pairs)

    def pending_edits(self) -> int:
        return self.metadata.last_seq() - int(self.manifest.get("applied_seq", 0))

    def close(self) -> None:
        self.metadata.close()
