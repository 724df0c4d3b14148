"""An ASIF model: two anchor stores (images, captions) sharing pair ids, plus cached label sets.

Works on embeddings; encoders are applied by the caller (the service batches them) or through
the ``*_images`` / ``*_texts`` conveniences when encoders are attached. Not thread-safe on its
own: the service wraps it in a readers-writer lock (many searches, one edit).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from asif.encoders.base import ImageEncoder, TextEncoder
from asif.labels import CachedLabels, LabelSet, NeighbourCache, cache_depth, combine_prompt_embeddings
from asif.relrep import DEFAULT_K, DEFAULT_P, KeyMatrix, SparseRR, check_k_p, effective_k, shared_anchors, sparsify
from asif.store import AnchorStore, StoreError

UNKNOWN = "unknown"

CaptionLookup = Callable[[Sequence[int]], dict[int, str]]


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
        image_store: AnchorStore,
        text_store: AnchorStore,
        k: int = DEFAULT_K,
        p: float = DEFAULT_P,
        image_encoder: ImageEncoder | None = None,
        text_encoder: TextEncoder | None = None,
        captions: CaptionLookup | None = None,
    ) -> None:
        check_k_p(k, p)
        if image_store.ntotal != text_store.ntotal:
            raise StoreError(f"image index holds {image_store.ntotal} anchors, caption index {text_store.ntotal}")
        self.image_store = image_store
        self.text_store = text_store
        self.k = int(k)
        self.p = float(p)
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.captions = captions
        self.label_sets: dict[str, CachedLabels] = {}
        self.version = 0  # bumped by every edit; registered label sets are kept in step with it

    @property
    def n_pairs(self) -> int:
        return self.image_store.ntotal

    def _kp(self, k: int | None, p: float | None) -> tuple[int, float]:
        k = self.k if k is None else k
        p = self.p if p is None else p
        check_k_p(k, p)
        return effective_k(k, self.n_pairs), float(p)

    # -- relative representations ---------------------------------------------------------------
    def image_relrep(self, embeddings: np.ndarray, k: int | None = None, p: float | None = None) -> SparseRR:
        k, p = self._kp(k, p)
        sims, ids = self.image_store.search(embeddings, k)
        return sparsify(sims, ids, p)

    def text_relrep(self, embeddings: np.ndarray, k: int | None = None, p: float | None = None) -> SparseRR:
        k, p = self._kp(k, p)
        sims, ids = self.text_store.search(embeddings, k)
        return sparsify(sims, ids, p)

    def similarity(
        self, image_embeddings: np.ndarray, text_embeddings: np.ndarray, k: int | None = None, p: float | None = None
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

    def make_labels(self, label_set: LabelSet, embeddings: np.ndarray | None = None) -> CachedLabels:
        """Label set -> cached representation over the caption anchors (not registered)."""
        emb = self.embed_labels(label_set) if embeddings is None else np.asarray(embeddings, dtype=np.float32)
        if emb.shape != (len(label_set.classes), self.text_store.dim):
            raise ValueError(f"label embeddings must be ({len(label_set.classes)}, {self.text_store.dim})")
        cache = NeighbourCache(emb, depth=cache_depth(self.k))
        cache.fill(np.arange(len(emb)), self.text_store.search, self.n_pairs)
        return CachedLabels(label_set, emb, cache, synced=self.version)

    def register_labels(self, name: str, label_set: LabelSet, embeddings: np.ndarray | None = None) -> CachedLabels:
        """Add (or replace) a named label set whose representations follow every edit."""
        cached = self.make_labels(label_set, embeddings)
        self.label_sets[name] = cached
        return cached

    def _label_keys(self, labels: CachedLabels, k: int, p: float) -> tuple[KeyMatrix, SparseRR]:
        with labels.lock:  # concurrent readers may share a label set; refills and memos are lazy
            if labels.neighbours.depth < k or labels.synced != self.version:
                # Deeper k than cached, or labels that missed edits (not registered): start afresh.
                labels.neighbours = NeighbourCache(labels.embeddings, depth=cache_depth(max(k, self.k)))
                labels.synced = self.version
            labels.neighbours.ensure(k, self.text_store.search, self.n_pairs)
            return labels.key_matrix(k, p), labels.relrep(k, p)

    # -- classification -------------------------------------------------------------------------
    def classify(
        self,
        image_embeddings: np.ndarray,
        labels: CachedLabels,
        k: int | None = None,
        p: float | None = None,
        top: int = 5,
        threshold: float = 0.0,
        explain: int = 0,
    ) -> list[Prediction]:
        """Classify a batch of image embeddings; ``explain`` = how many contributing anchors to return."""
        k, p = self._kp(k, p)
        keys, label_rr = self._label_keys(labels, k, p)
        image_rr = self.image_relrep(image_embeddings, k, p)
        scores = keys.score(image_rr)
        top = max(1, min(int(top), scores.shape[1]))
        order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
        wanted_ids: list[int] = []
        raw: list[tuple[list[tuple[str, float]], bool, np.ndarray, np.ndarray]] = []
        for b in range(len(image_rr)):
            ranked = [(labels.classes[j], float(scores[b, j])) for j in order[b]]
            best = int(order[b, 0])
            unknown = scores[b, best] <= 0.0 or scores[b, best] < threshold
            ids, contrib = np.zeros(0, np.int64), np.zeros(0)
            if explain > 0 and scores[b, best] > 0:
                ids, contrib = shared_anchors(
                    image_rr.ids[b], image_rr.weights[b], label_rr.ids[best], label_rr.weights[best]
                )
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
        self, images: Sequence[Image.Image], labels: CachedLabels, **options: object
    ) -> list[Prediction]:
        if self.image_encoder is None:
            raise RuntimeError("no image encoder attached")
        return self.classify(self.image_encoder.encode(images), labels, **options)  # type: ignore[arg-type]

    # -- edits ----------------------------------------------------------------------------------
    def add_pairs(self, ids: np.ndarray, image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> None:
        """Add pairs to both stores and update every registered label set's neighbours."""
        ids = np.asarray(ids, dtype=np.int64)
        if not (len(ids) == len(image_embeddings) == len(text_embeddings)):
            raise StoreError("ids, image and text embeddings must have the same length")
        n_before = self.n_pairs
        self.image_store.add(ids, image_embeddings)
        try:
            self.text_store.add(ids, text_embeddings)
        except Exception:
            self.image_store.remove(ids)  # keep the two stores in step
            raise
        self.version += 1
        for cached in self.label_sets.values():
            with cached.lock:
                cached.neighbours.add(ids, text_embeddings, n_before)
                cached.synced = self.version

    def remove_pairs(self, ids: np.ndarray) -> int:
        """Remove pairs by id from both stores and every label set; returns how many were present."""
        ids = np.asarray(ids, dtype=np.int64)
        present = ids[self.image_store.contains(ids)]
        if len(present) == 0:
            return 0
        self.image_store.remove(present)
        self.text_store.remove(present)
        self.version += 1
        for cached in self.label_sets.values():
            with cached.lock:
                cached.neighbours.remove(present)
                cached.neighbours.ensure(self.k, self.text_store.search, self.n_pairs)
                cached.synced = self.version
        return len(present)
