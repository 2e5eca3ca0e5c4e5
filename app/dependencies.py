"""What route handlers receive: the loaded service and the uploaded image."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, File, Request, UploadFile
from PIL import Image

from app.errors import UploadTooLarge
from app.service import Service
from app.settings import Settings
from models.images import load_image


def get_service(request: Request) -> Service:
    """The service loaded at startup."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def uploaded_image(service: ServiceDep, file: Annotated[UploadFile, File()]) -> Image.Image:
    """Read the multipart field 'file' within the byte limit and decode it safely."""
    settings: Settings = service.settings
    limit = settings.max_upload_bytes
    data = file.file.read(limit + 1)
    if len(data) > limit:
        raise UploadTooLarge(f"the upload is larger than the limit of {limit:,} bytes")
    return load_image(data, max_pixels=settings.max_pixels)


ImageDep = Annotated[Image.Image, Depends(uploaded_image)]
