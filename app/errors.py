"""Domain errors mapped to HTTP status codes, in one place."""

from __future__ import annotations

import errno
import logging
import re
import uuid
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from index.errors import (
    DatabaseUnavailable,
    DuplicateExternalId,
    EmptyIndex,
    IncompatibleIndex,
    IndexCorrupt,
    IndexMissing,
    IndexProblem,
    InsufficientStorage,
    ItemNotFound,
    ModelMismatch,
)
from models.errors import ImageTooLarge, ImgsimError, UnsupportedFormat, UnsupportedImage

log = logging.getLogger(__name__)


class UploadTooLarge(ImgsimError):
    """The request body is over the configured byte limit."""


class NoIndex(ImgsimError):
    """/similar was called but the service was started without an index."""


class InvalidRequest(ImgsimError):
    """The request's fields do not fit together (e.g. one external id for many files)."""


class Unauthorized(ImgsimError):
    """A write came without the API key, or with a wrong one."""

    headers = {"WWW-Authenticate": 'Bearer realm="imgsim"'}


class WritesDisabled(ImgsimError):
    """The service is read-only: served on a public address without an API key."""


class ImageFileMissing(ImgsimError):
    """A stored item's image file is no longer on disk."""


class ServiceBusy(ImgsimError):
    """The inference queue is full; the client should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after)}


class ClassConflict(ImgsimError):
    """A class of that name exists, or a trained class was asked to change."""


class ClassNotFound(ImgsimError):
    """No class of that name."""


class NotReady(ImgsimError):
    """The service cannot answer model requests (inference worker stopped, no index, the
    database out of reach: then it says when to try again)."""

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        if retry_after is not None:
            self.headers = {"Retry-After": str(retry_after)}


STATUS: list[tuple[type[Exception], int]] = [  # first match wins: subclasses before bases
    (UploadTooLarge, 413),
    (ImageTooLarge, 413),
    (UnsupportedFormat, 415),
    (UnsupportedImage, 422),
    (InvalidRequest, 422),
    (Unauthorized, 401),
    (WritesDisabled, 403),
    (ImageFileMissing, 404),
    (ClassNotFound, 404),
    (ClassConflict, 409),
    (NoIndex, 503),
    (ServiceBusy, 503),
    (NotReady, 503),
    (IndexMissing, 503),
    (IndexCorrupt, 503),
    (IncompatibleIndex, 503),
    (DatabaseUnavailable, 503),
    (InsufficientStorage, 507),
    (ItemNotFound, 404),
    (DuplicateExternalId, 409),
    (EmptyIndex, 409),
    (ModelMismatch, 409),
]


def status_of(error: Exception) -> int:
    """The HTTP status for a domain error."""
    return next((code for kind, code in STATUS if isinstance(error, kind)), 400)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
DATABASE_RETRY_S = 2  # Retry-After while PostgreSQL is out of reach


def install(app: FastAPI, on_unhandled: Callable[[], object] = lambda: None) -> None:
    """Answer every domain error with its status and {"detail": message}, a full disk with 507,
    and anything unexpected with a logged JSON 500 that names the request id."""

    async def handle(request: Request, error: Exception) -> JSONResponse:
        headers = getattr(error, "headers", None)
        if isinstance(error, DatabaseUnavailable):  # restarting, most likely: back in seconds
            headers = {"Retry-After": str(DATABASE_RETRY_S)}
        return JSONResponse(
            status_code=status_of(error), content={"detail": str(error)}, headers=headers
        )

    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc'] if part != 'body')}: {e['msg']}"
            for e in error.errors()
        )
        return JSONResponse(status_code=422, content={"detail": f"invalid request: {problems}"})

    async def os_error(request: Request, error: Exception) -> JSONResponse:
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            log.error("disk full while answering %s %s: %s", request.method, request.url, error)
            return JSONResponse(
                status_code=507,
                content={
                    "detail": "the server's disk is full, so nothing was stored; "
                    "try again once the operator has freed space"
                },
            )
        raise error  # not ours to explain: the catch-all answers 500

    app.add_exception_handler(ImgsimError, handle)
    app.add_exception_handler(IndexProblem, handle)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(OSError, os_error)
    app.add_middleware(CatchAll, on_unhandled=on_unhandled)


REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class CatchAll:
    """ASGI middleware: every answer carries an X-Request-ID (the client's, when it sent a
    plausible one), and an unexpected exception becomes a JSON 500 naming that id, logged with
    its traceback. The exception stops here, so the server keeps the connection open."""

    def __init__(self, app: ASGIApp, on_unhandled: Callable[[], object]) -> None:
        self.app = app
        self.on_unhandled = on_unhandled  # e.g. a metrics counter's inc

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s (%s %s) failed", request_id, scope["method"], scope["path"])
            self.on_unhandled()
            if started:
                raise  # the answer is half sent: only closing the connection is left
            answer = JSONResponse(
                status_code=500,
                content={
                    "detail": f"internal error; quote request id {request_id} to the operator",
                    "request_id": request_id,
                },
                headers={"X-Request-ID": request_id},
            )
            await answer(scope, receive, send)
