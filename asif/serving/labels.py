"""Label sets and their cached relative representations over the caption anchors.

A label set is class names x prompt templates. The prompts of one class are combined the
CLIP/LiT way, in embedding space: every prompt is embedded, the class embedding is the
L2-normalised mean of its prompts' embeddings, and the class gets ONE relative
representation computed from that embedding. (Averaging per-prompt relative representations
instead would cost one top-k search per prompt and blur the sparse support.)

The neighbours of the classes among the caption anchors, kept current under edits, are a
:class:`asif.serving.neighbours.NeighbourCache`.
"""

from __future__ import annotations

import string
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from asif.math.relrep import Weighting, as_weighting
from asif.math.scoring import LabelScorer
from asif.serving.neighbours import NeighbourCache, row_pieces

MAX_LABELS = 10_000
MAX_LABEL_CHARS = 1_000

# The seven-template ensemble that CLIP's authors recommend for ImageNet zero-shot, adapted to
# photographs (our anchors are photo captions). Override per label set.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of the {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "itap of a {}.",
)

# CLIP's 80 prompt templates for ImageNet (Radford et al. 2021, the "Prompt Engineering for ImageNet" notebook).
CLIP_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"default": DEFAULT_TEMPLATES, "clip80": CLIP_TEMPLATES}


class LabelError(ValueError):
    """Invalid label set (empty, too many, duplicated labels, bad templates)."""


def _template_ok(template: str) -> bool:
    """Exactly one positional '{}' and otherwise valid format syntax (literal braces as '{{' '}}')."""
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError:  # a lone '{' or '}'
        return False
    return fields == [("", "", None)]


@dataclass(frozen=True)
class LabelSet:
    """Class names and the prompt templates that turn each into text."""

    classes: tuple[str, ...]
    templates: tuple[str, ...] = DEFAULT_TEMPLATES

    def __post_init__(self) -> None:
        classes = tuple(str(c).strip() for c in self.classes)
        if not classes:
            raise LabelError("a label set needs at least one label")
        if len(classes) > MAX_LABELS:
            raise LabelError(f"too many labels: {len(classes)} > {MAX_LABELS}")
        if any(not c for c in classes):
            raise LabelError("labels must be non-empty strings")
        if any(len(c) > MAX_LABEL_CHARS for c in classes):
            raise LabelError(f"labels must be at most {MAX_LABEL_CHARS} characters")
        dupes = sorted({c for c in classes if classes.count(c) > 1}) if len(set(classes)) != len(classes) else []
        if dupes:
            raise LabelError(f"duplicated labels: {dupes[:10]}")
        templates = tuple(self.templates) or ("{}",)
        bad = [t for t in templates if not _template_ok(t)]
        if bad:
            raise LabelError(f"templates must contain exactly one '{{}}' placeholder: {bad[:5]}")
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "templates", templates)

    def prompts(self) -> list[str]:
        """All prompts, class-major: class 0 with every template, then class 1..."""
        return [t.format(c) for c in self.classes for t in self.templates]


def combine_prompt_embeddings(prompt_embeddings: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes * n_templates, d) class-major prompt embeddings -> (n_classes, d) normalised means."""
    emb = np.asarray(prompt_embeddings, dtype=np.float32).reshape(n_classes, -1, prompt_embeddings.shape[-1])
    mean = emb.mean(axis=1)
    norms = np.linalg.norm(mean, axis=1, keepdims=True)
    return (mean / np.maximum(norms, 1e-12)).astype(np.float32)


MAX_SCORERS = 4  # (k, weighting) combinations kept per label set: the model's default plus recent others


@dataclass(eq=False)
class CachedLabels:
    """A label set with its class embeddings, maintained caption-anchor neighbours and scorers.

    ``synced`` is the model edit version the neighbours reflect. Each scorer holds the classes'
    representations for one (k, weighting) and is patched row by row when neighbours change (see
    :mod:`asif.math.scoring`). ``lock`` serialises everything that reads or changes this state.
    """

    label_set: LabelSet
    embeddings: np.ndarray  # (n_classes, d_text)
    neighbours: NeighbourCache
    lock: threading.RLock = field(default_factory=threading.RLock)
    synced: int = 0
    scorers: OrderedDict[tuple[int, Weighting], LabelScorer] = field(default_factory=OrderedDict)
    shared: bool = False  # neighbours are rows of the model's shared table of registered label sets
    pending: np.ndarray | None = None  # (L,) rows whose neighbours changed since the scorers last saw them
    watchers: list[np.ndarray] = field(default_factory=list)  # masks of rows changed, for scorers being built
    inline: bool = False  # an ad-hoc label list in the service's byte-bounded cache

    @property
    def classes(self) -> tuple[str, ...]:
        return self.label_set.classes

    def nbytes(self) -> int:
        """Memory held by the cached state (neighbours, embeddings, scorers)."""
        return int(self.neighbours.nbytes() + self.embeddings.nbytes + sum(s.nbytes() for s in self.scorers.values()))

    def max_k(self) -> int:
        return max((k for k, _ in self.scorers), default=0)

    def scorer(self, k: int, weighting: Weighting | float, pinned: tuple[int, Weighting] | None = None) -> LabelScorer:
        """The scorer for (k, weighting), made from the neighbours if new (call with ``k <= neighbours.depth``
        after :meth:`NeighbourCache.ensure`). ``pinned`` (the model's default) is never evicted."""
        key = (int(k), as_weighting(weighting))
        found = self.scorers.get(key)
        if found is not None:
            self.scorers.move_to_end(key)
            return found
        sims, ids = self.neighbours.topk(key[0])
        return self.add_scorer(key, LabelScorer(key[0], key[1], sims, ids), pinned)

    def add_scorer(
        self, key: tuple[int, Weighting], scorer: LabelScorer, pinned: tuple[int, Weighting] | None = None
    ) -> LabelScorer:
        """Keep a scorer made for ``key`` (current with the neighbours), evicting the least recently used beyond
        MAX_SCORERS (never ``pinned``)."""
        self.scorers[key] = scorer
        self.scorers.move_to_end(key)
        for old in list(self.scorers):
            if len(self.scorers) <= MAX_SCORERS:
                break
            if old != pinned and old != key:
                del self.scorers[old]
        return scorer

    def watch(self) -> np.ndarray:
        """A mask of the rows that change from now on (a scorer being built from a copy needs them): pass it to
        :meth:`unwatch` to stop."""
        mask = np.zeros(len(self.embeddings), dtype=bool)
        self.watchers.append(mask)
        return mask

    def unwatch(self, mask: np.ndarray) -> np.ndarray:
        self.watchers = [m for m in self.watchers if m is not mask]
        return mask

    def mark_changed(self, rows: np.ndarray) -> None:
        """Neighbour rows changed: note them; scorers are patched by :meth:`flush` (when the set is next used)."""
        if len(rows):
            if self.pending is None:
                self.pending = np.zeros(len(self.embeddings), dtype=bool)
            self.pending[rows] = True

    def flush(self) -> None:
        """Patch the scorers with the rows noted by :meth:`mark_changed`."""
        if self.pending is not None and self.pending.any():
            rows = np.flatnonzero(self.pending)
            self.pending[:] = False
            self.rows_changed(rows)

    def rows_changed(self, rows: np.ndarray) -> None:
        """Neighbour rows changed: patch every scorer's representations of those rows."""
        if len(rows) == 0:
            return
        rows = np.unique(rows)
        for mask in self.watchers:
            mask[rows] = True
        for s in self.scorers.values():
            sims, ids = self.neighbours.topk(s.k)
            for part in row_pieces(rows, s.k):
                s.update(part, sims[part], ids[part])

    def reset(self, neighbours: NeighbourCache, synced: int) -> None:
        """Replace the neighbours (all rows recomputed): scorers are rebuilt on next use."""
        self.neighbours = neighbours
        self.synced = synced
        self.scorers.clear()
        self.pending = None
        for mask in self.watchers:
            mask[:] = True


def labels_from_names(names: Sequence[str], templates: Sequence[str] | None = None) -> LabelSet:
    return LabelSet(tuple(names), tuple(templates) if templates else DEFAULT_TEMPLATES)
