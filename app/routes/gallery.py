"""The collection: POST /similar, POST /images, GET and DELETE /images/{id},
GET /images/{id}/similar and GET /index."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Query, Response
from starlette.concurrency import run_in_threadpool

from app.auth import require_writer
from app.dependencies import BatcherDep, QueryImageDep, ServiceDep, UploadsDep
from app.errors import InvalidRequest, NoIndex
from app.routes import ERRORS, ItemId
from app.schemas import (
    AddedImage,
    AddImagesResponse,
    Duplicate,
    ImageItem,
    IndexInfo,
    Neighbour,
    SimilarResponse,
)
from app.service import Service
from index.errors import ItemNotFound
from index.gallery import GalleryIndex
from index.gallery import Neighbour as Found
from index.store import NewItem

router = APIRouter()

K = Annotated[int, Query(ge=1, le=100)]
LabelFilter = Annotated[str | None, Query(description="only images with this label", min_length=1)]
WRITER = [Depends(require_writer)]  # API key, or open writes (see app/auth.py)
NO_INDEX = "no index is loaded: build one with 'imgsim index GALLERY_DIR' and restart"


def _gallery(service: Service) -> GalleryIndex:
    if service.gallery is None:
        raise NoIndex(NO_INDEX)
    return service.gallery


def _similar(service: Service, found: list[Found]) -> SimilarResponse:
    return SimilarResponse(
        neighbours=[Neighbour(**vars(n)) for n in found], model=service.bundle.fingerprint
    )


@router.post("/similar", responses=ERRORS)
async def similar(
    service: ServiceDep,
    query: QueryImageDep,
    k: K = 10,
    label: LabelFilter = None,
) -> SimilarResponse:
    """The k images of the collection most similar to the upload (multipart field 'file'), best
    first; stored copies of the upload itself (same bytes) are left out."""
    gallery = _gallery(service)

    def search() -> list[list[Found]]:
        own = gallery.ids_of_content(query.upload.sha256)
        return gallery.search(query.encoded.embeddings, k, label=label, exclude=own)

    return _similar(service, (await run_in_threadpool(search))[0])


@router.post("/images", status_code=201, responses=ERRORS, dependencies=WRITER)
async def add_images(
    service: ServiceDep,
    batcher: BatcherDep,
    uploads: UploadsDep,
    label: Annotated[str | None, Form(description="label of every image")] = None,
    external_id: Annotated[
        str | None, Form(description="your id for the image (one file only); must be unique")
    ] = None,
    skip_duplicates: Annotated[
        bool, Query(description="do not add an image that is a near-duplicate of a stored one")
    ] = False,
) -> AddImagesResponse:
    """Add one or more images (multipart fields 'files'); each near-duplicate of a stored image
    (similarity at least IMGSIM_DUPLICATE_THRESHOLD) is flagged, and added unless
    skip_duplicates. Answers once the images are durably stored."""
    if external_id is not None and len(uploads) != 1:
        raise InvalidRequest("an external_id can only be given with a single file")
    gallery = await run_in_threadpool(service.collection)
    if gallery is None:
        raise NoIndex("no index folder is configured: start the service with --index DIR")
    items = [
        NewItem(gallery.image_path(u.sha256, u.suffix), label or None, external_id, u.sha256)
        for u in uploads
    ]
    embeddings = (await batcher.encode([u.pixels for u in uploads])).embeddings
    added = await run_in_threadpool(
        gallery.add,
        embeddings,
        items,
        duplicate_threshold=service.settings.duplicate_threshold,
        skip_duplicates=skip_duplicates,
        contents=[u.data for u in uploads],
    )
    return AddImagesResponse(
        images=[
            AddedImage(
                id=a.id,
                external_id=item.external_id,
                label=item.label,
                sha256=u.sha256,
                duplicate_of=Duplicate(id=a.duplicate_of, score=a.duplicate_score)
                if a.duplicate_of is not None and a.duplicate_score is not None
                else None,
            )
            for a, item, u in zip(added, items, uploads, strict=True)
        ],
        model=service.bundle.fingerprint,
    )


@router.get("/images/{item_id}", responses=ERRORS)
def get_image(service: ServiceDep, item_id: ItemId) -> ImageItem:
    """A stored image's metadata."""
    if service.gallery is None:
        raise ItemNotFound(f"there is no image with id {item_id}")
    return ImageItem(**vars(service.gallery.get(item_id)))


@router.delete("/images/{item_id}", status_code=204, responses=ERRORS, dependencies=WRITER)
def delete_image(service: ServiceDep, item_id: ItemId) -> Response:
    """Remove a stored image; it is never returned by a search that starts afterwards."""
    if service.gallery is None:
        raise ItemNotFound(f"there is no image with id {item_id}")
    service.gallery.delete(item_id)
    return Response(status_code=204)


@router.get("/images/{item_id}/similar", responses=ERRORS)
def similar_to_stored(
    service: ServiceDep, item_id: ItemId, k: K = 10, label: LabelFilter = None
) -> SimilarResponse:
    """The k images most similar to a stored one, leaving it out."""
    gallery = _gallery(service)
    return _similar(service, gallery.search_by_id(item_id, k, label=label))


@router.get("/index", responses=ERRORS)
def index_info(service: ServiceDep) -> IndexInfo:
    """Size, index kind, model fingerprint and change counters of the collection."""
    info = _gallery(service).info()
    if service.follower is not None:
        state = service.follower.state()
        info |= {
            "latest_change": state.latest,
            "lag_changes": state.lag_changes,
            "lag_seconds": round(state.lag_seconds, 3),
            "following": state.problem or "ok",
        }
    return IndexInfo(**info)
