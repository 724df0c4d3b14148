"""Image preparation that needs no torch: PIL image -> the uint8 array an encoder's network takes.

It runs where the image is decoded (the service's decode threads, the build's decode processes), so the encoder's
own thread only runs the network. Objects here pickle, and importing this module imports PIL and numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class ResizePrepare:
    """Bicubic resize to ``size x size`` (``crop_pct=None``), or of the shorter side to ``size / crop_pct`` then a
    centre crop of ``size``; RGB uint8 ``(size, size, 3)``. Normalisation belongs to the network's graph."""

    size: int
    crop_pct: float | None = None

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB")
        size = self.size
        if self.crop_pct is None:
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        else:
            w, h = image.size
            short = int(size / self.crop_pct)  # floor, as timm does: 224 -> 256, 260 -> 297
            scale = short / min(w, h)
            new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
            left, top = (new_w - size) // 2, (new_h - size) // 2
            image = image.crop((left, top, left + size, top + size))
        return np.asarray(image, dtype=np.uint8)


def stack(prepared: list[np.ndarray]) -> np.ndarray:
    """Prepared images -> one contiguous (n, h, w, 3) uint8 batch."""
    out = np.empty((len(prepared), *prepared[0].shape), dtype=np.uint8)
    for i, x in enumerate(prepared):
        out[i] = x
    return out
