"""Shared fixtures: seeded synthetic paired embeddings and models built on them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from asif.tuning.synthetic import SyntheticWorld
from tests.servers import free_port


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
    from asif.stores import build_store, choose_index_spec

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


# ---------------------------------------------------------------------------------------------
# Fast deterministic encoders and a tiny on-disk pair collection, for builder and service tests.

from asif.encoders.base import EncoderIdentity, ImageEncoder, TextEncoder  # noqa: E402
from asif.math.normalise import l2_normalise  # noqa: E402


class PixelEncoder(ImageEncoder):
    """Image -> its 4x4 RGB thumbnail (48-d), centred and normalised. Counts calls."""

    def __init__(self) -> None:
        self.identity = EncoderIdentity("py:tests.conftest:PixelEncoder", "pixels-4x4", "image", 48, {"size": 4})
        self.calls = 0
        self.fail_after: int | None = None

    def prepare(self, image):
        # What the network takes, made before batching (as a real encoder's 224x224 tensor): the 4x4 thumbnail, so
        # that served requests do not keep whole decoded images until they are encoded.
        return image.convert("RGB").resize((4, 4))

    def encode(self, images):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        rows = [np.asarray(im.convert("RGB").resize((4, 4)), dtype=np.float32).ravel() - 127.5 for im in images]
        return l2_normalise(np.stack(rows)) if rows else np.zeros((0, 48), np.float32)


class SlowPixelEncoder(PixelEncoder):
    """PixelEncoder that takes 50 ms per call: lets tests kill a build or load a server mid-way."""

    def encode(self, images):
        import time

        time.sleep(0.05)
        return super().encode(images)


class HashTextEncoder(TextEncoder):
    """Text -> hashed bag of words (64-d), normalised."""

    def __init__(self) -> None:
        self.identity = EncoderIdentity("py:tests.conftest:HashTextEncoder", "hash-bow", "text", 64, {})

    def encode(self, texts):
        import zlib

        out = np.zeros((len(texts), 64), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, zlib.crc32(w.encode()) % 64] += 1.0
        return l2_normalise(out + 1e-3)


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def write_pair_collection(root, n_per_colour: int = 5, seed: int = 0):
    """Solid-ish coloured JPEGs with captions naming the colour; returns (images_root, csv path)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = ["image,caption"]
    for colour, rgb in COLOURS.items():
        for j in range(n_per_colour):
            arr = np.clip(np.array(rgb) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
            name = f"{colour}_{j}.jpg"
            Image.fromarray(arr).save(images / name)
            lines.append(f"{name},a {colour} square number {j}")
            lines.append(f'{name},"something {colour}, painted"')
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return images, root / "pairs.csv"


@pytest.fixture
def pixel_encoder() -> PixelEncoder:
    return PixelEncoder()


@pytest.fixture
def hash_encoder() -> HashTextEncoder:
    return HashTextEncoder()


# ---------------------------------------------------------------------------------------------
# The service on a tiny index built with the fast encoders.


@dataclass(frozen=True)
class MilvusTarget:
    """A shared model in a milvus-lite database (what `asif build --store milvus` writes)."""

    uri: str
    prefix: str = "asif"


def build_colours(tmp_path, store: str = "faiss"):
    """The 20-image colour collection (two captions each) built with the fast test encoders into an index folder
    (store faiss) or a milvus-lite database (store milvus); returns (index folder or MilvusTarget, images root)."""
    from index_builder.build import BuildConfig, run_build

    images, pairs = write_pair_collection(tmp_path / "data")
    out = tmp_path / "index"
    target = out if store == "faiss" else MilvusTarget(str(tmp_path / "milvus.db"))
    extra = {} if store == "faiss" else {"store": "milvus", "milvus_uri": target.uri}
    config = BuildConfig(pairs=pairs, images_root=images, out=out, k=10, anchors="image", **extra)
    run_build(config, PixelEncoder(), HashTextEncoder())
    return target, images


@pytest.fixture
def built_index(tmp_path):
    """The colour collection in an index folder (tests of the single-process store's own behaviour)."""
    return build_colours(tmp_path)


@pytest.fixture(params=["faiss", "milvus"])
def served_index(request, tmp_path):
    """The colour collection in each store: the tests that take it run against both."""
    return build_colours(tmp_path, request.param)


def open_live(target, image_encoder=None, text_encoder=None):
    """The live model over an index folder, or a replica over a shared model in Milvus; fast test encoders."""
    image_encoder, text_encoder = image_encoder or PixelEncoder(), text_encoder or HashTextEncoder()
    if isinstance(target, MilvusTarget):
        from pymilvus import MilvusClient

        from asif.serving.shared_loading import open_shared

        return open_shared(MilvusClient(target.uri), target.prefix, image_encoder, text_encoder)
    from asif.serving.live import LiveModel

    return LiveModel(target, image_encoder, text_encoder)


def make_client(target, image_encoder=None, **settings):
    """A TestClient over an index folder, or over a shared model in Milvus (a new replica each time)."""
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app

    common = {"batch_max_wait_ms": 1, "snapshot_interval_s": 3600, **settings}
    if isinstance(target, MilvusTarget):
        cfg = Settings(store="milvus", milvus_uri=target.uri, milvus_prefix=target.prefix, **common)
    else:
        cfg = Settings(index=target, **common)
    return TestClient(create_app(cfg, live_factory=lambda s: open_live(target, image_encoder)))


@pytest.fixture
def client(served_index):
    with make_client(served_index[0]) as c:
        yield c


# ---------------------------------------------------------------------------------------------
# An index folder written straight from random embeddings (no ties), for live-model tests.


def write_synthetic_index(
    folder, n: int = 300, seed: int = 0, k: int = 30, p: float = 8.0, index_type: str = "flat", refine: str = "Flat"
):
    """An index folder of n random pairs whose encoder identities are the fast test encoders' (48-d images,
    64-d captions); returns (image anchors, caption anchors), row i = pair i."""
    from asif.state.metadata import PairMetadata
    from asif.state.persist import save_index_folder
    from asif.stores import build_store, choose_index_spec

    rng = np.random.default_rng(seed)
    img, txt = random_unit(rng, n, 48), random_unit(rng, n, 64)
    ids = np.arange(n, dtype=np.int64)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = PairMetadata(folder / "pairs.sqlite")
    metadata.insert_pairs((i, f"img{i}.jpg", [f"caption {i}"]) for i in range(n))
    metadata.set_meta("next_pair_id", str(n))
    metadata.close()
    manifest = {
        "image_encoder": PixelEncoder().identity.to_dict(),
        "text_encoder": HashTextEncoder().identity.to_dict(),
        "anchors": "caption",
        "defaults": {"k": k, "p": p},
        "metadata": "pairs.sqlite",
        "counts": {"pairs": n},
    }
    stores = [build_store(x, ids, choose_index_spec(n, x.shape[1], index_type, refine=refine)) for x in (img, txt)]
    save_index_folder(folder, stores[0], stores[1], manifest)
    return img, txt


@pytest.fixture
def milvus_server(tmp_path):
    """`milvus-lite server` on a free loopback port (its own data folder); yields its URI."""
    exe = shutil.which("milvus-lite") or str(Path(sys.executable).parent / "milvus-lite")
    port = free_port()
    log = open(tmp_path / "milvus.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [exe, "server", "--data-dir", str(tmp_path / "milvus"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    from pymilvus import MilvusClient

    for _ in range(120):
        try:
            MilvusClient(uri, timeout=2).list_collections()
            break
        except Exception:
            if proc.poll() is not None:
                raise AssertionError((tmp_path / "milvus.log").read_text()) from None
            time.sleep(0.5)
    else:
        raise AssertionError("milvus-lite server did not answer")
    yield uri
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
