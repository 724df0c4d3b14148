"""Stored label sets: PUT/GET/DELETE /v1/label-sets/{name}, GET /v1/label-sets."""

from __future__ import annotations

import re

from fastapi import APIRouter, Path
from starlette.concurrency import run_in_threadpool

from app.api.deps import State, WriteAccess
from app.core.errors import ApiError
from app.inputs import label_set_from
from app.schemas import Deleted, LabelSetBody, LabelSetList, LabelSetOut
from asif.serving.labels import CachedLabels

router = APIRouter(prefix="/v1/label-sets", tags=["label sets"])
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NamePath = Path(..., description="1-64 characters: letters, digits, '_', '.', '-'")


def _out(name: str, cached: CachedLabels) -> LabelSetOut:
    return LabelSetOut(name=name, labels=list(cached.classes), templates=list(cached.label_set.templates))


@router.put("/{name}", response_model=LabelSetOut, dependencies=[WriteAccess])
async def put_label_set(state: State, body: LabelSetBody, name: str = NamePath) -> LabelSetOut:
    """Create or replace a label set; its representations are cached and follow every edit."""
    if not NAME.match(name):
        raise ApiError(422, "label set names are 1-64 characters: letters, digits, '_', '.', '-'")
    label_set = label_set_from(body.labels, body.templates, state.settings)
    embeddings = await state.embed_labels(label_set)
    cached = await run_in_threadpool(state.live.put_label_set, name, label_set, embeddings)
    return _out(name, cached)


@router.get("", response_model=LabelSetList)
def list_label_sets(state: State) -> LabelSetList:
    return LabelSetList(label_sets=[_out(n, c) for n, c in sorted(state.live.stored_label_sets().items())])


@router.get("/{name}", response_model=LabelSetOut)
def get_label_set(state: State, name: str = NamePath) -> LabelSetOut:
    cached = state.live.label_set(name)
    if cached is None:
        raise ApiError(404, f"unknown label set {name!r}")
    return _out(name, cached)


@router.delete("/{name}", response_model=Deleted | dict, dependencies=[WriteAccess])
async def delete_label_set(state: State, name: str = NamePath) -> dict:
    live = state.live
    if not await run_in_threadpool(lambda: live.label_set(name) is not None and live.delete_label_set(name)):
        raise ApiError(404, f"unknown label set {name!r}")
    return {"deleted": name}
