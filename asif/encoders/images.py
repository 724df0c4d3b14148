"""Safe image decoding and thumbnails (PIL only): bad input raises ImageError, never crashes."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000  # ~ 6300 x 6300; a decompression bomb claims far more
THUMBNAIL_SIZE = 96


class ImageError(ValueError):
    """The input is not a readable image (empty, truncated, not an image, too many pixels)."""


def open_image(
    source: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, shrink_to: int | None = None
) -> Image.Image:
    """Decode an image into RGB, checking the pixel count from the header before decoding.

    ``shrink_to``: an image whose shorter side is over twice this is shrunk while it is decoded (a JPEG decodes at
    1/2, 1/4 or 1/8 scale) and then by a whole factor, to a shorter side of at least ``shrink_to``; smaller images
    are decoded as they are.
    """
    if isinstance(source, bytes | bytearray):
        if not source:
            raise ImageError("empty file")
        fp: io.BytesIO | Path = io.BytesIO(source)
    else:
        fp = Path(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageError(f"image is {width}x{height} pixels, over the limit of {max_pixels}")
                big = _draft_if_big(img, shrink_to)
                img.load()
                factor = min(img.size) // shrink_to if big and shrink_to else 1
                if factor >= 2 and img.mode in ("RGB", "RGBA", "L", "LA"):
                    return img.reduce(factor).convert("RGB")  # before the RGB copy: one large buffer, not two
                out = img.convert("RGB")
                return out.reduce(factor) if factor >= 2 else out
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image has too many pixels: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError("not a recognised image format") from exc
    except FileNotFoundError as exc:
        raise ImageError(f"file not found: {fp}") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise ImageError(f"corrupt or truncated image: {exc}") from exc


def _draft_if_big(img: Image.Image, shrink_to: int | None) -> bool:
    """Whether the (not yet loaded) image's shorter side is over twice ``shrink_to``; if so a JPEG is set to decode
    at the smallest 1/2, 1/4 or 1/8 scale that keeps it at least ``shrink_to`` (other formats are left as they are)."""
    big = shrink_to is not None and min(img.size) > 2 * shrink_to
    if big:
        img.draft("RGB", (shrink_to, shrink_to))
    return big


def decoded_pixels(source: bytes, shrink_to: int | None = None) -> int:
    """How many pixels :func:`open_image` would decode (from the header, after a JPEG's draft scale); ImageError for
    what is not an image."""
    try:
        with Image.open(io.BytesIO(source)) as img:
            _draft_if_big(img, shrink_to)
            width, height = img.size
            return int(width) * int(height)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"not a readable image: {exc}") from exc


def thumbnail_jpeg(image: Image.Image, size: int = THUMBNAIL_SIZE, quality: int = 80) -> bytes:
    thumb = image.copy()
    thumb.thumbnail((size, size))
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
