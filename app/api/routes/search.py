"""POST /v1/search: the nearest anchors of a text (caption index) or an image (image index)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app.api.deps import State
from app.api.openapi import body_doc
from app.core.errors import ApiError
from app.inputs import decode_base64, invalid_body, prepare_images, read_upload
from app.schemas import SearchHit, SearchJSON, SearchResponse

router = APIRouter(prefix="/v1", tags=["search"])

_MULTIPART_SCHEMA = {
    "type": "object",
    "properties": {
        "text": {"type": "string"},
        "image": {"type": "string", "format": "binary"},
        "top": {"type": "integer"},
    },
}
_BODY_DOC = body_doc(SearchJSON, _MULTIPART_SCHEMA)


async def _parse(request: Request, state: State) -> tuple[str | None, bytes | None, int]:
    ctype = request.headers.get("content-type", "")
    try:
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=2, max_fields=8)
            upload = form.get("image")
            is_file = upload is not None and not isinstance(upload, str)
            blob = await read_upload(upload, state.settings) if is_file else None
            text = form.get("text")
            fields = {"text": text if isinstance(text, str) else None, "top": form.get("top") or 12}
            body = SearchJSON.model_validate(fields)
            return body.text, blob, body.top
        if ctype.startswith("application/json") or not ctype:
            body = SearchJSON.model_validate_json(await request.body())
            blob = decode_base64(body.image, state.settings, "image") if body.image is not None else None
            return body.text, blob, body.top
    except ValidationError as exc:
        raise invalid_body(exc) from exc
    except UnicodeDecodeError as exc:
        raise ApiError(400, "request body is not valid UTF-8") from exc
    raise ApiError(415, "send application/json (text or a base64 image) or multipart/form-data (text or an image file)")


@router.post("/search", response_model=SearchResponse, openapi_extra=_BODY_DOC)
async def search(request: Request, state: State) -> SearchResponse:
    """The anchors nearest a text (caption index) or an image (image index), by cosine similarity.

    Give exactly one of ``text`` and ``image``. Each hit is a pair; with per-caption anchors, one photo can come
    back once per caption.
    """
    text, blob, top = await _parse(request, state)
    if (text is None or not text.strip()) == (blob is None):
        raise ApiError(422, "give exactly one of text (non-empty) and image")
    if blob is not None:
        role, vectors = (
            "image",
            await state.images.encode(await prepare_images([blob], state.settings, state.live.image_encoder)),
        )
    else:
        assert text is not None
        if len(text) > state.settings.max_caption_chars:
            raise ApiError(422, f"text must be at most {state.settings.max_caption_chars} characters")
        role, vectors = "text", await state.texts.encode([" ".join(text.split())])
    live = state.live

    def run() -> tuple[list[tuple[int, float]], dict]:
        """The search and the hits' records (SQLite or Milvus), off the event loop."""
        sims, ids = live.search(role, vectors, top)
        found = [(int(i), float(s)) for i, s in zip(ids[0].tolist(), sims[0].tolist(), strict=True) if i >= 0]
        return found, {i: live.metadata.get(i) for i, _ in found}

    found, records = await run_in_threadpool(run)
    return SearchResponse(
        index=role,
        results=[
            SearchHit(
                pair_id=i,
                similarity=s,
                image=rec.image,
                caption=rec.caption,
                captions=rec.captions,
                thumbnail_url=f"/v1/pairs/{i}/thumbnail",
            )
            for i, s in found
            if (rec := records[i]) is not None
        ],
    )
