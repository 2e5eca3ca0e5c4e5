"""Who may write: the API key, and read-only mode on a public address without one.

Reads stay open. With IMGSIM_API_KEY set, POST /images and DELETE /images/{id} need it, as
`Authorization: Bearer KEY` or `X-API-Key: KEY`, compared in constant time. Without a key, a
service bound to a non-loopback address refuses writes unless open writes are allowed.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from enum import StrEnum

from fastapi import Request

from app.errors import Unauthorized, WritesDisabled
from app.settings import Settings

log = logging.getLogger(__name__)

NEEDS_KEY = "this needs the API key: send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
READ_ONLY = (
    "the service is read-only: it is served on a public address ({host}) without an API key. "
    "Set IMGSIM_API_KEY to allow writes with that key, or start it with --allow-open-writes "
    "(IMGSIM_ALLOW_OPEN_WRITES=1) to let anyone who reaches it write."
)


class Writes(StrEnum):
    """Who may add and delete images."""

    KEY = "key"  # holders of the API key
    OPEN = "open"  # anyone who reaches the service
    READ_ONLY = "read-only"  # nobody


def is_loopback(host: str) -> bool:
    """Whether an address to bind only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def write_policy(settings: Settings) -> Writes:
    """The write policy these settings give."""
    if settings.api_key is not None:
        return Writes.KEY
    if is_loopback(settings.host) or settings.allow_open_writes:
        return Writes.OPEN
    return Writes.READ_ONLY


def log_write_policy(settings: Settings) -> None:
    """One line at start saying who may write (never the key)."""
    policy = write_policy(settings)
    if policy is Writes.READ_ONLY:
        log.warning(READ_ONLY.format(host=settings.host))
    elif policy is Writes.OPEN and not is_loopback(settings.host):
        log.warning("writes are open to anyone who reaches %s (--allow-open-writes)", settings.host)
    elif policy is Writes.KEY:
        log.info("writes need the API key; reads are open")


def presented_key(request: Request) -> str | None:
    """The key a request carries, from Authorization: Bearer or X-API-Key."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


def require_writer(request: Request) -> None:
    """Route dependency of every write: raise unless this request may write."""
    settings: Settings = request.app.state.service.settings
    policy = write_policy(settings)
    if policy is Writes.READ_ONLY:
        raise WritesDisabled(READ_ONLY.format(host=settings.host))
    if policy is Writes.KEY:
        assert settings.api_key is not None
        given = presented_key(request)
        expected = settings.api_key.get_secret_value().encode()
        if given is None or not hmac.compare_digest(given.encode(), expected):
            raise Unauthorized(NEEDS_KEY)
