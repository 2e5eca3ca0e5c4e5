"""The FastAPI application factory: settings -> loaded service -> routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from app import errors
from app.auth import log_write_policy
from app.batching import Batcher
from app.limits import BodyLimits, form_limits
from app.metrics import Metrics, RequestMetrics
from app.routes import classes, classify, explain, gallery, images, operations, page
from app.service import Service, load_service
from app.settings import Settings
from models.memory import retain_freed_memory


def create_app(settings: Settings | None = None, service: Service | None = None) -> FastAPI:
    """Build the app; the lifespan loads the bundle and index unless a service is given."""
    retain_freed_memory()  # also when started as `uvicorn --factory app.main:create_app`
    settings = settings or (service.settings if service is not None else Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.service = loaded = service or load_service(settings)
        log_write_policy(loaded.settings)
        app.state.batcher = batcher = start_batcher(loaded, metrics)
        metrics.watch(loaded, lambda: batcher.depth)
        yield
        await batcher.stop()
        loaded.close()  # a final snapshot, so the next start-up has less to replay

    app = FastAPI(
        title="imgsim",
        summary="Classify an image into your classes and find the most similar images.",
        lifespan=lifespan,
        form_limits=form_limits(settings),
    )
    app.add_middleware(
        BodyLimits,
        max_bytes=settings.max_request_bytes,
        timeout=settings.body_timeout,
        deadline=settings.body_deadline,
    )
    app.state.metrics = metrics = Metrics()
    app.add_middleware(RequestMetrics, metrics=metrics)
    errors.install(app, on_unhandled=metrics.unhandled_errors.inc)
    app.include_router(classify.router)
    app.include_router(classes.router)
    app.include_router(gallery.router)
    app.include_router(operations.router)
    app.include_router(images.router)
    app.include_router(explain.router)
    app.include_router(page.router)
    app.mount("/static", StaticFiles(packages=[("app", "static")]), name="static")
    if settings.cors_origins:  # off unless origins are configured
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )
    return app


def start_batcher(service: Service, metrics: Metrics) -> Batcher:
    """The inference worker, whose thread alone runs torch with the settings' intra-op threads
    (an ONNX Runtime or OpenVINO model has its own, set when it was opened)."""
    settings = service.settings
    batcher = Batcher(
        lambda pixels: service.bundle.forward(pixels),
        settings.max_batch,
        settings.max_wait_ms,
        settings.queue_size,
        metrics,
        threads=settings.torch_threads(service.bundle.runtime.name),
        decoding_threads=settings.threads,
    )
    batcher.start()
    return batcher
