"""A consistent copy of a collection folder, safe while a server writes to it.

Order matters: the kept images (content-addressed, never changed once written) first, then
the FAISS snapshot (its json and the file it names, checked against its sha256), then the item
database as one consistent state that is at least as new as the snapshot; last, the images of
items added meanwhile. The copy is built under a temporary name and renamed into place, so DEST
is whole or absent.

The item database is copied into DEST/items.sqlite whichever store holds it: SQLite's through
its online backup API; PostgreSQL's read in one REPEATABLE READ transaction, ids, checksums,
change log and meta kept (PostgresItemStore.back_up). So every backup is a self-contained
folder that `imgsim serve --index DEST` serves as it is, with no database server, and that can
be checked and kept like any file. Putting such a copy back into PostgreSQL is not done here:
for backups that stay in PostgreSQL, use its own tools (pg_dump, or base backups with WAL
archiving for point-in-time recovery) on the database beside an `imgsim backup` of the folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
from pathlib import Path

from index.database import Database
from index.errors import disk_full_refused
from index.folder import ITEMS_FILE, existing_store
from index.snapshot import INFO_FILE, SnapshotUnusable, read_snapshot
from index.store import BaseItemStore
from index.uploads import IMAGES_DIR

log = logging.getLogger(__name__)

SNAPSHOT_TRIES = 5  # a snapshot replaced while being copied is copied again


def backup_collection(directory: Path, dest: Path, database: Database | None = None) -> int:
    """Copy the collection at directory (its items in the database if given) to dest, which
    must not exist, as a folder with its own items.sqlite; returns its items."""
    if dest.exists():
        raise FileExistsError(f"{dest} already exists: give a new folder to back up into")
    # IndexMissing / IndexCorrupt: nothing to back up
    store = existing_store(directory, database=database)
    partial = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:  # whatever stops it (a full disk), nothing of the copy is left to fill the disk
        with disk_full_refused(f"the backup in {dest}"):
            count = _copy_into(directory, partial, store)
            os.rename(partial, dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        store.close()
    return count


def _copy_into(directory: Path, partial: Path, store: BaseItemStore) -> int:
    """The images, the snapshot and a consistent copy of the database, into partial."""
    (partial / IMAGES_DIR).mkdir(parents=True)
    _copy_images(directory / IMAGES_DIR, partial / IMAGES_DIR)
    _copy_snapshot(directory, partial)
    store.back_up(partial / ITEMS_FILE)
    target = sqlite3.connect(partial / ITEMS_FILE)
    try:
        count = target.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        paths = [row[0] for row in target.execute("SELECT path FROM items")]
    finally:
        target.close()
    _copy_images(directory / IMAGES_DIR, partial / IMAGES_DIR, {Path(p).name for p in paths})
    return count


def _copy_images(source: Path, target: Path, names: set[str] | None = None) -> None:
    """Copy the kept images (only those named, if names) that target lacks."""
    if not source.is_dir():
        return
    for path in source.iterdir():
        if path.name.startswith(".") or (names is not None and path.name not in names):
            continue
        if not (target / path.name).exists():
            try:
                shutil.copy2(path, target / path.name)
            except FileNotFoundError:  # deleted meanwhile, with its item
                continue


def _copy_snapshot(directory: Path, target: Path) -> None:
    """Copy the snapshot json and the file it names as one pair; none if there is none (the
    index is then rebuilt from the items when the copy is opened)."""
    for _ in range(SNAPSHOT_TRIES):
        try:
            info = json.loads((directory / INFO_FILE).read_text())
            shutil.copy2(directory / info["file"], target / info["file"])
            shutil.copy2(directory / INFO_FILE, target / INFO_FILE)
            read_snapshot(target)  # the pair matches: the checksum holds
            return
        except (OSError, ValueError, KeyError, SnapshotUnusable):
            for path in (target / INFO_FILE, *target.glob("snapshot-*.faiss")):
                path.unlink(missing_ok=True)
    log.warning("no usable snapshot in %s: the copy will rebuild its index when opened", directory)
