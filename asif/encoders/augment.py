"""Test-time augmentation: extra views of a query image (pure image functions).

A view is a named transform of the query image. With ``augment``, the image's relative representation is the
average of the representations of the original and of each view (:func:`asif.math.relrep.average_relreps`).
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageOps

VIEWS = ("flip", "crop")
CROP_FRACTION = 0.8  # the centre crop keeps this share of each side


def image_view(image: Image.Image, name: str) -> Image.Image:
    """``flip``: mirrored left-right; ``crop``: the centre CROP_FRACTION of each side."""
    if name == "flip":
        return ImageOps.mirror(image)
    if name == "crop":
        w, h = image.size
        cw, ch = max(1, round(w * CROP_FRACTION)), max(1, round(h * CROP_FRACTION))
        left, top = (w - cw) // 2, (h - ch) // 2
        return image.crop((left, top, left + cw, top + ch))
    raise ValueError(f"unknown view {name!r}; choose from {', '.join(VIEWS)}")


def check_views(names: Sequence[str]) -> tuple[str, ...]:
    """The distinct view names, in order; ValueError naming any unknown one."""
    unknown = [n for n in names if n not in VIEWS]
    if unknown:
        raise ValueError(f"unknown augment views {unknown}; choose from {', '.join(VIEWS)}")
    return tuple(dict.fromkeys(names))
