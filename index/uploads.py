"""Uploaded images kept in the collection folder, so that an item's path is a real file.

images/SHA256.EXT holds one copy per content. It is written, atomically, before the item's
SQLite commit (a crash between the two leaves an unreferenced file, never an item without its
file), and removed when the last item of that content is deleted.
"""

from __future__ import annotations

from pathlib import Path

from index.store import BaseItemStore, Item
from models.files import atomic_write

IMAGES_DIR = "images"


class KeptImages:
    """The images/ folder of a collection; a collection in memory has none."""

    def __init__(self, directory: Path | None):
        self.folder = None if directory is None else directory / IMAGES_DIR

    def path(self, sha256: str, suffix: str) -> Path:
        """Where an uploaded image of this content is kept."""
        if self.folder is None:
            raise ValueError("a collection in memory cannot keep image files")
        return self.folder / f"{sha256}{suffix}"

    @staticmethod
    def keep(path: Path, content: bytes) -> bool:
        """Write the image at its item's path, unless a copy of it is there already; returns
        whether it wrote one (which the caller removes should the add fail)."""
        if path.exists():
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_bytes(content))
        return True

    def forget(self, item: Item, store: BaseItemStore) -> None:
        """Remove a deleted item's kept image once no stored item has the same content."""
        if self.folder is None or item.sha256 is None:
            return
        path = Path(item.path)
        if path.parent == self.folder and not len(store.ids(sha256=item.sha256)):
            path.unlink(missing_ok=True)
