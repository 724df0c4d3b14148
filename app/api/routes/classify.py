"""POST /v1/classify and POST /v1/similarity."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app.api.deps import State
from app.api.openapi import body_doc
from app.core.errors import ApiError
from app.inputs import (
    check_k_p,
    decode_base64,
    form_list,
    invalid_body,
    label_set_from,
    prepare_blobs,
    prepare_images,
    read_upload,
    weighting_fields,
    weighting_from,
)
from app.schemas import (
    ClassifyJSON,
    ClassifyOptions,
    ClassifyResponse,
    Contribution,
    ImageResult,
    LabelScore,
    SimilarityJSON,
    SimilarityResponse,
)
from asif.encoders.augment import check_views
from asif.math.topk import effective_k
from asif.math.variants import Balance
from asif.serving.labels import CachedLabels
from asif.serving.live import Answer, NoPairsError
from asif.serving.model import AsifModel

router = APIRouter(prefix="/v1", tags=["classify"])

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["images"],
    "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "labels": {"type": "array", "items": {"type": "string"}},
        "templates": {"type": "array", "items": {"type": "string"}},
        "label_set": {"type": "string"},
        "top": {"type": "integer"},
        "k": {"type": "integer"},
        "weighting": {"type": "string", "enum": ["power", "softmax", "rank"]},
        "p": {"type": "number"},
        "t": {"type": "number"},
        "r0": {"type": "number"},
        "explain": {"type": "integer"},
        "explain_label": {"type": "string"},
        "threshold": {"type": "number"},
        "augment": {"type": "array", "items": {"type": "string", "enum": ["flip", "crop"]}},
        "balance": {"type": "boolean"},
        "balance_t": {"type": "number"},
        "prior": {"type": "array", "items": {"type": "number"}},
    },
}


LIST_FIELDS = ("labels", "templates", "texts", "augment", "prior")  # multipart: repeated fields or one JSON array


async def _parse(request: Request, state: State, model: type) -> tuple[object, list[bytes]]:
    """JSON (base64 images) or multipart (image files + form fields) -> (options, image bytes)."""
    settings = state.settings
    ctype = request.headers.get("content-type", "")
    try:
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=settings.max_images + 1, max_fields=settings.max_labels + 64)
            uploads = [f for f in form.getlist("images") if not isinstance(f, str)]
            blobs = [await read_upload(f, settings) for f in uploads]
            fields: dict[str, object] = {key: form.get(key) for key in form if key not in ("images", *LIST_FIELDS)}
            for key in LIST_FIELDS:
                values = [v for v in form.getlist(key) if isinstance(v, str)]
                if values:
                    fields[key] = form_list(values)
            options_model = ClassifyOptions if model is ClassifyJSON else model
            if model is SimilarityJSON:
                fields["images"] = []
            return options_model.model_validate(fields), blobs
        if ctype.startswith("application/json") or not ctype:
            body = model.model_validate_json(await request.body())
            blobs = [decode_base64(b, settings, f"image {i}") for i, b in enumerate(body.images)]
            return body, blobs
    except ValidationError as exc:
        raise invalid_body(exc) from exc
    except UnicodeDecodeError as exc:
        raise ApiError(400, "request body is not valid UTF-8") from exc
    raise ApiError(415, "send application/json (base64 images) or multipart/form-data (image files)")


def balance_from(opts: ClassifyOptions, n_labels: int) -> Balance | None:
    """The request's balancing (None without ``balance``); a prior or temperature without it, or a prior that does
    not fit the labels, is a 422."""
    if not opts.balance:
        if opts.prior is not None or opts.balance_t is not None:
            raise ApiError(422, "prior and balance_t apply with balance=true")
        return None
    balance = Balance.of(opts.balance_t, opts.prior)
    try:
        balance.check(n_labels)
    except ValueError as exc:
        raise ApiError(422, str(exc)) from exc
    return balance


def _effective_k(model: AsifModel, k: int | None) -> int:
    """The request's k or the index default, capped at the pairs (call under the read lock)."""
    k_eff = effective_k(k or model.k, model.n_pairs)
    if k_eff == 0:
        raise ApiError(409, "the model holds no pairs")
    return k_eff


@router.post("/classify", response_model=ClassifyResponse, openapi_extra=body_doc(ClassifyJSON, _MULTIPART_SCHEMA))
async def classify(request: Request, state: State) -> ClassifyResponse:
    """Classify one or more images against inline labels or a stored label set."""
    opts, blobs = await _parse(request, state, ClassifyJSON)
    assert isinstance(opts, ClassifyOptions)
    check_k_p(opts.k, opts.p, state.settings)
    weighting = weighting_from(opts, state.live.model.weighting, state.live.model.p)
    if opts.label_set is not None and opts.labels:
        raise ApiError(422, "give either labels or label_set, not both")
    live = state.live
    inline = None if opts.label_set is not None else label_set_from(opts.labels, opts.templates, state.settings)

    def lookup() -> tuple[CachedLabels | None, int]:
        """The stored set (or the cached inline list) and the pairs held: locks, SQLite or Milvus, off the loop."""
        found = live.label_set(opts.label_set) if inline is None else live.cached_inline(inline)
        return found, live.model.n_pairs

    labels, n_pairs = await run_in_threadpool(lookup)
    if inline is None and labels is None:
        raise ApiError(404, f"unknown label set {opts.label_set!r}")
    k_wanted, k_default = (effective_k(k, n_pairs) for k in (opts.k or live.model.k, live.model.k))
    # The label representations a request makes: an inline list's at the default k and at its own; a stored set's
    # at its own k unless that is the default (made when the set was stored).
    n_labels = len(inline.classes) if inline is not None else len(labels.classes)  # type: ignore[union-attr]
    made = max(k_wanted, k_default) if inline is not None else (0 if k_wanted == k_default else k_wanted)
    if made * n_labels > state.settings.max_label_entries:
        raise ApiError(
            422,
            f"k x labels = {made} x {n_labels} is over the limit of {state.settings.max_label_entries:,} label "
            "entries per request: ask a smaller k or fewer labels (or store the label set, at the default k)",
        )
    if labels is None:
        labels = await state.inline_labels(inline)
    explain_label = None
    if opts.explain_label is not None:
        if opts.explain_label not in labels.classes:
            raise ApiError(422, f"explain_label {opts.explain_label!r} is not one of the labels")
        explain_label = labels.classes.index(opts.explain_label)
    augment = check_views(opts.augment)
    balance = balance_from(opts, len(labels.classes))

    def run() -> Answer:
        """Prepare, encode (batched with other requests) and score in one worker thread."""
        prepared = prepare_blobs(blobs, state.settings, live.image_encoder, augment)
        embeddings, *views = np.split(state.images.encode_blocking(prepared), 1 + len(augment))
        return live.classify(
            embeddings,
            labels,
            k=opts.k or live.model.k,
            p=weighting,
            top=opts.top,
            threshold=opts.threshold,
            explain=opts.explain,
            explain_label=explain_label,
            views=views,
            balance=balance,
        )

    try:
        answer = await run_in_threadpool(run)
    except NoPairsError as exc:
        raise ApiError(409, "the model holds no pairs") from exc
    results = [
        ImageResult(
            label=pred.label,
            unknown=pred.unknown,
            scores=[LabelScore(label=lbl, score=s) for lbl, s in pred.scores],
            explanation=[
                Contribution(
                    pair_id=a.pair_id,
                    caption=a.caption,
                    contribution=a.contribution,
                    thumbnail_url=f"/v1/pairs/{a.pair_id}/thumbnail",
                )
                for a in pred.explanation
            ],
        )
        for pred in answer.predictions
    ]
    return ClassifyResponse(
        **weighting_fields(answer.k, answer.weighting),
        augment=list(augment),
        balanced=balance is not None and len(blobs) >= 2,
        pairs=answer.pairs,
        version=answer.version,
        results=results,
    )


@router.post(
    "/similarity", response_model=SimilarityResponse, openapi_extra=body_doc(SimilarityJSON, _MULTIPART_SCHEMA)
)
async def similarity(request: Request, state: State) -> SimilarityResponse:
    """ASIF similarity matrix between images and texts (the CLIP-style use)."""
    body, blobs = await _parse(request, state, SimilarityJSON)
    assert isinstance(body, SimilarityJSON)
    check_k_p(body.k, body.p, state.settings)
    weighting = weighting_from(body, state.live.model.weighting, state.live.model.p)
    texts = [t.strip() for t in body.texts]
    if not texts or any(not t for t in texts):
        raise ApiError(422, "texts must be a non-empty list of non-empty strings")
    if len(texts) > state.settings.max_texts:
        raise ApiError(422, f"too many texts: {len(texts)} > {state.settings.max_texts}")
    image_emb = await state.images.encode(await prepare_images(blobs, state.settings, state.live.image_encoder))
    text_emb = await state.texts.encode(texts)
    model = state.live.model

    def run():
        with state.live.reading():
            k = _effective_k(model, body.k)
            return k, model.similarity(image_emb, text_emb, k=k, p=weighting)

    k, matrix = await run_in_threadpool(run)
    return SimilarityResponse(**weighting_fields(k, weighting), matrix=matrix.tolist())
