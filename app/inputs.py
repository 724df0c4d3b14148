"""Turning request payloads into validated images, labels, k and the weighting (4xx on bad input)."""

from __future__ import annotations

import base64
import binascii
import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from fastapi import UploadFile
from PIL import Image
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app.core.config import Settings
from app.core.errors import ApiError
from app.schemas import WeightingOptions
from asif.encoders import ImageEncoder
from asif.encoders.augment import image_view
from asif.encoders.images import decoded_pixels, open_image
from asif.math.relrep import PARAM_NAMES, WEIGHTINGS, Weighting
from asif.serving.labels import DEFAULT_TEMPLATES, LabelSet


def invalid_body(exc: ValidationError) -> ApiError:
    """A request body that fails its schema -> 422 naming the first bad field."""
    first = exc.errors()[0]
    where = ".".join(str(x) for x in first.get("loc", ()))
    return ApiError(422, f"{where}: {first.get('msg')}" if where else str(first.get("msg")))


def decode_base64(data: str, settings: Settings, what: str) -> bytes:
    # base64 grows data by 4/3: refuse before decoding anything too large.
    if len(data) > settings.max_upload_bytes * 4 // 3 + 8:
        raise ApiError(413, f"{what} is larger than the limit of {settings.max_upload_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"{what} is not valid base64") from exc
    return raw


async def read_upload(upload: UploadFile, settings: Settings) -> bytes:
    data = await upload.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise ApiError(
            413, f"{upload.filename or 'upload'} is larger than the limit of {settings.max_upload_bytes} bytes"
        )
    return data


def _check_count(blobs: list[bytes], settings: Settings) -> None:
    if not blobs:
        raise ApiError(422, "at least one image is required")
    if len(blobs) > settings.max_images:
        raise ApiError(422, f"too many images: {len(blobs)} > {settings.max_images}")


def _check_pixels(blobs: list[bytes], settings: Settings) -> None:
    """The pixels a request's images decode to (read from their headers, JPEG draft scale applied), within
    ``max_request_pixels``: 413 before any is decoded."""
    total = 0
    for blob in blobs:
        try:
            total += decoded_pixels(blob, SHRINK_SIDE)
        except ValueError:
            continue  # not an image: decoding it says what is wrong, in its own words
    if total > settings.max_request_pixels:
        raise ApiError(
            413, f"the images decode to {total:,} pixels, over the limit of {settings.max_request_pixels:,} a request"
        )


SHRINK_SIDE = 1024  # served images whose shorter side is over twice this are decoded smaller (4x the input sizes)


class PixelBudget:
    """Pixels being decoded, process-wide: a decode waits until its pixels fit beside the others' (one larger than
    the whole budget waits to decode alone)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.used = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        need = min(int(pixels), self.capacity)
        with self._cond:
            self._cond.wait_for(lambda: self.used + need <= self.capacity)
            self.used += need
        try:
            yield
        finally:
            with self._cond:
                self.used -= need
                self._cond.notify_all()


_decode_slots: dict[tuple[int, int], tuple[threading.BoundedSemaphore, PixelBudget]] = {}
_slots_lock = threading.Lock()


def _slots(settings: Settings) -> tuple[threading.BoundedSemaphore, PixelBudget]:
    """The process's decode limits: at most ``max_concurrent_decodes`` images and ``max_decode_pixels`` at once."""
    key = (settings.max_concurrent_decodes, settings.max_decode_pixels)
    with _slots_lock:
        if key not in _decode_slots:
            _decode_slots[key] = (threading.BoundedSemaphore(key[0]), PixelBudget(key[1]))
        return _decode_slots[key]


def _decode(blob: bytes, i: int, settings: Settings) -> Image.Image:
    slots, budget = _slots(settings)
    try:
        pixels = decoded_pixels(blob, SHRINK_SIDE)
    except ValueError:
        pixels = 0  # not an image: open_image says what is wrong
    try:
        with budget.hold(pixels), slots:
            return open_image(blob, max_pixels=settings.max_pixels, shrink_to=SHRINK_SIDE)
    except ValueError as exc:
        raise ApiError(400, f"image {i}: {exc}") from exc


async def decode_images(blobs: list[bytes], settings: Settings) -> list[Image.Image]:
    """Decoded RGB images (off the event loop); 4xx for a bad or missing image."""
    _check_count(blobs, settings)

    def run() -> list[Image.Image]:
        _check_pixels(blobs, settings)
        return [_decode(blob, i, settings) for i, blob in enumerate(blobs)]

    return await run_in_threadpool(run)


def prepare_blobs(
    blobs: list[bytes], settings: Settings, encoder: ImageEncoder, views: Sequence[str] = ()
) -> list[Any]:
    """What the image encoder's network takes, for every image and then every view of every image (``views``
    outer). Decoding, the views and the encoder's preparation: call it in a worker thread, never on the event loop.
    Each decoded image is dropped as soon as it is prepared."""
    _check_count(blobs, settings)
    _check_pixels(blobs, settings)
    originals, extra = [], [[] for _ in views]
    for i, blob in enumerate(blobs):
        image = _decode(blob, i, settings)
        originals.append(encoder.prepare(image))
        for out, view in zip(extra, views, strict=True):
            out.append(encoder.prepare(image_view(image, view)))
    return originals + [x for out in extra for x in out]


async def prepare_images(
    blobs: list[bytes], settings: Settings, encoder: ImageEncoder, views: Sequence[str] = ()
) -> list[Any]:
    """:func:`prepare_blobs` in a worker thread."""
    return await run_in_threadpool(prepare_blobs, blobs, settings, encoder, views)


def label_set_from(labels: list[str] | None, templates: list[str] | None, settings: Settings) -> LabelSet:
    if not labels:
        raise ApiError(422, "labels must be a non-empty list of class names (or name a stored label_set)")
    if len(labels) > settings.max_labels:
        raise ApiError(422, f"too many labels: {len(labels)} > {settings.max_labels}")
    templates = list(templates) if templates else list(DEFAULT_TEMPLATES)
    if len(templates) > settings.max_templates:
        raise ApiError(422, f"too many templates: {len(templates)} > {settings.max_templates}")
    if len(labels) * len(templates) > settings.max_prompts:
        raise ApiError(
            422,
            f"labels x templates = {len(labels)} x {len(templates)} prompts, over the limit of "
            f"{settings.max_prompts:,} (each prompt is one text encoding)",
        )
    return LabelSet(tuple(labels), tuple(templates))


def check_k_p(k: int | None, p: float | None, settings: Settings) -> None:
    if k is not None and not 1 <= k <= settings.max_k:
        raise ApiError(422, f"k must be between 1 and {settings.max_k}, got {k}")
    if p is not None and not 0 < p <= settings.max_p:
        raise ApiError(422, f"p must be in (0, {settings.max_p}], got {p}")


def weighting_from(opts: WeightingOptions, default: Weighting, default_p: float) -> Weighting:
    """The request's weighting: ``weighting`` and its parameter (p, t or r0), a parameter alone (it names its
    weighting: old clients' ``p`` keeps meaning the power), or the index's default."""
    given = {kind: getattr(opts, PARAM_NAMES[kind]) for kind in WEIGHTINGS}
    given = {kind: value for kind, value in given.items() if value is not None}
    kind = opts.weighting
    if kind is None:
        if len(given) > 1:
            names = " and ".join(PARAM_NAMES[k] for k in given)
            raise ApiError(422, f"{names} belong to different weightings: give one, or name the weighting")
        if not given:
            return default
        kind = next(iter(given))
    stray = [PARAM_NAMES[k] for k in given if k != kind]
    if stray:
        raise ApiError(422, f"{', '.join(stray)} does not apply to the {kind} weighting (it takes {PARAM_NAMES[kind]})")
    if kind in given:
        return Weighting(kind, given[kind])
    if kind == default.kind:
        return default
    return Weighting(kind, default_p) if kind == "power" else Weighting.of(kind)


def weighting_fields(k: int, weighting: Weighting) -> dict[str, object]:
    """The response fields that say which k and weighting answered."""
    p = weighting.param if weighting.kind == "power" else None
    return {"k": k, "p": p, "weighting": weighting.kind, "weighting_param": weighting.param}


def form_list(values: list[str]) -> list[str]:
    """Multipart list fields: repeated fields, or one field holding a JSON array."""
    if len(values) == 1 and values[0].lstrip().startswith("["):
        try:
            parsed = json.loads(values[0])
        except json.JSONDecodeError as exc:
            raise ApiError(422, "list field is not a valid JSON array") from exc
        if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
            raise ApiError(422, "list field must be a JSON array of strings")
        return parsed
    return values
