"""GET /healthz, /readyz, /metrics and /v1/info.

Handlers that read the model are plain functions: FastAPI runs them in its thread pool, so a lock, a SQLite read or
a Milvus query never runs on the event loop (``/healthz`` reads nothing).
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import State
from app.core.errors import ApiError
from app.schemas import Info

router = APIRouter()


@router.get("/healthz", tags=["health"])
async def healthz() -> dict:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"])
def readyz(state: State) -> dict:
    """Index and encoders are loaded, and both encoder workers run (a dead one is restarted here)."""
    if not state.ready:
        raise ApiError(503, "loading")
    for batcher in (state.images, state.texts):
        if not batcher.ensure_alive():
            raise ApiError(503, f"{batcher.name} encoder worker is not running")
    return {"status": "ready", "pairs": state.live.model.n_pairs}


@router.get("/metrics", tags=["health"], response_class=Response)
def metrics(state: State) -> Response:
    state.refresh_gauges()
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/info", response_model=Info, tags=["info"])
def info(state: State) -> Info:
    live = state.live
    model = live.model
    return Info(
        encoders={"image": model.image_encoder.identity.to_dict(), "text": model.text_encoder.identity.to_dict()},
        pairs=model.n_pairs,
        anchors=str(live.manifest.get("anchors", "image")),
        index={
            role: {"spec": store.describe(), "ntotal": store.ntotal, "exact": store.is_exact}
            for role, store in (("image", model.image_store), ("text", model.text_store))
        },
        defaults={"k": model.k, "p": model.p, "weighting": model.weighting.to_dict()},
        generation=int(live.manifest.get("generation", 0)),
        delta_files=len(live.manifest.get("deltas", [])),
        version=live.version,
        pending_edits=live.pending_edits(),
        label_sets=sorted(live.stored_label_sets()),
        inline_label_cache=dict(zip(("count", "bytes"), live.inline_cache_usage(), strict=True)),
        write_protected=state.settings.api_key is not None,
    )
