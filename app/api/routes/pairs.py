"""Live pairs: POST /v1/pairs, GET /v1/pairs[/{id}[/thumbnail]], DELETE /v1/pairs/{id}, POST /v1/pairs/restore."""

from __future__ import annotations

import hashlib

import numpy as np
from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app.api.deps import State, WriteAccess
from app.api.openapi import body_doc
from app.core.errors import ApiError
from app.inputs import decode_base64, decode_images, invalid_body, read_upload
from app.schemas import Deleted, NewPairsJSON, PairIds, PairOut, PairPage, RestoreBody, Restored
from asif.encoders.images import thumbnail_jpeg
from asif.math.normalise import l2_normalise
from asif.serving.live import RESTORABLE
from asif.state.metadata import NewPair, PairRecord

router = APIRouter(prefix="/v1/pairs", tags=["pairs"])
MAX_ID = 2**63 - 1  # pair ids are signed 64-bit (FAISS ids)
PairId = Path(..., ge=0, le=MAX_ID, description="pair id")

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["image", "caption"],
    "properties": {
        "image": {"type": "string", "format": "binary"},
        "caption": {"type": "array", "items": {"type": "string"}},
        "image_ref": {"type": "string"},
    },
}
_BODY_DOC = body_doc(NewPairsJSON, _MULTIPART_SCHEMA)


def _pair_out(rec: PairRecord) -> PairOut:
    return PairOut(
        id=rec.id,
        image=rec.image,
        caption=rec.caption,
        captions=rec.captions,
        thumbnail_url=f"/v1/pairs/{rec.id}/thumbnail",
    )


def _clean_captions(captions: list[str], limit: int, i: int) -> list[str]:
    out = [" ".join(c.split()) for c in captions]
    if not out or any(not c for c in out):
        raise ApiError(422, f"pair {i}: captions must be non-empty strings")
    if any(len(c) > limit for c in out):
        raise ApiError(422, f"pair {i}: captions must be at most {limit} characters")
    return out


async def _parse_new_pairs(request: Request, state: State) -> list[tuple[bytes, list[str], str | None]]:
    settings = state.settings
    ctype = request.headers.get("content-type", "")
    items: list[tuple[bytes, list[str], str | None]] = []
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=2, max_fields=64)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "multipart pairs need an 'image' file field")
        captions = [c for c in form.getlist("caption") + form.getlist("captions") if isinstance(c, str)]
        ref = form.get("image_ref")
        items.append((await read_upload(upload, settings), captions, ref if isinstance(ref, str) else None))
    elif ctype.startswith("application/json") or not ctype:
        try:
            body = NewPairsJSON.model_validate_json(await request.body())
        except ValidationError as exc:
            raise invalid_body(exc) from exc
        except UnicodeDecodeError as exc:
            raise ApiError(400, "request body is not valid UTF-8") from exc
        for i, p in enumerate(body.pairs):
            caps = list(p.captions or []) + ([p.caption] if p.caption is not None else [])
            items.append((decode_base64(p.image, settings, f"pair {i} image"), caps, p.image_ref))
    else:
        raise ApiError(415, "send application/json (base64 images) or multipart/form-data")
    if not items:
        raise ApiError(422, "no pairs given")
    if len(items) > settings.max_pairs_per_request:
        raise ApiError(422, f"too many pairs: {len(items)} > {settings.max_pairs_per_request}")
    return [
        (blob, _clean_captions(caps, settings.max_caption_chars, i), ref) for i, (blob, caps, ref) in enumerate(items)
    ]


@router.post("", response_model=PairIds, status_code=201, dependencies=[WriteAccess], openapi_extra=_BODY_DOC)
async def add_pairs(request: Request, state: State) -> PairIds:
    """Add image-caption pairs; the answer comes once they are durable and used by every later request."""
    items = await _parse_new_pairs(request, state)
    images = await decode_images([blob for blob, _, _ in items], state.settings)
    encoder = state.live.image_encoder
    image_emb = await state.images.encode(await run_in_threadpool(lambda: [encoder.prepare(im) for im in images]))
    per_caption = state.live.manifest.get("anchors") == "caption"
    all_captions = [c for _, caps, _ in items for c in caps]
    caption_emb = await state.texts.encode(all_captions)
    new: list[NewPair] = []
    offset = 0
    for (blob, caps, ref), img, vec in zip(items, images, image_emb, strict=True):
        text = caption_emb[offset : offset + len(caps)]
        offset += len(caps)
        name = ref or f"upload/{hashlib.sha256(blob).hexdigest()[:16]}"
        thumb = thumbnail_jpeg(img)
        if per_caption:  # one anchor per caption, the image repeated (the index's anchor mode)
            new.extend(NewPair(name, [c], thumb, vec, t) for c, t in zip(caps, text, strict=True))
        else:
            new.append(NewPair(name, caps, thumb, vec, l2_normalise(text.mean(axis=0, keepdims=True))[0]))
    ids = await run_in_threadpool(state.live.add_pairs, new)
    await run_in_threadpool(state.refresh_gauges)
    return PairIds(ids=ids)


@router.get("", response_model=PairPage)
async def list_pairs(
    state: State,
    after: int = Query(-1, ge=-1, le=MAX_ID, description="return pairs with id > after"),
    limit: int = Query(100, ge=1, le=1000),
) -> PairPage:
    records = await run_in_threadpool(state.live.metadata.page, after, limit)
    next_after = records[-1].id if len(records) == limit else None
    return PairPage(items=[_pair_out(r) for r in records], next_after=next_after)


def _record(state: State, pair_id: int) -> PairRecord:
    rec = state.live.metadata.get(pair_id) if state.live.has_pair(pair_id) else None
    if rec is None:
        raise ApiError(404, f"unknown pair id {pair_id}")
    return rec


@router.get("/{pair_id}", response_model=PairOut)
def get_pair(state: State, pair_id: int = PairId) -> PairOut:
    return _pair_out(_record(state, pair_id))


@router.get("/{pair_id}/thumbnail", response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
def get_thumbnail(state: State, pair_id: int = PairId) -> Response:
    jpeg = state.live.metadata.thumbnail(_record(state, pair_id).image)
    if jpeg is None:
        raise ApiError(404, f"pair {pair_id} has no thumbnail")
    return Response(jpeg, media_type="image/jpeg")


@router.delete("/{pair_id}", response_model=Deleted, dependencies=[WriteAccess])
async def delete_pair(state: State, pair_id: int = PairId) -> Deleted:
    """Forget a pair: it never contributes to a score or appears in an explanation again."""
    deleted = await run_in_threadpool(state.live.delete_pairs, np.array([pair_id]))
    if not deleted:
        raise ApiError(404, f"unknown pair id {pair_id}")
    await run_in_threadpool(state.refresh_gauges)
    return Deleted(deleted=pair_id)


@router.post("/restore", response_model=Restored, dependencies=[WriteAccess])
async def restore_pairs(state: State, body: RestoreBody) -> Restored:
    """Undo deletes: add recently deleted pairs back, with their image, captions, thumbnail and exact vectors.

    Restored pairs get new ids (ids are never reused). The server remembers the last deletions since it started
    (1,000); an id outside them is a 404 and nothing is restored.
    """
    try:
        restored = await run_in_threadpool(state.live.restore_pairs, body.ids)
    except KeyError as exc:
        missing = exc.args[0]
        raise ApiError(
            404, f"not restorable: {missing[:10]} (only the last {RESTORABLE} pairs deleted since the server started)"
        ) from exc
    await run_in_threadpool(state.refresh_gauges)
    return Restored(restored=restored)
