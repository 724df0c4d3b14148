"""`asif build`'s settings: :class:`BuildConfig` (one field per command-line option) and the served weighting it
names."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from asif.encoders.images import DEFAULT_MAX_PIXELS
from asif.math.relrep import DEFAULT_K, DEFAULT_P, PARAM_NAMES, Weighting
from asif.stores import RERANK_FACTOR
from index_builder.errors import BuildError
from index_builder.sources import SHARD_ROWS


def default_decode_workers() -> int:
    """Decode processes: cores - 1, at least 1, at most 8.

    Measured on 2 cores (bench/build_runtime.py and 2,000-5,000-row Flickr8k builds, a quiet machine): one worker
    decodes, thumbnails and prepares a photo in 1.6-2.2 ms of CPU while ONNX Runtime's effnet-lite0 (2 intra-op
    threads) embeds 135-165 img/s, so the one worker this gives keeps the encoder fed: it waited 0.2-0.3 s of a
    7-20 s embedding step (``StageTimes.wait_seconds``, the report's decode line; mostly the first batch of each
    shard and the worker's start). With 0 workers the encoder alone runs faster (~185 img/s: no process shares its
    cores) but decoding then runs in series with it: the same wall time on Flickr8k's 224 px photos, and slower on
    larger ones. A second worker on 2 cores only competes with the encoder's threads. Larger photos (img2dataset at
    384-512 px, camera photos of several megapixels: 20-100 ms to decode) need more workers on larger machines, up
    to 8; workers not needed stay idle (the build decodes one read batch ahead: at most 16 tasks of 16 images) and
    cost only their memory.
    """
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def weighting_of(kind: str, p: float | None = None, t: float | None = None, r0: float | None = None) -> Weighting:
    """The weighting ``kind`` with its own parameter (power: p, softmax: t, rank: r0; None: its default). A parameter
    given for another weighting is an error."""
    own = PARAM_NAMES.get(kind)
    if own is None:
        raise BuildError(f"unknown weighting {kind!r}; choose one of {', '.join(PARAM_NAMES)}")
    given = {"p": p, "t": t, "r0": r0}
    for name, value in given.items():
        if value is not None and name != own:
            owner = next(w for w, n in PARAM_NAMES.items() if n == name)
            raise BuildError(f"--{name} is the {owner} weighting's parameter; it does not apply to --weighting {kind}")
    return Weighting.of(kind, given[own])


@dataclass
class BuildConfig:
    pairs: str | Path  # a pairs file, or webdataset/parquet shards (brace pattern or glob)
    images_root: Path | None
    out: Path
    image_encoder: str = "effnet-lite2"
    text_encoder: str = "minilm"
    index_type: str = "auto"
    anchors: str = "caption"
    rerank: str | None = "Flat"
    rerank_factor: float = RERANK_FACTOR
    k: int = DEFAULT_K
    p: float = DEFAULT_P  # the power weighting's p (also the served p of requests asking for power without one)
    weighting: str = "power"  # the served default weighting: power (p), softmax (t) or rank (r0)
    t: float | None = None  # softmax temperature (None: its default)
    r0: float | None = None  # rank offset (None: its default)
    auto: bool = False  # choose k and the weighting from the pairs (held-out images' mrr), over k/p/weighting
    auto_fallback: bool = False  # with auto: too few distinct images keeps k/p/weighting (a note) instead of failing
    batch_size: int = 32
    shard_rows: int = SHARD_ROWS  # rows per shard of a pairs file
    image_column: str | None = None  # parquet: default "jpg"; pairs files: default "image"
    caption_column: str | None = None
    key_column: str = "key"
    decode_workers: int = field(default_factory=default_decode_workers)  # processes; 0 decodes in-process
    ray: str | None = None  # Ray address (or "auto", "local"): embed the shards with Ray Data
    device: str | None = None
    runtime: str | None = None  # where the encoders run: auto | onnx | torch (None: $ASIF_RUNTIME or auto)
    quantize: str = "none"  # none | int8: the image encoder quantised (ONNX Runtime), kept in the index folder
    max_pixels: int = DEFAULT_MAX_PIXELS
    force: bool = False
    seed: int = 0
    store: str = "faiss"  # faiss: an index folder at `out`; milvus: a shared model (`out` keeps the work files)
    milvus_uri: str = "milvus.db"
    milvus_prefix: str = "asif"
    milvus_index: str = "FLAT"

    def default_weighting(self) -> Weighting:
        return weighting_of(self.weighting, self.p if self.weighting == "power" else None, self.t, self.r0)
