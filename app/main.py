"""The FastAPI application factory: settings -> loaded service -> routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI

from app import errors
from app.batching import Batcher
from app.metrics import Metrics, RequestMetrics
from app.routes import classify, gallery, operations
from app.service import Service, load_service
from app.settings import Settings


def create_app(settings: Settings | None = None, service: Service | None = None) -> FastAPI:
    """Build the app; the lifespan loads the bundle and index unless a service is given."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.service = loaded = service or load_service(settings or Settings())
        app.state.batcher = batcher = start_batcher(loaded, metrics)
        metrics.watch(loaded, lambda: batcher.depth)
        yield
        await batcher.stop()
        loaded.close()  # a final snapshot, so the next start-up has less to replay

    app = FastAPI(
        title="imgsim",
        summary="Classify an image into your classes and find the most similar images.",
        lifespan=lifespan,
    )
    app.state.metrics = metrics = Metrics()
    app.add_middleware(RequestMetrics, metrics=metrics)
    errors.install(app)
    app.include_router(classify.router)
    app.include_router(gallery.router)
    app.include_router(operations.router)
    return app


def start_batcher(service: Service, metrics: Metrics) -> Batcher:
    """The inference worker, with the model's intra-op threads set from the settings."""
    settings = service.settings
    torch.set_num_threads(settings.threads)
    batcher = Batcher(
        lambda images: service.bundle.encode(images, batch_size=len(images)),
        settings.max_batch,
        settings.max_wait_ms,
        settings.queue_size,
        metrics,
    )
    batcher.start()
    return batcher
