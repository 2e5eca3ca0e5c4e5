"""Domain errors mapped to HTTP status codes, in one place."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from index.errors import (
    DuplicateExternalId,
    EmptyIndex,
    IndexCorrupt,
    IndexMissing,
    IndexProblem,
    ItemNotFound,
    ModelMismatch,
)
from models.errors import ImageTooLarge, ImgsimError, UnsupportedImage


class UploadTooLarge(ImgsimError):
    """The request body is over the configured byte limit."""


class NoIndex(ImgsimError):
    """/similar was called but the service was started without an index."""


class InvalidRequest(ImgsimError):
    """The request's fields do not fit together (e.g. one external id for many files)."""


class ServiceBusy(ImgsimError):
    """The inference queue is full; the client should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after)}


class NotReady(ImgsimError):
    """The service cannot answer model requests (inference worker stopped, no index)."""


STATUS: list[tuple[type[Exception], int]] = [  # first match wins: subclasses before bases
    (UploadTooLarge, 413),
    (ImageTooLarge, 413),
    (UnsupportedImage, 422),
    (InvalidRequest, 422),
    (NoIndex, 503),
    (ServiceBusy, 503),
    (NotReady, 503),
    (IndexMissing, 503),
    (IndexCorrupt, 503),
    (ItemNotFound, 404),
    (DuplicateExternalId, 409),
    (EmptyIndex, 409),
    (ModelMismatch, 409),
]


def status_of(error: Exception) -> int:
    """The HTTP status for a domain error."""
    return next((code for kind, code in STATUS if isinstance(error, kind)), 400)


def install(app: FastAPI) -> None:
    """Answer every domain error with its status and {"detail": message}."""

    async def handle(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse(
            status_code=status_of(error),
            content={"detail": str(error)},
            headers=getattr(error, "headers", None),
        )

    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc'] if part != 'body')}: {e['msg']}"
            for e in error.errors()
        )
        return JSONResponse(status_code=422, content={"detail": f"invalid request: {problems}"})

    app.add_exception_handler(ImgsimError, handle)
    app.add_exception_handler(IndexProblem, handle)
    app.add_exception_handler(RequestValidationError, invalid_request)
