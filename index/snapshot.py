"""FAISS snapshots: the index serialised to a file named by the last change it contains.

snapshot.json is the commit point: it names the snapshot file, the seq of the last change in it,
the model fingerprint, dim, factory, search params and the file's sha256. Both are written to a
temporary name, fsynced and renamed into place, the file before the json, so a crash leaves the
previous snapshot or the new one, never half of one. `Snapshots` decides when one is taken.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index.errors import disk_is_full
from index.store import BaseItemStore
from models.files import atomic_write

log = logging.getLogger(__name__)

INFO_FILE = "snapshot.json"
PREFIX = "snapshot-"


class SnapshotUnusable(Exception):
    """The snapshot is missing, corrupt or of another model; the index is rebuilt from SQLite."""


Capture = Callable[[], tuple[np.ndarray, dict[str, Any]]]  # index bytes, info with last_seq


RETRY_AFTER_S = 30.0  # after a background snapshot failed on a full disk


class Snapshots:
    """A collection's snapshots, one at a time: taken on demand, or in a background thread once
    `every` changes have piled up since the last; none for a collection in memory.

    A background snapshot that meets a full disk is tried again RETRY_AFTER_S later (the
    changes stay in the database meanwhile); the episode logs one line when it starts and one
    when a snapshot is written again."""

    def __init__(self, directory: Path | None, store: BaseItemStore, every: int):
        self.directory, self.store, self.every = directory, store, every
        self.seq = 0  # the last change the latest snapshot contains
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None
        self._full_since: float | None = None  # when the current full-disk episode began
        self._retry_at = 0.0

    def take(self, capture: Capture) -> None:
        """Write what `capture` returns, then drop the change log up to its last_seq."""
        if self.directory is None:
            return
        with self._mutex, self.store.snapshot_turn() as ours:
            if not ours:  # another replica is writing one into the shared folder right now
                return
            data, info = capture()
            write_snapshot(self.directory, data, info)
            self.store.forget_changes(info["last_seq"])
            self.seq = info["last_seq"]

    def soon(self, last_change: int, capture: Capture) -> None:
        """Take one in the background if enough changes have piled up and none is running."""
        due = last_change - self.seq >= self.every and time.monotonic() >= self._retry_at
        running = self._thread is not None and self._thread.is_alive()
        if due and not running and self.directory is not None:
            self._thread = threading.Thread(target=self._background, args=(capture,), daemon=True)
            self._thread.start()

    def _background(self, capture: Capture) -> None:
        """take, where a full disk is an episode to log and retry, not a thread's death."""
        try:
            self.take(capture)
        except (OSError, sqlite3.OperationalError) as err:
            if not disk_is_full(err):
                raise
            self._retry_at = time.monotonic() + RETRY_AFTER_S
            if self._full_since is None:
                self._full_since = time.monotonic()
                log.error(
                    "the disk is full: no snapshot written after change %d (tried again every "
                    "%.0f s; the changes are safe in the database)",
                    self.seq,
                    RETRY_AFTER_S,
                )
            return
        if self._full_since is not None:
            log.info(
                "snapshots written again, after %.0f s of full disk",
                time.monotonic() - self._full_since,
            )
            self._full_since = None

    def last(self, last_change: int, capture: Capture) -> None:
        """At close: wait for a background snapshot, then take one if changes came after it.
        On a full disk it says what it could not write instead of raising: every committed
        change is in the database, and the next start replays what the snapshot lacks."""
        self.wait()
        if last_change == self.seq:
            return
        try:
            self.take(capture)
        except (OSError, sqlite3.OperationalError) as err:
            if not disk_is_full(err):
                raise
            log.error(
                "the disk is full: no snapshot of changes %d-%d was written; the next start "
                "replays them from the database",
                self.seq + 1,
                last_change,
            )

    def wait(self) -> None:
        """Wait for a background snapshot to finish."""
        if self._thread is not None:
            self._thread.join()


def write_snapshot(directory: Path, data: np.ndarray, info: dict[str, Any]) -> None:
    """Write serialised index bytes and their info atomically, then drop older snapshots."""
    name = f"{PREFIX}{info['last_seq']}-{uuid.uuid4().hex[:8]}.faiss"
    atomic_write(directory / name, lambda path: path.write_bytes(data.tobytes()))
    info = {**info, "file": name, "sha256": hashlib.sha256(data).hexdigest()}
    text = json.dumps(info, indent=2)
    atomic_write(directory / INFO_FILE, lambda path: path.write_text(text))
    for old in directory.glob(f"{PREFIX}*.faiss"):
        if old.name != name:
            old.unlink(missing_ok=True)


def read_snapshot(directory: Path) -> tuple[faiss.Index, dict[str, Any]]:
    """The saved index and its info; raises SnapshotUnusable saying why it cannot be used."""
    info_path = directory / INFO_FILE
    if not info_path.is_file():
        raise SnapshotUnusable("there is no snapshot")
    try:
        info = json.loads(info_path.read_text())
        data = np.fromfile(directory / info["file"], dtype=np.uint8)
    except (OSError, ValueError, KeyError) as err:
        raise SnapshotUnusable(f"the snapshot cannot be read ({err})") from err
    if hashlib.sha256(data).hexdigest() != info.get("sha256"):
        raise SnapshotUnusable(f"{info['file']} does not match its checksum")
    try:
        index = faiss.deserialize_index(data)
    except RuntimeError as err:
        raise SnapshotUnusable(f"FAISS cannot read {info['file']} ({err})") from err
    return index, info
