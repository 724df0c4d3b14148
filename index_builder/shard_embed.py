"""Embedding one shard of pairs and the per-shard embedding file that makes a build resumable shard by shard.

A shard's file (``<out>/.build/shards/<n>.npz``, written atomically) holds everything later steps need: the
embeddings of its distinct images (deduplicated within the shard: by path for pairs files, by content for bytes)
and of every caption, the image references, captions and thumbnails, the counts of skipped samples, the seconds
per stage, and the shard's fingerprint (a changed input file is embedded again).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from asif.encoders import ImageEncoder, TextEncoder
from index_builder.decode import Decoded, Decoder
from index_builder.sources import Sample, Shard, SourceOptions

READ_BATCH = 256  # samples read (and images sent to the decoders) at a time
FORMAT = 1


@dataclass
class StageTimes:
    """Busy seconds and item counts per build stage (summed over shards)."""

    samples: int = 0
    read_seconds: float = 0.0
    images: int = 0
    decode_seconds: float = 0.0  # summed over decode workers (decoding, preparing, thumbnails)
    wait_seconds: float = 0.0  # the image encoder waiting for the decode workers (0: they kept it fed)
    image_seconds: float = 0.0
    captions: int = 0
    caption_seconds: float = 0.0

    def add(self, other: StageTimes) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


@dataclass
class ShardEmbedding:
    name: str
    fingerprint: str
    image_emb: np.ndarray  # (distinct images, d_image), zero rows where unreadable
    image_ok: np.ndarray  # (distinct images,) bool
    refs: list[str]  # per distinct image: its first sample's reference
    thumbs: list[bytes]  # per distinct image (b"" where unreadable)
    caption_emb: np.ndarray  # (samples, d_text)
    sample_image: np.ndarray  # (samples,) int64: the sample's distinct image
    captions: list[str]  # per sample
    sample_refs: list[str]  # per sample: its own image reference (samples may share an image's bytes)
    counts: dict[str, int] = field(default_factory=dict)  # skipped samples by reason
    times: StageTimes = field(default_factory=StageTimes)

    def to_bytes(self) -> bytes:
        offs = np.cumsum([0] + [len(t) for t in self.thumbs]).astype(np.int64)
        meta = {
            "format": FORMAT,
            "name": self.name,
            "fingerprint": self.fingerprint,
            "refs": self.refs,
            "captions": self.captions,
            "sample_refs": self.sample_refs,
            "counts": self.counts,
            "times": asdict(self.times),
        }
        buf = io.BytesIO()
        np.savez(
            buf,
            image_emb=self.image_emb,
            image_ok=self.image_ok,
            caption_emb=self.caption_emb,
            sample_image=self.sample_image,
            thumb_offs=offs,
            thumbs=np.frombuffer(b"".join(self.thumbs), dtype=np.uint8),
            meta=np.frombuffer(json.dumps(meta, ensure_ascii=False).encode(), dtype=np.uint8),
        )
        return buf.getvalue()

    @classmethod
    def from_file(cls, path: Path) -> ShardEmbedding:
        with np.load(path) as z:
            meta = json.loads(z["meta"].tobytes())
            offs, blob = z["thumb_offs"], z["thumbs"].tobytes()
            return cls(
                name=meta["name"],
                fingerprint=meta["fingerprint"],
                image_emb=z["image_emb"],
                image_ok=z["image_ok"],
                refs=meta["refs"],
                thumbs=[blob[offs[i] : offs[i + 1]] for i in range(len(offs) - 1)],
                caption_emb=z["caption_emb"],
                sample_image=z["sample_image"],
                captions=meta["captions"],
                sample_refs=meta["sample_refs"],
                counts=meta["counts"],
                times=StageTimes(**meta["times"]),
            )


def stored_meta(path: Path) -> dict[str, Any] | None:
    """A finished shard file's metadata (fingerprint, counts, times; not the arrays), or None (missing or
    unreadable file)."""
    try:
        with np.load(path) as z:
            meta = json.loads(z["meta"].tobytes())
        return meta if isinstance(meta, dict) and "fingerprint" in meta else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    tmp.replace(path)


def _image_key(sample: Sample) -> str | bytes:
    """Identity of a sample's image within its shard: the file for pairs files, the content for bytes."""
    if isinstance(sample.image, Path):
        return str(sample.image)
    return hashlib.sha1(sample.image).digest()


def embed_shard(
    shard: Shard,
    options: SourceOptions,
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
    decoder: Decoder,
    batch_size: int = 32,
    on_images: Callable[[int], None] | None = None,
) -> ShardEmbedding:
    """Read, decode and embed one shard. Raises ShardError when the shard cannot be read (nothing is kept then).

    Reading and decoding of the next batch overlap the encoding of this one's captions (the decoders are
    processes), not of its images: the image encoder has the cores to itself. When the decoder prepares the images
    (``decoder.prepare``, the encoder's ``preparer()``), only the encoder's network runs here (``encode_prepared``);
    else ``encode`` gets the decoded images. ``on_images(n)`` after each encoder call with the images it embedded
    (and once per read batch with its unreadable images, if any).
    """
    counts: Counter = Counter()
    times = StageTimes()
    fingerprint = shard.fingerprint()
    samples: Iterator[Sample] = shard.samples(options, counts)
    image_of: dict[str | bytes, int] = {}
    refs: list[str] = []
    sample_image: list[int] = []
    captions: list[str] = []
    sample_refs: list[str] = []
    image_rows: list[np.ndarray] = []
    caption_rows: list[np.ndarray] = []
    image_ok: list[bool] = []
    thumbs: list[bytes] = []
    decoder_busy = decoder.busy_seconds

    def read() -> tuple[list[bytes | Path], list[str]] | None:
        """Read the next batch of samples: its new images' sources and its captions; None at the end of the shard."""
        t0 = time.perf_counter()
        batch = list(islice(samples, READ_BATCH))
        times.read_seconds += time.perf_counter() - t0
        if not batch:
            return None
        sources = []
        for sample in batch:
            key = _image_key(sample)
            if key not in image_of:
                image_of[key] = len(refs)
                refs.append(sample.ref)
                sources.append(sample.image)
            sample_image.append(image_of[key])
            captions.append(sample.caption)
            sample_refs.append(sample.ref)
        times.samples += len(batch)
        return sources, [sample.caption for sample in batch]

    run = image_encoder.encode if decoder.prepare is None else image_encoder.encode_prepared

    def encode_images(wait: Callable[[], list[Decoded]]) -> None:
        t0 = time.perf_counter()
        decoded = wait()
        times.wait_seconds += time.perf_counter() - t0
        rows = np.zeros((len(decoded), image_encoder.dim), dtype=np.float32)
        good = [i for i, (img, _) in enumerate(decoded) if img is not None]
        for b in range(0, len(good), batch_size):
            part = good[b : b + batch_size]
            t0 = time.perf_counter()
            rows[part] = run([decoded[i][0] for i in part])
            times.image_seconds += time.perf_counter() - t0
            if on_images is not None:
                on_images(len(part))
        times.images += len(decoded)
        image_rows.append(rows)
        image_ok.extend(img is not None for img, _ in decoded)
        thumbs.extend(t for _, t in decoded)
        if on_images is not None and len(good) < len(decoded):
            on_images(len(decoded) - len(good))

    def encode_captions(texts: list[str]) -> None:
        t0 = time.perf_counter()
        caption_rows.append(text_encoder.encode(texts))  # one call per read batch: sorted by length within it
        times.caption_seconds += time.perf_counter() - t0
        times.captions += len(texts)

    # The next batch is read and its images decoded while this batch's captions are encoded, not while its images
    # are: on a small machine the decode workers and the image encoder's threads would share the cores (measured on
    # 2 cores: lite0 on ONNX Runtime embedded 133 img/s with decoding alongside, against ~199 in the encoder alone).
    current = read()
    pending = decoder.submit(current[0]) if current is not None else None
    while current is not None and pending is not None:
        encode_images(pending)
        upcoming = read()
        pending = decoder.submit(upcoming[0]) if upcoming is not None else None
        encode_captions(current[1])
        current = upcoming
    times.decode_seconds = decoder.busy_seconds - decoder_busy

    caption_emb = np.concatenate(caption_rows) if caption_rows else np.zeros((0, text_encoder.dim), np.float32)
    return ShardEmbedding(
        name=shard.name,
        fingerprint=fingerprint,
        image_emb=np.concatenate(image_rows) if image_rows else np.zeros((0, image_encoder.dim), np.float32),
        image_ok=np.asarray(image_ok, dtype=bool),
        refs=refs,
        thumbs=thumbs,
        caption_emb=caption_emb,
        sample_image=np.asarray(sample_image, dtype=np.int64),
        captions=captions,
        sample_refs=sample_refs,
        counts=dict(counts),
        times=times,
    )
