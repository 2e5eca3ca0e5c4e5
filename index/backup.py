"""A consistent copy of a collection folder, safe while a server writes to it.

Order matters: the kept images (content-addressed, never changed once written) first, then
the FAISS snapshot (its json and the file it names, checked against its sha256), then the item
database through SQLite's online backup API, which copies one consistent state that is at least
as new as the snapshot; last, the images of items added meanwhile. The copy is built under a
temporary name and renamed into place, so DEST is whole or absent.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
from pathlib import Path

from index.errors import disk_full_refused
from index.folder import ITEMS_FILE, existing_store
from index.snapshot import INFO_FILE, SnapshotUnusable, read_snapshot
from index.uploads import IMAGES_DIR

log = logging.getLogger(__name__)

SNAPSHOT_TRIES = 5  # a snapshot replaced while being copied is copied again


def backup_collection(directory: Path, dest: Path) -> int:
    """Copy the collection at directory to dest (which must not exist); returns its items."""
    if dest.exists():
        raise FileExistsError(f"{dest} already exists: give a new folder to back up into")
    existing_store(directory).close()  # IndexMissing / IndexCorrupt: nothing to back up
    partial = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:  # whatever stops it (a full disk), nothing of the copy is left to fill the disk
        with disk_full_refused(f"the backup in {dest}"):
            count = _copy_into(directory, partial)
            os.rename(partial, dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return count


def _copy_into(directory: Path, partial: Path) -> int:
    """The images, the snapshot and a consistent copy of the database, into partial."""
    (partial / IMAGES_DIR).mkdir(parents=True)
    _copy_images(directory / IMAGES_DIR, partial / IMAGES_DIR)
    _copy_snapshot(directory, partial)
    source = sqlite3.connect(directory / ITEMS_FILE)
    target = sqlite3.connect(partial / ITEMS_FILE)
    try:
        source.backup(target)
        target.execute("PRAGMA journal_mode = DELETE")  # one file, complete by itself
        count = target.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        paths = [row[0] for row in target.execute("SELECT path FROM items")]
    finally:
        source.close()
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
