"""What route handlers receive: the loaded service and the uploaded image(s)."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated

import torch
from anyio import CapacityLimiter, to_thread
from fastapi import Depends, File, Request, UploadFile
from PIL import Image

from app.batching import Batcher
from app.errors import UploadTooLarge
from app.service import Service


async def get_service(request: Request) -> Service:
    """The service loaded at startup (async: resolved on the event loop, not the threadpool)."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


async def get_batcher(request: Request) -> Batcher:
    """The inference worker's queue, started with the app."""
    return request.app.state.batcher


BatcherDep = Annotated[Batcher, Depends(get_batcher)]


async def get_decoding(request: Request) -> CapacityLimiter:
    """The threads that read, decode and preprocess uploads: `threads` of them at most, so that
    under load they neither crowd the event loop (and /health) off the GIL nor the model off
    the cores."""
    return request.app.state.decoding


DecodingDep = Annotated[CapacityLimiter, Depends(get_decoding)]


@dataclass(frozen=True)
class Upload:
    """One uploaded image: its bytes, content hash, decoded image and the model's input made of
    it (preprocessed here, in the request's thread, so the inference worker only runs forwards)."""

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


def read_upload(service: Service, file: UploadFile) -> Upload:
    """Read one multipart file within the byte limit and decode it as every stage does."""
    limit = service.settings.max_upload_bytes
    data = file.file.read(limit + 1)
    if len(data) > limit:
        raise UploadTooLarge(f"the upload is larger than the limit of {limit:,} bytes")
    image = service.bundle.decode(data, service.settings.max_pixels)
    pixels = service.bundle.preprocess(image)
    return Upload(data, hashlib.sha256(data).hexdigest(), image, pixels)


async def uploaded(
    service: ServiceDep,
    batcher: BatcherDep,
    decoding: DecodingDep,
    file: Annotated[UploadFile, File()],
) -> Upload:
    """The multipart field 'file', read and decoded; refused at once (503) when the queue is
    full, before it waits for a decoding thread."""
    with batcher.preparing():
        return await to_thread.run_sync(read_upload, service, file, limiter=decoding)


async def uploaded_image(upload: Annotated[Upload, Depends(uploaded)]) -> Image.Image:
    """The decoded image of the multipart field 'file'."""
    return upload.image


async def uploaded_files(
    service: ServiceDep,
    batcher: BatcherDep,
    decoding: DecodingDep,
    files: Annotated[list[UploadFile], File(description="images")],
) -> list[Upload]:
    """Every multipart field 'files', read and decoded (admitted as uploaded is)."""
    with batcher.preparing(len(files)):
        return [
            await to_thread.run_sync(read_upload, service, file, limiter=decoding) for file in files
        ]


UploadDep = Annotated[Upload, Depends(uploaded)]
UploadsDep = Annotated[list[Upload], Depends(uploaded_files)]
ImageDep = Annotated[Image.Image, Depends(uploaded_image)]
