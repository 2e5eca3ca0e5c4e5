"""Browsing the collection: GET /images (a page), GET /images/{id}/file and
GET /images/{id}/thumbnail. Reads only; answers carry URLs, never the server's paths."""

from __future__ import annotations

import mimetypes
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse

from app.dependencies import ServiceDep
from app.routes import ERRORS, ItemId
from app.schemas import ImageItem, ImagePage
from app.thumbnails import DEFAULT_SIZE, MAX_SIZE, MIN_SIZE

router = APIRouter()

THUMBNAIL_CACHE = "public, max-age=31536000, immutable"  # named by content: never stale


@router.get("/images", responses=ERRORS)
def list_images(
    service: ServiceDep,
    label: Annotated[
        str | None, Query(description="only images with this label ('' = without one)")
    ] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> ImagePage:
    """A page of the stored images, in the order they were added, with the label counts."""
    if service.gallery is None:
        return ImagePage(images=[], total=0, offset=offset, limit=limit, labels={})
    items, total = service.gallery.page(label, offset, limit)
    labels = {name or "": count for name, count in service.gallery.labels().items()}
    return ImagePage(
        images=[ImageItem(**vars(item)) for item in items],
        total=total,
        offset=offset,
        limit=limit,
        labels=dict(sorted(labels.items())),
    )


@router.get("/images/{item_id}/file", responses=ERRORS, response_class=FileResponse)
def image_file(service: ServiceDep, item_id: ItemId) -> FileResponse:
    """The stored image itself, with its content type."""
    path, _ = service.image_file(item_id)
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media_type)


@router.get("/images/{item_id}/thumbnail", responses=ERRORS, response_class=Response)
def image_thumbnail(
    service: ServiceDep,
    request: Request,
    item_id: ItemId,
    size: Annotated[int, Query(ge=MIN_SIZE, le=MAX_SIZE, description="longest side")] = (
        DEFAULT_SIZE
    ),
    format: Annotated[Literal["webp", "jpeg"], Query()] = "webp",
) -> Response:
    """A thumbnail (WebP or JPEG) whose long side is at most size; cached by ETag."""
    path, item = service.image_file(item_id)
    thumbnail = service.thumbnails.of(path, item.sha256, size, format, service.settings.max_pixels)
    headers = {"ETag": thumbnail.etag, "Cache-Control": THUMBNAIL_CACHE}
    if thumbnail.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(thumbnail.data, media_type=thumbnail.media_type, headers=headers)
