"""The FastAPI application: POST /classify, POST /similar, GET /health."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from PIL import Image

from app import errors
from app.errors import NoIndex, UploadTooLarge
from app.schemas import (
    ClassifyResponse,
    ErrorBody,
    Health,
    Neighbour,
    Prediction,
    SimilarResponse,
)
from app.service import Service, load_service
from app.settings import Settings
from models.images import load_image

ERRORS = {code: {"model": ErrorBody} for code in (413, 422, 409, 503)}


def create_app(settings: Settings | None = None, service: Service | None = None) -> FastAPI:
    """Build the app; the lifespan loads the bundle and index unless a service is given."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.service = service or load_service(settings or Settings())
        yield

    app = FastAPI(
        title="imgsim",
        summary="Classify an image into your classes and find the most similar images.",
        lifespan=lifespan,
    )
    errors.install(app)
    _add_routes(app)
    return app


def get_service(request: Request) -> Service:
    """The service loaded at startup."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def uploaded_image(request: Request, file: Annotated[UploadFile, File()]) -> Image.Image:
    """Read the multipart field 'file' within the byte limit and decode it safely."""
    settings: Settings = request.app.state.service.settings
    limit = settings.max_upload_bytes
    data = file.file.read(limit + 1)
    if len(data) > limit:
        raise UploadTooLarge(f"the upload is larger than the limit of {limit:,} bytes")
    return load_image(data, max_pixels=settings.max_pixels)


ImageDep = Annotated[Image.Image, Depends(uploaded_image)]


def _add_routes(app: FastAPI) -> None:
    @app.get("/health")
    def health(service: ServiceDep) -> Health:
        """What is served: backbone, number of classes, device, model fingerprint, index size."""
        bundle, gallery = service.bundle, service.gallery
        return Health(
            status="ok",
            backbone=bundle.config.backbone,
            classes=len(bundle.config.classes),
            device=bundle.device,
            model=bundle.fingerprint,
            index_size=len(gallery) if gallery is not None else None,
        )

    @app.post("/classify", responses=ERRORS)
    def classify(
        service: ServiceDep, image: ImageDep, top_k: Annotated[int, Query(ge=1, le=100)] = 5
    ) -> ClassifyResponse:
        """The top_k most probable classes of the uploaded image (multipart field 'file')."""
        probabilities, _ = service.bundle.classify(image)
        classes = service.bundle.config.classes
        order = probabilities[0].argsort()[::-1][:top_k]
        predictions = [
            Prediction(label=classes[i], score=float(probabilities[0, i])) for i in order
        ]
        return ClassifyResponse(
            label=predictions[0].label, predictions=predictions, model=service.bundle.fingerprint
        )

    @app.post("/similar", responses=ERRORS)
    def similar(
        service: ServiceDep, image: ImageDep, k: Annotated[int, Query(ge=1, le=100)] = 10
    ) -> SimilarResponse:
        """The k images of the collection most similar to the upload, best first."""
        if service.gallery is None:
            raise NoIndex(
                "no index is loaded: build one with 'imgsim index GALLERY_DIR' and restart"
            )
        found = service.gallery.search(service.bundle.embed(image), k)[0]
        return SimilarResponse(
            neighbours=[Neighbour(**vars(n)) for n in found], model=service.bundle.fingerprint
        )
