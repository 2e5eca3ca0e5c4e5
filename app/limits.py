"""Limits on a request that hold before its body is read: its size, declared or streamed, how
long a client may stall while sending it, and (FastAPI's `form_limits`) its multipart parts.

Starlette's own body limit (FastAPI's `max_body_size`) answers a declared oversize body in plain
text and replaces any answer to it, so the size is checked here, where the 413 can be JSON that
names the limit.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.settings import Settings

MAX_FORM_FIELDS = 16  # the API's forms have at most two text fields (label, external_id)
MAX_FIELD_BYTES = 64 * 1024  # one text field


def form_limits(settings: Settings) -> dict[str, Any]:
    """FastAPI's multipart limits: files, text fields and the size of one text field."""
    return {
        "max_files": settings.max_files,
        "max_fields": MAX_FORM_FIELDS,
        "max_part_size": MAX_FIELD_BYTES,
    }


class BodyLimits:
    """ASGI middleware: a body declared (Content-Length) or streamed (chunked) over `max_bytes`
    gets 413 before, or as soon as, it passes the limit, so nothing beyond it is read or
    spooled; a body whose next part takes longer than `timeout` seconds, or that is not whole
    `deadline` seconds after its first read (a byte every few seconds), gets 408. Once the body
    is complete, receive() is passed through untouched (a streaming answer waits on it)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float, deadline: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.deadline = deadline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        received = int(declared) if declared.isdigit() else 0
        body_done = False
        ends_at: float | None = None  # the deadline, from the first read

        async def receive_within_limits() -> Message:
            nonlocal body_done, received, ends_at
            if body_done:
                return await receive()
            if received > self.max_bytes:
                raise self.too_large()
            now = time.monotonic()
            ends_at = ends_at or now + self.deadline
            wait = min(self.timeout, ends_at - now)
            try:
                message = await asyncio.wait_for(receive(), wait)
            except TimeoutError:
                # By the bound that was waited for: the event loop may wake a hair before
                # ends_at, and a clock read then would call the deadline a stall.
                if wait < self.timeout:
                    raise HTTPException(
                        408, f"the request body took longer than {self.deadline:g} s to arrive"
                    ) from None
                raise HTTPException(
                    408, f"the request body stalled: nothing arrived for {self.timeout:g} s"
                ) from None
            if message["type"] == "http.request" and not declared.isdigit():
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self.too_large()
            body_done = message["type"] != "http.request" or not message.get("more_body")
            return message

        await self.app(scope, receive_within_limits, send)

    def too_large(self) -> HTTPException:
        return HTTPException(
            413, f"the request body is larger than the limit of {self.max_bytes:,} bytes"
        )


class HeadersWithin(HttpToolsProtocol):
    """uvicorn's HTTP protocol (httptools), closing a connection whose request headers are not
    complete `timeout` seconds after it opened or after the request's first byte: a client that
    sends a header line every few seconds holds no socket for long (uvicorn itself waits).

    `imgsim serve` passes headers_within(settings.header_timeout); uvicorn's own command line
    takes `--http app.limits:HeadersWithin`, which reads IMGSIM_HEADER_TIMEOUT (Settings)."""

    timeout: float | None = None  # None: Settings().header_timeout, read once
    _headers_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_headers_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_headers_timer()

    def on_headers_complete(self) -> None:
        self._stop_headers_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_headers_timer()
        super().connection_lost(exc)

    def _start_headers_timer(self) -> None:
        if self._headers_timer is None:
            if HeadersWithin.timeout is None and type(self).timeout is None:
                HeadersWithin.timeout = Settings().header_timeout
            timeout = type(self).timeout or HeadersWithin.timeout
            self._headers_timer = self.loop.call_later(timeout, self._headers_too_slow)

    def _stop_headers_timer(self) -> None:
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None

    def _headers_too_slow(self) -> None:
        self._headers_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def headers_within(timeout: float) -> type[HeadersWithin]:
    """HeadersWithin with this timeout."""
    return type("HeadersWithin", (HeadersWithin,), {"timeout": timeout})
