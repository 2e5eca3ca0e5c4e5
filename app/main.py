"""The FastAPI application factory: settings -> loaded service -> routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import errors
from app.limits import BodyLimits, form_limits
from app.routes import classify, gallery
from app.service import Service, load_service
from app.settings import Settings


def create_app(settings: Settings | None = None, service: Service | None = None) -> FastAPI:
    """Build the app; the lifespan loads the bundle and index unless a service is given."""
    if settings is None:
        settings = service.settings if service is not None else Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.service = service or load_service(settings)
        yield
        app.state.service.close()  # a final snapshot, so the next start-up has less to replay

    app = FastAPI(
        title="imgsim",
        summary="Classify an image into your classes and find the most similar images.",
        lifespan=lifespan,
        form_limits=form_limits(settings),
    )
    app.add_middleware(
        BodyLimits, max_bytes=settings.max_request_bytes, timeout=settings.body_timeout
    )
    errors.install(app)
    app.include_router(classify.router)
    app.include_router(gallery.router)
    return app
