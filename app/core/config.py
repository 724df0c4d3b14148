"""Service configuration: one pydantic-settings class, environment variables prefixed ASIF_."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from asif.state.milvus_meta import PREFIX_PATTERN


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ASIF_", env_file=None, extra="ignore")

    index: Path = Field(Path("index"), description="index folder written by `asif build` (store faiss)")
    store: Literal["faiss", "milvus"] = Field(
        "faiss", description="faiss: the index folder, one process; milvus: shared state in Milvus, many replicas"
    )
    milvus_uri: str = Field("milvus.db", description="store milvus: a server URI (http://host:19530) or a lite file")
    milvus_prefix: str = Field("asif", pattern=PREFIX_PATTERN, description="store milvus: collection name prefix")
    milvus_index: str = Field("FLAT", description="store milvus: index type and options, e.g. HNSW:M=16,ef=1024")
    milvus_pending_timeout_s: float = Field(
        60.0,
        gt=0,
        description="store milvus: edits a replica recorded but never committed (it died) are settled "
        "from the stores' state after this long",
    )
    image_encoder: str | None = Field(None, description="override the manifest's image encoder spec")
    text_encoder: str | None = Field(None, description="override the manifest's text encoder spec")
    device: str | None = Field(None, description="cuda | cpu; default: cuda when available")
    runtime: Literal["auto", "onnx", "torch"] = Field(
        "auto", description="where the encoders run: auto (ONNX Runtime on CPU, torch on CUDA), onnx or torch"
    )
    verify_checksums: bool = True

    api_key: SecretStr | None = Field(None, description="when set, write endpoints need 'Authorization: Bearer <key>'")
    open_writes: bool = Field(
        False,
        description="without api_key, let `asif serve` bind a non-loopback host with write endpoints open to anyone "
        "(on purpose; without it such a server refuses to start)",
    )

    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="largest accepted image (bytes)")
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1, description="largest accepted request body (bytes)")
    max_pixels: int = Field(40_000_000, ge=1, description="largest accepted image (width x height)")
    max_images: int = Field(64, ge=1, description="images per classify/similarity request")
    max_request_pixels: int = Field(
        256_000_000, ge=1, description="pixels a request's images may decode to, together (large JPEGs count shrunk)"
    )
    max_concurrent_decodes: int = Field(
        2, ge=1, description="images decoded at once, process-wide (each may take up to max_pixels x 4 bytes)"
    )
    max_concurrent_label_builds: int = Field(
        1, ge=1, description="ad-hoc label lists not in the cache built at once, process-wide (others wait)"
    )
    max_body_bytes_in_flight: int = Field(
        128 * 1024 * 1024, ge=1, description="request body bytes held at once, process-wide (503 past it)"
    )
    max_decode_pixels: int = Field(
        48_000_000,
        ge=1,
        description="pixels being decoded at once, process-wide (4 bytes each); a larger image "
        "waits until it decodes alone",
    )
    max_texts: int = Field(1024, ge=1, description="texts per similarity request")
    max_labels: int = Field(10_000, ge=1, le=10_000, description="labels per label set")
    max_templates: int = Field(100, ge=1, description="prompt templates per label set (CLIP's ImageNet set has 80)")
    max_prompts: int = Field(
        70_000, ge=1, description="labels x templates per label set: each prompt is one text encoding"
    )
    max_caption_chars: int = Field(2_000, ge=1)
    max_pairs_per_request: int = Field(256, ge=1)
    max_k: int = Field(10_000, ge=1, description="largest k a request may ask (k is also capped at the pairs)")
    max_p: float = Field(64.0, gt=0)
    max_label_entries: int = Field(
        2_000_000,
        ge=1,
        description="largest k x labels a classification may ask (its label representations' entries, ~30 bytes "
        "each); a stored label set at the index's default k is exempt (it was made when stored)",
    )

    batch_max_size: int = Field(32, ge=1, description="encoder micro-batch size")
    batch_max_wait_ms: float = Field(
        0.0, ge=0, description="how long a micro-batch waits to fill (0: never; requests queued meanwhile batch)"
    )
    max_queue: int = Field(1024, ge=1, description="items waiting for an encoder before requests get 503")
    request_timeout_s: float = Field(30.0, gt=0, description="longest wait for an encoder before a 503")
    inline_label_cache_mb: float = Field(
        64.0, ge=0, description="memory for ad-hoc label lists' cached representations (MiB; least recently used go)"
    )
    release_large_frees: bool = Field(
        True, description="glibc: blocks of 1 MiB or more are mapped on their own and unmapped when freed"
    )
    numpy_huge_pages: bool = Field(
        False, description="let numpy ask for transparent huge pages on large arrays (numpy's default; off here)"
    )

    snapshot_interval_s: float = Field(300.0, gt=0, description="how often pending edits are snapshotted")
    compact_ratio: float = Field(
        0.25, gt=0, description="write a new base generation once snapshot deltas touch this fraction of the pairs"
    )
    # Threads, chosen for small machines (docs/api.md, "Threads"): the encoders' intra-op pools use every core,
    # one encoder call at a time per encoder; everything else (FAISS, BLAS) is one thread per request.
    encoder_threads: int = Field(max(1, (os.cpu_count() or 1)), ge=1, description="ONNX Runtime / torch threads")
    encoder_spinning: bool = Field(
        False, description="ONNX Runtime's threads spin between parallel sections (lower latency alone, CPU burnt)"
    )
    torch_threads: int = Field(max(1, (os.cpu_count() or 1)), ge=1)
    # One FAISS thread per search: the service already runs searches of concurrent requests in parallel, and
    # FAISS's OpenMP threads fighting other busy threads made single-image searches ~9x slower (bench/run.py).
    faiss_threads: int = Field(1, ge=1)
    # numpy's BLAS (OpenBLAS) threads: the service runs many small products from several threads at once (label
    # sets following edits, scoring); a BLAS pool per product fought them for the 2 cores here and doubled p99.
    blas_threads: int = Field(1, ge=1)

    @field_validator("api_key", "image_encoder", "text_encoder", "device", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """An empty variable (e.g. ASIF_API_KEY= from compose) means unset, never an empty key."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("open_writes", mode="before")
    @classmethod
    def _empty_is_false(cls, value: object) -> object:
        """An empty ASIF_OPEN_WRITES= (compose passes one when it is unset) means no."""
        return False if isinstance(value, str) and not value.strip() else value
