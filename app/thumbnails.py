"""Thumbnails of stored images: rendered once per (content, size, format), kept in an LRU.

A thumbnail is named by its content hash, size and format, so its ETag never goes stale and a
browser may keep it for a long time: a changed image is a new item with a new id.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from models.images import load_image

FORMATS = {"webp": ("WEBP", "image/webp"), "jpeg": ("JPEG", "image/jpeg")}
MIN_SIZE, MAX_SIZE, DEFAULT_SIZE = 16, 512, 256
CACHE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Thumbnail:
    """One rendered thumbnail."""

    data: bytes
    media_type: str
    etag: str


class Thumbnails:
    """Renders thumbnails and keeps the most recent ones, up to a total number of bytes."""

    def __init__(self, max_bytes: int = CACHE_BYTES):
        self.max_bytes = max_bytes
        self._kept: OrderedDict[str, Thumbnail] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def of(self, path: Path, sha256: str | None, size: int, fmt: str, max_pixels: int) -> Thumbnail:
        """The thumbnail of an image file of this content hash: long side at most size."""
        content = sha256 or hashlib.sha256(path.read_bytes()).hexdigest()
        etag = f'"{content[:32]}-{size}-{fmt}"'
        with self._lock:
            if etag in self._kept:
                self._kept.move_to_end(etag)
                return self._kept[etag]
        thumbnail = Thumbnail(_render(path, size, fmt, max_pixels), FORMATS[fmt][1], etag)
        with self._lock:
            self._kept[etag] = thumbnail
            self._bytes += len(thumbnail.data)
            while self._bytes > self.max_bytes and len(self._kept) > 1:
                _, dropped = self._kept.popitem(last=False)
                self._bytes -= len(dropped.data)
        return thumbnail


def _render(path: Path, size: int, fmt: str, max_pixels: int) -> bytes:
    """Decode as every stage does (bounded), shrink to fit size x size, encode."""
    image = load_image(path, max_pixels, draft_size=size)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, FORMATS[fmt][0], quality=82)
    return buffer.getvalue()
