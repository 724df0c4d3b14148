"""An ASIF model: two anchor stores (images, captions) sharing pair ids, plus cached label sets.

Works on embeddings; encoders are applied by the caller (the service batches them) or through
the ``*_images`` / ``*_texts`` conveniences when encoders are attached.

Edits and label sets. Every edit bumps ``version`` and is kept in a short journal (the ids, and the
caption vectors of adds). A label set's state (neighbours, scorers) records the version it reflects
and catches up by replaying the journal: registered label sets right away, inside the edit; others
(ad-hoc label lists) when next used. Catching up costs what the edits changed; a label set that fell
off the journal is recomputed (:mod:`asif.serving.journal`, :mod:`asif.serving.label_upkeep`).

Concurrency: searches may run in parallel; edits need exclusion (the service wraps the model in a
readers-writer lock). Each label set's state has its own lock, so concurrent readers of one label
set take turns on its (short) scoring step while image searches run in parallel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
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
    shared_anchors,
    sparsify,
)
from asif.math.topk import effective_k
from asif.math.variants import Balance
from asif.serving.journal import JOURNAL_BYTES, EditJournal, JournalEntry
from asif.serving.label_upkeep import LABEL_CHUNK, Guard, LabelUpkeep
from asif.serving.labels import CachedLabels, LabelSet, combine_prompt_embeddings
from asif.serving.neighbours import cache_depth
from asif.stores import StoreError, VectorStore, as_matrix

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


class AsifModel(LabelUpkeep):
    """Queries against the anchors (relative representations, similarity, classification) and edits of the pairs;
    the label sets' state is kept current by its base class, :class:`asif.serving.label_upkeep.LabelUpkeep`."""

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
        self.journal = EditJournal(journal_bytes)
        self._init_upkeep()

    @property
    def n_pairs(self) -> int:
        return self.image_store.ntotal

    @property
    def version(self) -> int:
        """Bumped by every edit (the journal's newest entry)."""
        return self.journal.version

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
