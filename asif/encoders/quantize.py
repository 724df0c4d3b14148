"""int8 image encoders: the float ONNX export quantised statically (QDQ) with ONNX Runtime, calibrated on images.

Static int8 needs activation ranges, so it needs images like the ones it will see: the anchors'. The quantised
graph is therefore part of the index it was calibrated for (``<index>/encoders/image-int8.onnx``), and its SHA-256
is part of the image encoder's identity (``preprocessing.quantization``): an index built with it is served with
it, and the embedding caches keep int8 and float vectors apart.

Scheme: QDQ, unsigned 8-bit activations and signed 8-bit per-channel weights (ONNX Runtime's fast path on x86),
MinMax ranges from ``CALIBRATION_IMAGES`` images. Measured on 2 cores (``bench/int8.py``): effnet-lite0 runs about
2x faster, but ASIF's top-1 prediction changes on ~7% of Imagenette images (cosine to float 0.994 on average), so
int8 is opt-in (``--quantize int8``), never the default. Text encoders are not quantised (MiniLM's minimum cosine
to float was 0.945 under dynamic int8).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from asif.encoders.base import ImageEncoder
from asif.encoders.images import ImageError, open_image
from asif.encoders.runtime import OrtForward

QUANTIZE_CHOICES = ("none", "int8")
CALIBRATION_IMAGES = 256
CALIBRATION_BATCH = 8  # ONNX Runtime's calibration holds a batch's every activation: 32 took 3.8 GB, 8 takes 1.3
SCHEME = "qdq-u8s8-per-channel-minmax"
QUANTIZED_FILE = Path("encoders") / "image-int8.onnx"  # inside an index folder


class QuantizeError(ValueError):
    """An encoder cannot be quantised or run quantised (it does not run on ONNX Runtime, or a file is wrong)."""


def check_choice(quantize: str | None) -> str:
    """``none`` (also for None) or ``int8``; anything else is a :class:`QuantizeError`."""
    choice = (quantize or "none").strip().lower()
    if choice not in QUANTIZE_CHOICES:
        raise QuantizeError(f"unknown quantisation {quantize!r}; choose one of {', '.join(QUANTIZE_CHOICES)}")
    return choice


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def quantization_of(identity: dict[str, Any]) -> dict[str, Any] | None:
    """The ``preprocessing.quantization`` entry of an encoder identity (a manifest's), or None for float."""
    entry = identity.get("preprocessing", {}).get("quantization")
    return dict(entry) if entry else None


def calibration_images(sources: Iterable[bytes | Path], n: int = CALIBRATION_IMAGES) -> list[Image.Image]:
    """The first ``n`` readable images of ``sources`` (encoded bytes or files; unreadable ones are skipped)."""
    images: list[Image.Image] = []
    for source in sources:
        if len(images) >= n:
            break
        try:
            images.append(open_image(source))
        except ImageError:
            continue
    return images


def _float_forward(encoder: ImageEncoder) -> OrtForward:
    forward = getattr(encoder, "forward", None)
    if not isinstance(forward, OrtForward):
        raise QuantizeError(
            f"int8 runs on ONNX Runtime only, and image encoder {encoder.identity.spec!r} runs on "
            f"{getattr(forward, 'runtime', 'another runtime')} (use --runtime onnx or auto)"
        )
    if quantization_of(encoder.identity.to_dict()):
        raise QuantizeError(f"image encoder {encoder.identity.spec!r} is quantised already")
    return forward


def _batches(encoder: ImageEncoder, input_name: str, images: Sequence[Image.Image]) -> Iterator[dict[str, Any]]:
    for start in range(0, len(images), CALIBRATION_BATCH):
        chunk = images[start : start + CALIBRATION_BATCH]
        yield {input_name: np.stack([np.asarray(encoder.prepare(im)) for im in chunk])}


def quantize_image_encoder(encoder: ImageEncoder, images: Sequence[Image.Image], out: Path) -> None:
    """Write ``encoder``'s int8 graph, calibrated on ``images``, to ``out`` (atomically), then switch ``encoder``
    to it (:func:`use_quantized`). The same images in the same order give the same bytes."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    forward = _float_forward(encoder)
    if not images:
        raise QuantizeError("int8 calibration needs at least one readable image")
    batches = _batches(encoder, forward.input_names[0], images)

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, Any] | None:
            return next(batches, None)

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=out.parent) as work:
        pre, quantized = Path(work) / "pre.onnx", Path(work) / "int8.onnx"
        quant_pre_process(str(forward.path), str(pre))
        quantize_static(
            str(pre),
            str(quantized),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        quantized.chmod(0o644)
        os.replace(quantized, out)
    use_quantized(encoder, out, calibration_images=len(images))


def use_quantized(
    encoder: ImageEncoder, path: Path, calibration_images: int | None = None, sha256: str | None = None
) -> None:
    """Run ``encoder`` on the int8 graph at ``path`` (same threads as its float graph) and record it in the
    encoder's identity. ``sha256``: the digest the index recorded; a file that differs is a QuantizeError."""
    forward = _float_forward(encoder)
    if not path.is_file():
        raise QuantizeError(f"the int8 image encoder {path} is missing")
    digest = file_sha256(path)
    if sha256 is not None and digest != sha256:
        raise QuantizeError(f"the int8 image encoder {path} does not match the index (sha256 {digest[:12]}...)")
    quantized = OrtForward(path, forward.device_type, forward.options)
    entry = {"mode": "int8", "scheme": SCHEME, "sha256": digest}
    if calibration_images is not None:
        entry["calibration_images"] = calibration_images
    identity = encoder.identity
    encoder.identity = replace(identity, preprocessing={**identity.preprocessing, "quantization": entry})
    encoder.forward = quantized  # type: ignore[attr-defined]


def load_quantized(encoder: ImageEncoder, index: Path, identity: dict[str, Any]) -> None:
    """Switch ``encoder`` to the int8 graph an index folder records in its image encoder ``identity`` (a no-op for
    a float index)."""
    entry = quantization_of(identity)
    if entry is None:
        return
    if entry.get("mode") != "int8" or entry.get("scheme") != SCHEME:
        raise QuantizeError(f"the index's image encoder uses an unknown quantisation {entry!r}")
    use_quantized(encoder, index / QUANTIZED_FILE, entry.get("calibration_images"), str(entry.get("sha256")))


__all__ = [
    "CALIBRATION_IMAGES",
    "QUANTIZED_FILE",
    "QUANTIZE_CHOICES",
    "QuantizeError",
    "calibration_images",
    "check_choice",
    "load_quantized",
    "quantization_of",
    "quantize_image_encoder",
    "use_quantized",
]
