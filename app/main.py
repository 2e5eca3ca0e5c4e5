"""The FastAPI application factory: settings -> loaded service -> routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from app import errors
from app.auth import log_write_policy
from app.limits import BodyLimits, form_limits
from app.routes import classify, explain, gallery, images, page
from app.service import Service, load_service
from app.settings import Settings


def create_app(settings: Settings | None = None, service: Service | None = None) -> FastAPI:
    """Build the app; the lifespan loads the bundle and index unless a service is given."""
    settings = settings or (service.settings if service is not None else Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.service = service or load_service(settings)
        log_write_policy(app.state.service.settings)
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
