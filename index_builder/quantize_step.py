"""`asif build --quantize int8`: the image encoder quantised (ONNX Runtime) on a calibration set of the build's own
images, kept in the index folder."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from asif.encoders import ImageEncoder
from asif.encoders.quantize import (
    QUANTIZED_FILE,
    QuantizeError,
    calibration_images,
    check_choice,
    quantize_image_encoder,
)
from index_builder.config import BuildConfig
from index_builder.errors import BuildError
from index_builder.sources import Shard, ShardError, SourceOptions


def check_quantize(config: BuildConfig) -> None:
    """A bad --quantize, or one with a target it cannot serve, fails before any work."""
    try:
        choice = check_choice(config.quantize)
    except QuantizeError as exc:
        raise BuildError(str(exc)) from None
    if choice != "none" and (config.store != "faiss" or config.ray):
        raise BuildError("--quantize int8 builds an index folder in this process (not --store milvus, not --ray)")


def quantize(
    config: BuildConfig,
    options: SourceOptions,
    image_encoder: ImageEncoder,
    shards: list[Shard],
    out: Path,
    log: TextIO,
) -> None:
    """With ``--quantize int8``: the image encoder's int8 graph, calibrated on the first distinct images of the
    shards and kept in the index folder; the image encoder runs on it from here on (its identity records it)."""
    if check_choice(config.quantize) == "none":
        return

    def distinct_images() -> Iterator[bytes | Path]:
        seen: set[str] = set()
        for shard in shards:
            with contextlib.suppress(ShardError):  # the embedding step reports it
                for sample in shard.samples(options, Counter()):
                    if sample.ref not in seen:
                        seen.add(sample.ref)
                        yield sample.image

    t0 = time.perf_counter()
    images = calibration_images(distinct_images())
    try:
        quantize_image_encoder(image_encoder, images, out / QUANTIZED_FILE)
    except QuantizeError as exc:
        raise BuildError(str(exc)) from None
    print(f"image encoder quantised to int8 on {len(images)} images in {time.perf_counter() - t0:.1f} s", file=log)
