"""Seeded synthetic paired embeddings that look like real ones (clustered, L2-normalised).

A shared latent variable (a mixture of clusters in a small space) is mapped to the image and
text spaces by two fixed random linear maps plus independent noise, so image anchor i and
caption anchor i describe the same thing and ASIF can classify synthetic "images" into the
synthetic "classes" (cluster centres seen from the text side). Used by tests and benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from asif.math.normalise import l2_normalise


@dataclass(frozen=True)
class SyntheticPairs:
    image_anchors: np.ndarray  # (n, d_image)
    text_anchors: np.ndarray  # (n, d_text)
    image_queries: np.ndarray  # (q, d_image)
    query_classes: np.ndarray  # (q,) true class of each query
    label_queries: np.ndarray  # (c, d_text) one text embedding per class


class SyntheticWorld:
    """Generator of paired anchors; ``pairs(n)`` draws n more from the same world."""

    def __init__(
        self,
        d_image: int = 1280,
        d_text: int = 384,
        n_classes: int = 100,
        latent_dim: int = 48,
        noise: float = 0.5,
        spread: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.rng = np.random.default_rng(seed)
        self.n_classes = n_classes
        self.latent_dim = latent_dim
        self.noise = noise
        self.spread = spread
        self.centres = self.rng.standard_normal((n_classes, latent_dim)).astype(np.float32)
        self.w_image = self.rng.standard_normal((latent_dim, d_image)).astype(np.float32) / np.sqrt(latent_dim)
        self.w_text = self.rng.standard_normal((latent_dim, d_text)).astype(np.float32) / np.sqrt(latent_dim)
        self.d_image, self.d_text = d_image, d_text

    def _latent(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        cls = self.rng.integers(0, self.n_classes, size=n)
        z = self.centres[cls] + self.spread * self.rng.standard_normal((n, self.latent_dim)).astype(np.float32)
        return z, cls

    def _observe(self, z: np.ndarray, w: np.ndarray) -> np.ndarray:
        x = z @ w
        x += (
            self.noise
            * self.rng.standard_normal(x.shape).astype(np.float32)
            * np.sqrt((x**2).mean(axis=1, keepdims=True))
        )
        return l2_normalise(x)

    def anchors(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        z, _ = self._latent(n)
        return self._observe(z, self.w_image), self._observe(z, self.w_text)

    def queries(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        z, cls = self._latent(n)
        return self._observe(z, self.w_image), cls

    def labels(self) -> np.ndarray:
        return self._observe(self.centres, self.w_text)

    def pairs(self, n: int, n_queries: int = 200) -> SyntheticPairs:
        img, txt = self.anchors(n)
        q, cls = self.queries(n_queries)
        return SyntheticPairs(img, txt, q, cls, self.labels())
