"""Uploaded images, kept so that an item's path is a real image: in the collection folder, or
in an object store that every replica reaches.

images/SHA256.EXT holds one copy per content; with an uploads URL (any filesystem fsspec
reaches, e.g. s3://bucket/prefix with s3fs installed) the copy is the object URL/SHA256.EXT
instead, and images/from-store/ caches the objects this machine has read. A copy is written
atomically (a file renamed into place; an object in one PUT) before the item's commit, so a
crash between the two leaves an unreferenced copy, never an item without its image; it is
removed when the last item of that content is deleted.
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath
from typing import Any

from index.store import BaseItemStore, Item
from models.files import atomic_write

IMAGES_DIR = "images"


class KeptImages:
    """Where a collection keeps its uploads; a collection in memory keeps none."""

    def __init__(self, directory: Path | None, url: str | None = None):
        self.folder = None if directory is None else directory / IMAGES_DIR
        self.url = url.rstrip("/") if url else None

    def path(self, sha256: str, suffix: str) -> str:
        """Where an uploaded image of this content is kept: a file's path, or an object's URL."""
        if self.url is not None:
            return f"{self.url}/{sha256}{suffix}"
        if self.folder is None:
            raise ValueError("a collection in memory cannot keep image files")
        return str(self.folder / f"{sha256}{suffix}")

    @staticmethod
    def keep(path: str, content: bytes) -> bool:
        """Write the image at its item's path, unless a copy of it is there already; returns
        whether it wrote one (which the caller discards should the add fail)."""
        if is_url(path):
            filesystem, key = _filesystem(path)
            if filesystem.exists(key):
                return False
            filesystem.pipe_file(key, content)
            return True
        file = Path(path)
        if file.exists():
            return False
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(file, lambda tmp: tmp.write_bytes(content))
        return True

    @staticmethod
    def discard(path: str) -> None:
        """Remove a copy this process wrote, if it is still there."""
        if is_url(path):
            filesystem, key = _filesystem(path)
            if filesystem.exists(key):
                filesystem.rm_file(key)
        else:
            Path(path).unlink(missing_ok=True)

    def forget(self, item: Item, store: BaseItemStore) -> None:
        """Remove a deleted item's kept image once no stored item has the same content."""
        if item.sha256 is None or len(store.ids(sha256=item.sha256)):
            return
        if self.url is not None and item.path.startswith(f"{self.url}/"):
            self.discard(item.path)
            if self.folder is not None:
                self._copy_of(item.path).unlink(missing_ok=True)
        elif self.folder is not None and Path(item.path).parent == self.folder:
            Path(item.path).unlink(missing_ok=True)

    def local(self, path: str) -> Path:
        """A file on this machine that holds the image at path: the path itself, or the
        object's copy in images/, fetched when first read."""
        if not is_url(path):
            return Path(path)
        copy = self._copy_of(path)
        if not copy.is_file():
            filesystem, key = _filesystem(path)
            if not filesystem.exists(key):
                return copy  # missing: the caller says so
            content = filesystem.cat_file(key)
            copy.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(copy, lambda tmp: tmp.write_bytes(content))
        return copy

    def _copy_of(self, url: str) -> Path:
        """Where this machine keeps its copy of an object: named by the URL's hash (an upload's
        URL names its content, so its copy is never stale)."""
        if self.folder is None:
            raise ValueError("a collection in memory has no folder to copy objects into")
        name = hashlib.sha256(url.encode()).hexdigest()[:32] + PurePosixPath(url).suffix
        return self.folder / "from-store" / name


def is_url(path: str) -> bool:
    """Whether an item's path is an object's URL (scheme://...) rather than a file's path."""
    return "://" in path


def _filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem that reaches url, and the key of url in it."""
    import fsspec  # only collections kept in an object store need it

    return fsspec.core.url_to_fs(url)
