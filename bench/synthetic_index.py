"""The seeded synthetic index of the benches (the live-traffic bench, e2e's synthetic sizes): an index folder of n
clustered synthetic pairs (1280-d images, 384-d captions) written straight from embeddings, the bench encoders its
manifest names, the label sets' class embeddings, and the byte counts of an index folder's files."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from asif.encoders.base import EncoderIdentity, ImageEncoder, TextEncoder
from asif.serving.labels import DEFAULT_TEMPLATES, combine_prompt_embeddings
from asif.state.metadata import PairMetadata
from asif.state.persist import save_index_folder
from asif.stores import FaissStore, choose_index_spec
from asif.tuning.synthetic import SyntheticWorld
from bench.measure import rss_mb

K, P = 800, 8.0
D_IMAGE, D_TEXT = 1280, 384
N_CLASSES = 100


class BenchImageEncoder(ImageEncoder):
    """Identity of the bench's image embeddings; never called (the bench passes embeddings)."""

    def __init__(self) -> None:
        self.identity = EncoderIdentity(
            "py:bench.synthetic_index:BenchImageEncoder", "bench-image", "image", D_IMAGE, {}
        )

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        raise NotImplementedError("the bench works on embeddings")


class BenchTextEncoder(TextEncoder):
    """Identity of the bench's caption embeddings; never called."""

    def __init__(self) -> None:
        self.identity = EncoderIdentity("py:bench.synthetic_index:BenchTextEncoder", "bench-text", "text", D_TEXT, {})

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError("the bench works on embeddings")


# -- helpers -------------------------------------------------------------------------------------------
def file_bytes(folder: Path, names: Sequence[str]) -> int:
    return int(sum((folder / name).stat().st_size for name in names))


def generation_files(manifest: dict[str, Any]) -> list[str]:
    """The base files of the manifest's generation (indices and re-ranking tables)."""
    return [name for entry in manifest["indices"].values() for name in entry["sha256"]]


def label_embeddings(world: SyntheticWorld, rng: np.random.Generator) -> np.ndarray:
    """One label set's class embeddings: each class's 7 noisy prompt embeddings, combined (as bench/run.py)."""
    n_templates = len(DEFAULT_TEMPLATES)
    centres = world.centres[:, None, :] + 0.3 * rng.standard_normal((N_CLASSES, n_templates, world.latent_dim)).astype(
        np.float32
    )
    prompts = world._observe(centres.reshape(N_CLASSES * n_templates, -1), world.w_text)
    return combine_prompt_embeddings(prompts, N_CLASSES)


# -- the index folder ----------------------------------------------------------------------------------
def write_index(folder: Path, world: SyntheticWorld, n: int, chunk: int = 100_000) -> dict[str, Any]:
    """Write an index folder of n synthetic pairs (ids 0..n-1), generated and added in chunks."""
    t0 = time.perf_counter()
    specs = {"image": choose_index_spec(n, D_IMAGE), "text": choose_index_spec(n, D_TEXT)}
    stores = {role: FaissStore(dim, specs[role]) for role, dim in (("image", D_IMAGE), ("text", D_TEXT))}
    first = min(n, max(chunk, *(s.train_size for s in specs.values())))
    timings = {"generate_s": 0.0, "train_s": 0.0, "add_s": 0.0}
    start = 0
    while start < n:
        size = first if start == 0 else min(chunk, n - start)
        t = time.perf_counter()
        img, txt = world.anchors(size)
        timings["generate_s"] += time.perf_counter() - t
        ids = np.arange(start, start + size, dtype=np.int64)
        for role, x in (("image", img), ("text", txt)):
            store = stores[role]
            if not store.is_trained:
                t = time.perf_counter()
                n_train = min(size, max(specs[role].train_size, 1))
                sample = x if n_train >= size else x[np.random.default_rng(0).choice(size, n_train, replace=False)]
                store.train(sample)
                timings["train_s"] += time.perf_counter() - t
            t = time.perf_counter()
            store.add(ids, x)
            timings["add_s"] += time.perf_counter() - t
        del img, txt
        start += size
    t = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    metadata = PairMetadata(folder / "pairs.sqlite")
    metadata.insert_pairs((i, f"img{i}.jpg", [f"caption {i}"]) for i in range(n))  # one transaction
    metadata.set_meta("next_pair_id", str(n))
    metadata.close()
    manifest = {
        "image_encoder": BenchImageEncoder().identity.to_dict(),
        "text_encoder": BenchTextEncoder().identity.to_dict(),
        "anchors": "caption",
        "defaults": {"k": K, "p": P},
        "metadata": "pairs.sqlite",
        "counts": {"pairs": n},
    }
    saved = save_index_folder(folder, stores["image"], stores["text"], manifest)
    timings["save_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    return {
        "index": {"image": specs["image"].factory, "text": specs["text"].factory, "refine": specs["image"].refine},
        "timings": timings,
        "base_bytes": file_bytes(folder, generation_files(saved)),
        "rss_mb_with_stores": rss_mb(),
    }
