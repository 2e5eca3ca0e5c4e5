"""A collection's folder, and where its items are. One folder per collection:

items.sqlite (+ -wal, -shm)   every item and its embedding, the change log, the model facts;
                              the source of truth (see index/store.py for its guarantees); or,
                              with a Database, the same tables in PostgreSQL instead
                              (see index/pg_store.py)
snapshot-SEQ-XXXX.faiss       the FAISS index as of change SEQ, derived from the items
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
from types import ModuleType

from index.database import Database
from index.errors import DatabaseUnavailable, IndexMissing
from index.integrity import check_items_file
from index.snapshot import INFO_FILE
from index.sqlite_store import ItemStore
from index.store import BaseItemStore

ITEMS_FILE = "items.sqlite"
LEGACY_POINTER = "CURRENT"  # the folder format before the living collection


def new_store(directory: Path | None, database: Database | None = None) -> BaseItemStore:
    """The item store of a new collection: in memory, or in a folder that holds none yet, or
    in a database that holds none yet (the folder then keeps the snapshots and images)."""
    if database is not None:
        if directory is None:
            raise ValueError("a collection in PostgreSQL needs a folder for its snapshots")
        store = _postgres().PostgresItemStore(database, create=True)
        if "fingerprint" in store.meta():
            store.close()
            raise FileExistsError(f"{database} already holds a collection")
        directory.mkdir(parents=True, exist_ok=True)
        return store
    if directory is None:
        return ItemStore(None)
    if (directory / ITEMS_FILE).exists():
        raise FileExistsError(f"{directory} already holds a collection")
    directory.mkdir(parents=True, exist_ok=True)
    return ItemStore(directory / ITEMS_FILE)


def existing_store(
    directory: Path, thorough_check: bool = False, database: Database | None = None
) -> BaseItemStore:
    """The item store of the collection in this folder (or database), checked (see
    index/integrity.py; thorough_check is SQLite's integrity_check); IndexMissing, saying why,
    if there is none, IndexCorrupt if it is not whole. With a database the folder is made when
    missing: its snapshot is then rebuilt from the database."""
    if database is not None:
        store = _postgres().PostgresItemStore(database)
        try:
            store.check()
        except BaseException:
            store.close()
            raise
        directory.mkdir(parents=True, exist_ok=True)
        return store
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


def replace_directory(new: Path, old: Path, database: Database | None = None) -> None:
    """Put a freshly built collection folder in place of an old one; with a database, the
    collection built in database.staging() first takes the place of database's. The old
    folder's snapshot goes before that, so that a crash in between cannot pair it with the new
    items: the next open rebuilds the index from them."""
    if database is not None:
        (old / INFO_FILE).unlink(missing_ok=True)
        _postgres().promote(database.staging(), database)
    if old.exists():
        aside = old.with_name(f".{old.name}.old-{uuid.uuid4().hex[:6]}")
        os.rename(old, aside)
        os.rename(new, old)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(new, old)


def discard(directory: Path, database: Database | None = None) -> None:
    """Remove a collection being built: its folder, and its schema in the database."""
    shutil.rmtree(directory, ignore_errors=True)
    if database is not None:
        _postgres().drop(database)


def _postgres() -> ModuleType:
    """index.pg_store, imported when first needed: psycopg is the optional extra 'postgres'."""
    try:
        from index import pg_store
    except ImportError as err:
        raise DatabaseUnavailable(
            f"a collection in PostgreSQL needs psycopg: pip install 'imgsim[postgres]' ({err})"
        ) from err
    return pg_store
