"""App factory: `create_app(settings)` builds the FastAPI app; its lifespan loads the model once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from app.api import openapi
from app.api.routes import classify, console, health, label_sets, pairs, search
from app.batching import MicroBatcher
from app.core.config import Settings
from app.core.errors import install_error_handlers
from app.memory import freeze_loaded_objects, numpy_huge_pages, release_large_frees
from app.metrics import Metrics
from app.middleware import LimitsAndMetrics
from app.schemas import ERROR_RESPONSES
from app.state import AppState
from asif import __version__
from asif.encoders import RuntimeOptions
from asif.serving.live import LiveModel
from asif.stores import set_faiss_threads

log = logging.getLogger("asif.app")

LiveFactory = Callable[[Settings], LiveModel]


def runtime_options(settings: Settings) -> RuntimeOptions:
    return RuntimeOptions(
        runtime=settings.runtime, threads=settings.encoder_threads, spinning=settings.encoder_spinning
    )


def load_live(settings: Settings) -> LiveModel:
    if settings.store == "milvus":
        return load_shared(settings)
    return LiveModel(
        settings.index,
        settings.image_encoder,
        settings.text_encoder,
        device=settings.device,
        verify=settings.verify_checksums,
        inline_cache_bytes=int(settings.inline_label_cache_mb * 2**20),
        compact_ratio=settings.compact_ratio,
        runtime=runtime_options(settings),
    )


def load_shared(settings: Settings) -> LiveModel:
    """A replica over shared state in Milvus (ASIF_STORE=milvus); encoders from its manifest unless overridden."""
    from pymilvus import MilvusClient

    from asif.encoders import load_image_encoder, load_text_encoder
    from asif.serving.shared_loading import open_shared
    from asif.state.milvus_meta import read_manifest
    from asif.stores.milvus_store import MilvusIndex

    client = MilvusClient(settings.milvus_uri)
    manifest = read_manifest(client, settings.milvus_prefix) or {}
    image_spec = settings.image_encoder or manifest.get("image_encoder", {}).get("spec", "effnet-lite2")
    text_spec = settings.text_encoder or manifest.get("text_encoder", {}).get("spec", "minilm")
    return open_shared(
        client,
        settings.milvus_prefix,
        load_image_encoder(image_spec, settings.device, None, runtime_options(settings)),
        load_text_encoder(text_spec, settings.device, None, runtime_options(settings)),
        index=MilvusIndex.parse(settings.milvus_index),
        inline_cache_bytes=int(settings.inline_label_cache_mb * 2**20),
        pending_timeout_s=settings.milvus_pending_timeout_s,
    )


def _set_threads(settings: Settings) -> None:
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(settings.torch_threads)
    threadpool_limits(settings.blas_threads, user_api="blas")  # process-wide
    set_faiss_threads(settings.faiss_threads)  # every thread's FAISS calls, not only this one's


async def _snapshot_loop(state: AppState) -> None:
    while True:
        await asyncio.sleep(state.settings.snapshot_interval_s)
        if await run_in_threadpool(state.live.pending_edits) > 0:
            info = await run_in_threadpool(state.live.snapshot)
            log.info(
                "snapshot: generation %d, %d edits written, %d pairs%s",
                info.generation,
                info.edits,
                info.pairs,
                " (compacted into a new base)" if info.compacted else "",
            )


def create_app(
    settings: Settings | None = None, live_factory: LiveFactory = load_live, own_process: bool = False
) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _set_threads(settings)
        if settings.release_large_frees:
            release_large_frees()
        numpy_huge_pages(settings.numpy_huge_pages)
        live = await run_in_threadpool(live_factory, settings)
        if own_process:  # `asif serve`: not an app among others in a test process, whose objects would stay
            freeze_loaded_objects()
        wait = settings.batch_max_wait_ms / 1000
        state = AppState(
            settings=settings,
            live=live,
            images=MicroBatcher(
                live.image_encoder.encode_prepared,
                settings.batch_max_size,
                wait,
                "image",
                lambda n: metrics.encoder_batch.labels("image").observe(n),
                max_queue=settings.max_queue,
                timeout_s=settings.request_timeout_s,
            ),
            texts=MicroBatcher(
                live.text_encoder.encode,
                settings.batch_max_size * 4,
                wait,
                "text",
                lambda n: metrics.encoder_batch.labels("text").observe(n),
                max_queue=settings.max_queue * 16,  # texts are small: label prompts come in hundreds
                timeout_s=settings.request_timeout_s,
            ),
            metrics=metrics,
        )
        app.state.asif = state
        live.lock.on_read_hold = metrics.read_hold.observe
        metrics.longest_read_hold.set_function(lambda: live.lock.longest_read_s)
        await run_in_threadpool(state.refresh_gauges)
        state.ready = True
        snapshots = asyncio.create_task(_snapshot_loop(state))
        source = (
            settings.index if settings.store == "faiss" else f"Milvus {settings.milvus_uri} ({settings.milvus_prefix})"
        )
        log.info("ready: %d pairs from %s (%d edits replayed)", live.model.n_pairs, source, live.replayed)
        if settings.api_key is None:
            log.warning(
                "ASIF_API_KEY is not set: anyone who can reach this port can add and delete pairs and label sets "
                "(set it to require 'Authorization: Bearer <key>' on every write)"
            )
        try:
            yield
        finally:
            state.ready = False
            snapshots.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await snapshots
            if live.pending_edits() > 0:  # clean shutdown (SIGTERM): flush a snapshot
                info = await run_in_threadpool(live.snapshot)
                log.info("final snapshot: generation %d, %d edits written", info.generation, info.edits)
            state.close()
            live.close()

    app = FastAPI(
        title="asif",
        version=__version__,
        description="ASIF: zero-shot image classification from two frozen encoders and image-caption pairs.",
        lifespan=lifespan,
    )
    install_error_handlers(app)

    app.add_middleware(LimitsAndMetrics, settings=settings, metrics=metrics)

    app.include_router(health.router, responses={503: ERROR_RESPONSES[503]})
    for router in (classify.router, label_sets.router, pairs.router, search.router):
        app.include_router(router, responses=ERROR_RESPONSES)
    console.install(app)
    openapi.install(app)
    return app
