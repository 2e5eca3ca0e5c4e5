"""Limits on a request that hold before its body is read: its size, declared or streamed, how
long a client may stall while sending it, and (FastAPI's `form_limits`) its multipart parts.

Starlette's own body limit (FastAPI's `max_body_size`) answers a declared oversize body in plain
text and replaces any answer to it, so the size is checked here, where the 413 can be JSON that
names the limit.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
    spooled; a body whose next part takes longer than `timeout` seconds gets 408. Once the body
    is complete, receive() is passed through untouched (a streaming answer waits on it)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        received = int(declared) if declared.isdigit() else 0
        body_done = False

        async def receive_within_limits() -> Message:
            nonlocal body_done, received
            if body_done:
                return await receive()
            if received > self.max_bytes:
                raise self.too_large()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except TimeoutError:
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
