"""The one interface every encoder implements (a batch in, L2-normalised float32 rows out), and where encoders keep
their files."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def cache_root(part: str) -> Path:
    """``$ASIF_CACHE_DIR/<part>`` (default ``~/.cache/asif/<part>``): where the encoders keep unpacked models
    (``models``), ONNX exports (``onnx``) and cached embeddings (``embeddings``)."""
    root = os.environ.get("ASIF_CACHE_DIR") or Path.home() / ".cache" / "asif"
    return Path(root).expanduser() / part


@dataclass(frozen=True)
class EncoderIdentity:
    """What makes two encoders interchangeable: recorded in the index manifest and checked on load."""

    spec: str  # the spec string the encoder was created from, e.g. "effnet-lite0" or "st:/models/x"
    name: str  # resolved model name, e.g. "efficientnet-lite0"
    modality: str  # "image" or "text"
    dim: int
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderIdentity:
        return cls(
            spec=str(data["spec"]),
            name=str(data["name"]),
            modality=str(data["modality"]),
            dim=int(data["dim"]),
            preprocessing=dict(data.get("preprocessing", {})),
        )


class Encoder(ABC):
    """Common part of image and text encoders."""

    identity: EncoderIdentity
    batch_size: int = 32

    @property
    def dim(self) -> int:
        return self.identity.dim

    @property
    def runtime(self) -> str:
        """Where the network runs: "onnx" or "torch" (or the plugin's own)."""
        return getattr(getattr(self, "forward", None), "runtime", "custom")


class ImageEncoder(Encoder):
    """Images in two steps, so the service and the build can split them across threads and processes:

    - :meth:`prepare` one image (resize, crop; no model): thread-safe, run where the image is decoded;
    - :meth:`encode_prepared` a batch of prepared images: the network, run by the encoder's own worker.

    ``encode(images) == encode_prepared([prepare(im) for im in images])``. An encoder that does not split (a plugin)
    keeps the defaults: ``prepare`` returns the image and ``encode_prepared`` calls ``encode``.
    """

    @abstractmethod
    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB PIL images -> (len(images), dim) float32, rows L2-normalised."""

    def prepare(self, image: Image.Image) -> Any:
        return image

    def encode_prepared(self, prepared: Sequence[Any]) -> np.ndarray:
        return self.encode(prepared)

    def preparer(self) -> Callable[[Image.Image], Any] | None:
        """A picklable ``prepare`` that imports no torch (for the build's decode processes), or None."""
        return None


class TextEncoder(Encoder):
    @abstractmethod
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Strings -> (len(texts), dim) float32, rows L2-normalised."""
