"""Shared fixtures: seeded synthetic paired embeddings and models built on them."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from asif.synthetic import SyntheticWorld


def random_unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def small_world() -> SyntheticWorld:
    return SyntheticWorld(d_image=48, d_text=32, n_classes=12, latent_dim=12, seed=7)


@pytest.fixture(scope="session")
def recall_setup() -> dict:
    """50,000 clustered synthetic pairs in IVF-PQ stores (built once per session)."""
    from asif.store import build_store, choose_index_spec

    world = SyntheticWorld(d_image=256, d_text=128, n_classes=100, seed=3)
    data = world.pairs(50_000, n_queries=200)
    ids = np.arange(50_000, dtype=np.int64)
    out = {"data": data}
    for name, anchors, queries in [
        ("image", data.image_anchors, data.image_queries),
        ("text", data.text_anchors, data.label_queries),
    ]:
        store = build_store(anchors, ids, choose_index_spec(len(anchors), anchors.shape[1], "ivfpq"))
        out[name] = (store, anchors, queries)
    return out
