"""Typed request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    detail: str = Field(..., description="what is wrong with the request")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": desc}
    for code, desc in {
        400: "unreadable image or bad encoding",
        401: "missing or wrong API key (write endpoints)",
        404: "unknown pair id or label set",
        409: "the model holds no pairs",
        413: "upload or request body over the limit",
        415: "unsupported content type",
        422: "invalid parameters",
        503: "overloaded or not ready: retry later (Retry-After)",
    }.items()
}


class WeightingOptions(BaseModel):
    """How the top-k similarities become weights; each parameter implies its weighting when ``weighting`` is absent,
    and nothing given means the index's default."""

    weighting: Literal["power", "softmax", "rank"] | None = Field(
        None, description="power: max(s,0)^p (the paper); softmax: exp((s - s_max)/t); rank: 1/(rank + r0)"
    )
    p: float | None = Field(None, gt=0, description="power exponent (default: the index's p)")
    t: float | None = Field(None, gt=0, le=100, description="softmax temperature (default 0.1)")
    r0: float | None = Field(None, gt=0, le=1e6, description="rank offset (default 10)")


class ClassifyOptions(WeightingOptions):
    labels: list[str] | None = Field(None, description="inline class names (or use label_set)")
    templates: list[str] | None = Field(None, description="prompt templates with one '{}' (default: 7 photo prompts)")
    label_set: str | None = Field(None, description="name of a stored label set")
    top: int = Field(5, ge=1, le=1000, description="how many ranked labels to return per image")
    k: int | None = Field(None, ge=1, description="neighbours kept (default: the index's k; capped at the pairs)")
    explain: int = Field(0, ge=0, le=1000, description="how many contributing anchor pairs to return (0: none)")
    explain_label: str | None = Field(
        None, description="explain this label (one of the labels) instead of the best one; needs explain > 0"
    )
    threshold: float = Field(0.0, ge=0.0, le=1.0, description="answer 'unknown' when the best score is below this")
    augment: list[Literal["flip", "crop"]] = Field(
        [],
        max_length=2,
        description="test-time augmentation: extra views (flip, crop) whose representations are "
        "averaged with the image's; each view costs one more image encoding",
    )
    balance: bool = Field(
        False,
        description="balance the request's images to a label prior (Sinkhorn over the batch, OTTER-style): "
        "each image's scores become balanced label probabilities. Needs 2 or more images; a lone image is answered "
        "as without it",
    )
    balance_t: float | None = Field(
        None,
        gt=0.0,
        le=10.0,
        description="temperature turning scores into probabilities before balancing (default 0.01)",
    )
    prior: list[float] | None = Field(
        None, description="with balance: one non-negative weight per label, in the labels' order (default: uniform)"
    )


class ClassifyJSON(ClassifyOptions):
    images: list[str] = Field(..., description="base64-encoded image files")


class LabelScore(BaseModel):
    label: str
    score: float


class Contribution(BaseModel):
    pair_id: int
    caption: str | None
    contribution: float
    thumbnail_url: str


class ImageResult(BaseModel):
    label: str = Field(..., description="best label, or 'unknown'")
    unknown: bool
    scores: list[LabelScore]
    explanation: list[Contribution] = []


class WeightingUsed(BaseModel):
    k: int
    p: float | None = Field(..., description="the power exponent (null for the other weightings)")
    weighting: str = Field(..., description="power, softmax or rank")
    weighting_param: float = Field(..., description="the weighting's parameter: p, t or r0")


class ClassifyResponse(WeightingUsed):
    augment: list[str] = Field([], description="the extra views averaged in")
    balanced: bool = Field(False, description="whether the scores are the batch's balanced label probabilities")
    pairs: int
    version: int = Field(
        ..., description="edit sequence number of the model that answered (grows with every added or deleted pair)"
    )
    results: list[ImageResult]


class SimilarityJSON(WeightingOptions):
    images: list[str] = Field(..., description="base64-encoded image files")
    texts: list[str]
    k: int | None = Field(None, ge=1)


class SimilarityResponse(WeightingUsed):
    matrix: list[list[float]] = Field(..., description="rows: images, columns: texts")


class LabelSetBody(BaseModel):
    labels: list[str]
    templates: list[str] | None = None


class LabelSetOut(BaseModel):
    name: str
    labels: list[str]
    templates: list[str]


class LabelSetList(BaseModel):
    label_sets: list[LabelSetOut]


class NewPairJSON(BaseModel):
    image: str = Field(..., description="base64-encoded image file")
    caption: str | None = None
    captions: list[str] | None = None
    image_ref: str | None = Field(None, max_length=1000, description="name to record for the image")


class NewPairsJSON(BaseModel):
    pairs: list[NewPairJSON]


class PairIds(BaseModel):
    ids: list[int]


class PairOut(BaseModel):
    id: int
    image: str
    caption: str
    captions: list[str]
    thumbnail_url: str


class PairPage(BaseModel):
    items: list[PairOut]
    next_after: int | None = Field(None, description="pass as ?after= for the next page; null at the end")


class Deleted(BaseModel):
    deleted: int


class RestoreBody(BaseModel):
    ids: list[int] = Field(..., min_length=1, max_length=1000, description="ids of recently deleted pairs")


class Restored(BaseModel):
    restored: dict[int, int] = Field(..., description="old id -> new id (ids are never reused)")


class SearchJSON(BaseModel):
    text: str | None = Field(None, description="search the caption anchors with this text")
    image: str | None = Field(None, description="or search the image anchors with this base64-encoded image")
    top: int = Field(12, ge=1, le=200, description="how many anchors to return")


class SearchHit(BaseModel):
    pair_id: int
    similarity: float = Field(..., description="cosine similarity to the query, in the index searched")
    image: str
    caption: str
    captions: list[str]
    thumbnail_url: str


class SearchResponse(BaseModel):
    index: str = Field(..., description="'text' (caption anchors) or 'image' (image anchors)")
    results: list[SearchHit]


class Info(BaseModel):
    encoders: dict[str, Any]
    pairs: int
    anchors: str
    index: dict[str, Any]
    defaults: dict[str, Any]
    generation: int
    delta_files: int = Field(..., description="snapshots since the generation's base files (folded in by compaction)")
    version: int = Field(..., description="edit sequence number: grows with every added or deleted pair")
    pending_edits: int
    label_sets: list[str]
    inline_label_cache: dict[str, int] = Field(..., description="ad-hoc label lists cached: count and bytes")
    write_protected: bool = Field(..., description="write endpoints need 'Authorization: Bearer <ASIF_API_KEY>'")
