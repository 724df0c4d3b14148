"""What one evaluation run does (``asif eval``'s options): :class:`EvalConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from asif.stores import RERANK_FACTOR


@dataclass
class EvalConfig:
    test: Path
    out: Path
    index: Path | None = None
    pairs: Path | None = None
    images_root: Path | None = None
    image_encoder: str = "effnet-lite2"
    text_encoder: str = "minilm"
    classes: Path | None = None
    templates: Path | None = None
    anchors: str = "caption"
    index_type: str = "auto"
    rerank_factor: float = RERANK_FACTOR
    rerank: str | None = "Flat"  # re-ranking table of the served path's IVF-PQ stores (Flat, SQfp16, SQ8, ...)
    k: int = 800
    p: float = 8.0
    ks: list[int] = field(default_factory=lambda: [25, 50, 100, 200, 400, 800, 1600])
    ps: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0, 4.0, 6.0, 8.0])
    ts: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1])  # softmax temperatures of --auto
    sizes: list[int] = field(default_factory=lambda: [1000, 2000, 5000, 10000, 20000])
    curve: list[tuple[int, float]] = field(default_factory=lambda: [(800, 8.0), (200, 8.0), (50, 4.0), (800, 1.0)])
    threshold: float | None = None
    auto: bool = False
    seed: int = 0
    batch_size: int = 32
    device: str | None = None
    runtime: str | None = None  # auto | onnx | torch (None: $ASIF_RUNTIME or auto)
    quantize: str = "none"  # int8: the image encoder quantised, calibrated on the anchor images (with --pairs)
    cache_dir: Path | None = None
    store: str = "faiss"  # the served path's anchor store (with --pairs): faiss, or milvus (its FLAT default)
    milvus_uri: str | None = None  # default: a milvus-lite database in the output folder
    milvus_index: str = "FLAT"
    candidates: list[str] = field(default_factory=list)  # training-free variants to compare (evaluation.candidates)
