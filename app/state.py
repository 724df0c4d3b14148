"""Everything the routes share: settings, the live model, encoder batchers, metrics."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
from PIL import Image
from starlette.concurrency import run_in_threadpool

from app.batching import MicroBatcher
from app.core.config import Settings
from app.metrics import Metrics
from asif.serving.labels import CachedLabels, LabelSet, combine_prompt_embeddings
from asif.serving.live import LiveModel


@dataclass
class AppState:
    settings: Settings
    live: LiveModel
    images: MicroBatcher[Image.Image]
    texts: MicroBatcher[str]
    metrics: Metrics
    ready: bool = False
    _label_builds: asyncio.Semaphore | None = None

    async def embed_labels(self, label_set: LabelSet) -> np.ndarray:
        prompts = await self.texts.encode(label_set.prompts())
        return combine_prompt_embeddings(prompts, len(label_set.classes))

    async def inline_labels(self, label_set: LabelSet) -> CachedLabels:
        """An ad-hoc label list's state: from the cache, or built (at most ``max_concurrent_label_builds`` at once,
        process-wide: a build's embeddings and neighbour tables are the largest transient an anonymous request
        makes)."""
        cached = await run_in_threadpool(self.live.cached_inline, label_set)
        if cached is not None:
            return cached
        if self._label_builds is None:
            self._label_builds = asyncio.Semaphore(self.settings.max_concurrent_label_builds)
        async with self._label_builds:
            cached = await run_in_threadpool(self.live.cached_inline, label_set)  # built while this one waited?
            if cached is None:
                embeddings = await self.embed_labels(label_set)
                cached = await run_in_threadpool(self.live.add_inline, label_set, embeddings)
        return cached

    def refresh_gauges(self) -> None:
        self.metrics.pairs.set(self.live.model.n_pairs)
        self.metrics.pending_edits.set(self.live.pending_edits())

    def close(self) -> None:
        self.images.close()
        self.texts.close()
