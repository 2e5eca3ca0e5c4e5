"""POST /similar: search the collection."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.dependencies import ImageDep, ServiceDep
from app.errors import NoIndex
from app.routes import ERRORS
from app.schemas import Neighbour, SimilarResponse

router = APIRouter()


@router.post("/similar", responses=ERRORS)
def similar(
    service: ServiceDep, image: ImageDep, k: Annotated[int, Query(ge=1, le=100)] = 10
) -> SimilarResponse:
    """The k images of the collection most similar to the upload, best first."""
    if service.gallery is None:
        raise NoIndex("no index is loaded: build one with 'imgsim index GALLERY_DIR' and restart")
    found = service.gallery.search(service.bundle.embed(image), k)[0]
    return SimilarResponse(
        neighbours=[Neighbour(**vars(n)) for n in found], model=service.bundle.fingerprint
    )
