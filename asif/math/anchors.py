"""Forming anchors from embedded rows, when an image has several captions.

- ``image``: one anchor per image; its text side is the L2-normalised mean of its captions' embeddings.
- ``caption``: one anchor per caption; the image embedding is repeated for each of its captions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from asif.math.normalise import l2_normalise

ANCHOR_MODES = ("image", "caption")


def form_anchors(
    mode: str,
    row_image: np.ndarray,
    caption_emb: np.ndarray,
    image_emb: np.ndarray,
    image_ok: np.ndarray,
    captions: Sequence[str],
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, list[str]]]]:
    """Anchors from embedded rows: (image vectors, text vectors, [(image index, captions)])."""
    usable = image_ok[row_image]
    if mode == "caption":
        rows = np.flatnonzero(usable)
        return image_emb[row_image[rows]], caption_emb[rows], [(int(row_image[r]), [captions[r]]) for r in rows]
    if mode != "image":
        raise ValueError(f"unknown anchor mode {mode!r}; choose one of {ANCHOR_MODES}")
    by_image: dict[int, list[int]] = {}
    for r in np.flatnonzero(usable):
        by_image.setdefault(int(row_image[r]), []).append(int(r))
    images = sorted(by_image)
    text = np.stack([caption_emb[by_image[i]].mean(axis=0) for i in images]) if images else caption_emb[:0]
    meta = [(i, [captions[r] for r in by_image[i]]) for i in images]
    return image_emb[images], l2_normalise(text), meta
