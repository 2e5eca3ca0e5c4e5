"""What route handlers receive: the loaded service, the uploaded image(s) and what the model
makes of an upload."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated

import torch
from fastapi import Depends, File, Request, UploadFile
from PIL import Image

from app.batching import Batcher
from app.errors import UploadTooLarge
from app.service import Service
from models.bundle import Encoded


async def get_service(request: Request) -> Service:
    """The service loaded at startup (async: resolved on the event loop, not the threadpool)."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


async def get_batcher(request: Request) -> Batcher:
    """The inference worker's queue, started with the app."""
    return request.app.state.batcher


BatcherDep = Annotated[Batcher, Depends(get_batcher)]


@dataclass(frozen=True)
class Upload:
    """One uploaded image: its bytes, content hash, decoded image and the model's input made of
    it (preprocessed in a decoding thread, so the inference worker only runs forwards)."""

    data: bytes
    sha256: str
    image: Image.Image
    pixels: torch.Tensor  # (3, S, S), as Bundle.preprocess makes it

    @cached_property
    def suffix(self) -> str:
        """File suffix for storing it, from the format in its header (.png, .jpg, ...)."""
        with Image.open(io.BytesIO(self.data)) as image:  # reads the header only
            return {"JPEG": ".jpg", "TIFF": ".tif"}.get(
                image.format or "", f".{(image.format or 'img').lower()}"
            )


def read_image(service: Service, file: UploadFile) -> tuple[bytes, Image.Image]:
    """Read one multipart file within the byte limit and decode it as every stage does."""
    limit = service.settings.max_upload_bytes
    data = file.file.read(limit + 1)
    if len(data) > limit:
        raise UploadTooLarge(f"the upload is larger than the limit of {limit:,} bytes")
    return data, service.bundle.decode(data, service.settings.max_pixels)


def read_upload(service: Service, file: UploadFile) -> Upload:
    """read_image, and the model's input made of the image."""
    data, image = read_image(service, file)
    pixels = service.bundle.preprocess(image)
    return Upload(data, hashlib.sha256(data).hexdigest(), image, pixels)


@dataclass(frozen=True)
class QueryImage:
    """An uploaded image and what the model makes of it."""

    upload: Upload
    encoded: Encoded  # one row


async def query_image(
    service: ServiceDep, batcher: BatcherDep, file: Annotated[UploadFile, File()]
) -> QueryImage:
    """The multipart field 'file', read, decoded and run through the model (in a batch with
    other requests'); refused at once (503) when the queue is full."""
    upload: Upload | None = None

    def prepare() -> list[torch.Tensor]:
        nonlocal upload
        upload = read_upload(service, file)
        return [upload.pixels]

    encoded = await batcher.encode_prepared(prepare)
    assert upload is not None  # set by prepare() before it queued the image
    return QueryImage(upload, encoded)


async def uploaded_image(
    service: ServiceDep, batcher: BatcherDep, file: Annotated[UploadFile, File()]
) -> Image.Image:
    """The decoded image of the multipart field 'file' (admitted as a model request is); its
    caller makes the model's input of it (Grad-CAM, which needs the uncropped pixels too)."""
    _, image = await batcher.prepared(lambda: read_image(service, file))
    return image


async def uploaded_files(
    service: ServiceDep,
    batcher: BatcherDep,
    files: Annotated[list[UploadFile], File(description="images")],
) -> list[Upload]:
    """Every multipart field 'files', read and decoded one after another in a decoding thread
    (admitted together)."""
    return await batcher.prepared(
        lambda: [read_upload(service, file) for file in files], len(files)
    )


QueryImageDep = Annotated[QueryImage, Depends(query_image)]
UploadsDep = Annotated[list[Upload], Depends(uploaded_files)]
ImageDep = Annotated[Image.Image, Depends(uploaded_image)]
