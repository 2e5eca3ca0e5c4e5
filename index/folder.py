"""A collection's folder. One per collection:

items.sqlite (+ -wal, -shm)   every item and its embedding, the change log, the model facts;
                              the source of truth (see index/store.py for its guarantees)
snapshot-SEQ-XXXX.faiss       the FAISS index as of change SEQ, derived from SQLite
snapshot.json                 names the snapshot, its seq, fingerprint, dim, factory, params
                              (see index/snapshot.py)
images/SHA256.EXT             uploaded images, kept so that an item's path is a real file
                              (see index/uploads.py)
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from index.errors import IndexMissing
from index.integrity import check_items_file
from index.store import ItemStore

ITEMS_FILE = "items.sqlite"
LEGACY_POINTER = "CURRENT"  # the folder format before the living collection


def new_store(directory: Path | None) -> ItemStore:
    """The item store of a new collection: in memory, or in a folder that holds none yet."""
    if directory is None:
        return ItemStore(None)
    if (directory / ITEMS_FILE).exists():
        raise FileExistsError(f"{directory} already holds a collection")
    directory.mkdir(parents=True, exist_ok=True)
    return ItemStore(directory / ITEMS_FILE)


def existing_store(directory: Path, thorough_check: bool = False) -> ItemStore:
    """The item store of the collection in this folder, checked (see index/integrity.py);
    IndexMissing, saying why, if there is none, IndexCorrupt if it is not whole."""
    if not (directory / ITEMS_FILE).is_file():
        hint = (
            " (it is in the old format, which cannot be updated)"
            if (directory / LEGACY_POINTER).exists()
            else ""
        )
        raise IndexMissing(
            f"no index at {directory}{hint}: build one with "
            "'imgsim index GALLERY_DIR --model BUNDLE'"
        )
    check_items_file(directory / ITEMS_FILE, thorough_check)
    return ItemStore(directory / ITEMS_FILE)


def replace_directory(new: Path, old: Path) -> None:
    """Put a freshly built collection folder in place of an old one."""
    if old.exists():
        aside = old.with_name(f".{old.name}.old-{uuid.uuid4().hex[:6]}")
        os.rename(old, aside)
        os.rename(new, old)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(new, old)
