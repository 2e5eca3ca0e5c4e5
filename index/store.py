"""The item store: SQLite holding every item with its embedding; the source of truth.

WAL mode with synchronous=FULL: a commit returns only once its WAL frames are fsynced, so an
acknowledged write survives a kill -9 of the process and a power loss. (NORMAL would survive
kill -9 too, since the WAL is in the OS page cache, but could lose the last commits on power loss.)
Every add and delete appends to `changes`, whose seq orders them; a FAISS snapshot records the
last seq it contains.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index.errors import DuplicateExternalId, IndexCorrupt, disk_is_full

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    external_id TEXT UNIQUE,
    path TEXT NOT NULL,
    label TEXT,
    sha256 TEXT,
    embedding BLOB NOT NULL,
    added_at REAL NOT NULL,
    checksum INTEGER  -- row_checksum of the row; NULL only until an old file is migrated
);
CREATE INDEX IF NOT EXISTS items_sha256 ON items (sha256);
CREATE INDEX IF NOT EXISTS items_label ON items (label);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL CHECK (op IN ('add', 'delete')),
    item_id INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class Item:
    """One stored image's metadata."""

    id: int
    external_id: str | None
    path: str
    label: str | None
    sha256: str | None
    added_at: float


@dataclass(frozen=True)
class NewItem:
    """What is stored for an item about to be added (its embedding travels separately)."""

    path: str
    label: str | None = None
    external_id: str | None = None
    sha256: str | None = None


ITEM_COLUMNS = "id, external_id, path, label, sha256, added_at"
CHECKED_COLUMNS = f"{ITEM_COLUMNS}, embedding"  # what a row's checksum covers, in this order


def row_checksum(row: Sequence) -> int:
    """CRC-32 of a row's CHECKED_COLUMNS as SQLite returns them: finds a row whose bytes
    changed on disk in ways SQLite's own checks do not see (a flipped bit in a value)."""
    *fields, embedding = row
    head = "\x1f".join(repr(value) for value in fields).encode()
    return zlib.crc32(embedding, zlib.crc32(head))


class ItemStore:
    """Items, their embeddings and the change log in one SQLite file (or in memory).

    Writes go through one connection behind a mutex; reads use one connection per thread, which
    WAL lets run beside a write. In memory there is only the one connection.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self._mutex = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        try:
            self._writer = self._connect()
            self._writer.executescript(SCHEMA)
            self._add_checksums()
        except sqlite3.DatabaseError as err:
            raise IndexCorrupt(f"the item database {path} cannot be read ({err})") from err

    def _add_checksums(self) -> None:
        """A file written before rows had checksums gets the column, and each row its sum."""
        columns = {row[1] for row in self._writer.execute("PRAGMA table_info(items)")}
        if "checksum" in columns:
            return
        with self._transaction() as db:
            db.execute("ALTER TABLE items ADD COLUMN checksum INTEGER")
            rows = db.execute(f"SELECT {CHECKED_COLUMNS} FROM items").fetchall()
            db.executemany(
                "UPDATE items SET checksum = ? WHERE id = ?",
                [(row_checksum(row), row[0]) for row in rows],
            )
        log.info("%s: added a checksum to each of its %d rows", self.path, len(rows))

    def _connect(self) -> sqlite3.Connection:
        target = ":memory:" if self.path is None else str(self.path)
        connection = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
        connection.execute("PRAGMA busy_timeout = 10000")
        if self.path is not None:
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = FULL")
        return connection

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        if self.path is None:
            with self._mutex:
                yield self._writer
            return
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._connect()
            with self._mutex:
                self._readers.append(connection)
        yield connection

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._mutex:
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield self._writer
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            self._writer.execute("COMMIT")

    def close(self) -> None:
        """Merge the WAL into the database file (so that the file alone is complete, for a
        copy or a backup) and close every connection."""
        with self._mutex:
            for connection in self._readers:
                connection.close()
            self._readers.clear()
            try:
                if self.path is not None:
                    self._merge_wal()
            finally:
                self._writer.close()

    def _merge_wal(self) -> None:
        """Checkpoint the WAL into the database file; where it cannot be (a reader holds it,
        the disk is full), the WAL stays beside it, valid, and is merged on the next open."""
        try:
            busy, _, _ = self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.OperationalError as err:
            if not disk_is_full(err):
                raise
            log.error("%s: the disk is full, the WAL stays unmerged (it is still valid)", self.path)
            return
        if busy:
            log.warning("%s: the WAL could not be merged, another reader holds it", self.path)

    def set_meta(self, values: dict[str, str]) -> None:
        """Record facts about the collection (model fingerprint, embedding size)."""
        with self._transaction() as db:
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", values.items())

    def meta(self) -> dict[str, str]:
        """The recorded facts."""
        with self._reading() as db:
            return dict(db.execute("SELECT key, value FROM meta").fetchall())

    def insert(self, items: Sequence[NewItem], embeddings: np.ndarray) -> tuple[list[int], int]:
        """Store items in one transaction; returns their ids and the seq of the last change."""
        now = time.time()
        ids = []
        with self._transaction() as db:
            for item, embedding in zip(items, embeddings, strict=True):
                blob = np.ascontiguousarray(embedding, dtype=np.float32).tobytes()
                fields = (item.external_id, item.path, item.label, item.sha256)
                try:
                    cursor = db.execute(
                        "INSERT INTO items (external_id, path, label, sha256, added_at, embedding)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        (*fields, now, blob),
                    )
                except sqlite3.IntegrityError as err:
                    raise DuplicateExternalId(
                        f"another image already has the external id {item.external_id!r}"
                    ) from err
                item_id = int(cursor.lastrowid)
                checksum = row_checksum((item_id, *fields, now, blob))  # as SQLite returns it
                db.execute("UPDATE items SET checksum = ? WHERE id = ?", (checksum, item_id))
                ids.append(item_id)
            db.executemany(
                "INSERT INTO changes (op, item_id) VALUES ('add', ?)", [(i,) for i in ids]
            )
            seq = _last_seq(db)
        return ids, seq

    def delete(self, item_id: int) -> tuple[Item, int] | None:
        """Remove an item; returns it and the seq of the change, or None when there is none."""
        with self._transaction() as db:
            item = _item(db, item_id)
            if item is None:
                return None
            db.execute("DELETE FROM items WHERE id = ?", (item_id,))
            db.execute("INSERT INTO changes (op, item_id) VALUES ('delete', ?)", (item_id,))
            return item, _last_seq(db)

    def forget_changes(self, up_to: int) -> None:
        """Drop the change log up to a seq a snapshot contains (seqs are never reused)."""
        with self._transaction() as db:
            db.execute("DELETE FROM changes WHERE seq <= ?", (up_to,))

    def get(self, item_id: int) -> Item | None:
        """The item of that id, if any."""
        with self._reading() as db:
            return _item(db, item_id)

    def page(self, label: str | None, offset: int, limit: int) -> tuple[list[Item], int]:
        """Items in the order they were added, from offset, at most limit, optionally only
        those with a label ('' = without one); and how many there are in all."""
        where, arguments = "", ()
        if label is not None:
            where, arguments = "WHERE COALESCE(label, '') = ?", (label,)
        with self._reading() as db:
            total = db.execute(f"SELECT COUNT(*) FROM items {where}", arguments).fetchone()[0]
            rows = db.execute(
                f"SELECT {ITEM_COLUMNS} FROM items {where} ORDER BY id LIMIT ? OFFSET ?",
                (*arguments, limit, offset),
            ).fetchall()
        return [Item(*row) for row in rows], int(total)

    def rows(self, ids: set[int]) -> dict[int, tuple[str, str | None]]:
        """Path and label of each of these ids that exists."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._reading() as db:
            found = db.execute(
                f"SELECT id, path, label FROM items WHERE id IN ({marks})", tuple(ids)
            ).fetchall()
        return {row[0]: (row[1], row[2]) for row in found}

    def ids(self, label: str | None = None, sha256: str | None = None) -> np.ndarray:
        """The ids of every item, or of those with this label or content hash."""
        query, arguments = "SELECT id FROM items", ()
        if label is not None:
            query, arguments = "SELECT id FROM items WHERE label = ?", (label,)
        elif sha256 is not None:
            query, arguments = "SELECT id FROM items WHERE sha256 = ?", (sha256,)
        with self._reading() as db:
            rows = db.execute(query, arguments).fetchall()
        return np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))

    def sha256s(self) -> set[str]:
        """The content hashes of every item."""
        with self._reading() as db:
            rows = db.execute("SELECT DISTINCT sha256 FROM items WHERE sha256 IS NOT NULL")
            return {row[0] for row in rows}

    def contents_by_path(self) -> dict[str, str | None]:
        """Each item's path with its content hash (one of them where a path is stored twice)."""
        with self._reading() as db:
            return dict(db.execute("SELECT path, sha256 FROM items").fetchall())

    def embeddings(
        self, dim: int, ids: np.ndarray | None = None, chunk: int = 50_000
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, embeddings) in chunks: of every item, or of the given ids that exist."""
        with self._reading() as db:
            if ids is None:
                last = 0
                while True:
                    rows = db.execute(
                        "SELECT id, embedding FROM items WHERE id > ? ORDER BY id LIMIT ?",
                        (last, chunk),
                    ).fetchall()
                    if not rows:
                        return
                    last = rows[-1][0]
                    yield _matrix(rows, dim)
            else:
                for start in range(0, len(ids), chunk):
                    part = [int(i) for i in ids[start : start + chunk]]
                    marks = ",".join("?" * len(part))
                    rows = db.execute(
                        f"SELECT id, embedding FROM items WHERE id IN ({marks})", part
                    ).fetchall()
                    if rows:
                        yield _matrix(rows, dim)

    def labels(self) -> dict[str | None, int]:
        """How many items carry each label."""
        with self._reading() as db:
            return dict(db.execute("SELECT label, COUNT(*) FROM items GROUP BY label").fetchall())

    def count(self) -> int:
        """How many items there are."""
        with self._reading() as db:
            return db.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def last_seq(self) -> int:
        """The seq of the latest change, 0 before any."""
        with self._reading() as db:
            return _last_seq(db)


def _last_seq(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
    return int(row[0]) if row else 0


def _item(db: sqlite3.Connection, item_id: int) -> Item | None:
    row = db.execute(f"SELECT {ITEM_COLUMNS} FROM items WHERE id = ?", (item_id,)).fetchone()
    return Item(*row) if row else None


def _matrix(rows: list[tuple[int, bytes]], dim: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
    vectors = np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float32)
    return ids, vectors.reshape(len(rows), dim)
