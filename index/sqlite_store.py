"""SQLite as a collection's item store: items.sqlite in the collection's folder (the default).

The queries are BaseItemStore's (index/store.py). SQLite runs in WAL mode with synchronous=FULL:
a commit returns only once its WAL frames are fsynced, so an acknowledged write survives a kill -9
of the process and a power loss. (NORMAL would survive kill -9 too, since the WAL is in the OS
page cache, but could lose the last commits on power loss.)
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from index.errors import IndexCorrupt, disk_is_full
from index.store import CHECKED_COLUMNS, INSERT_ROW, BaseItemStore, Statements, row_checksum

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


class ItemStore(BaseItemStore):
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
            self._writer.execute("BEGIN IMMEDIATE")  # the write lock: one writer at a time
            try:
                yield self._writer
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            self._writer.execute("COMMIT")

    def _last_seq(self, db: Statements) -> int:
        return _sqlite_sequence(db, "changes")

    def _new_ids(self, db: Statements, count: int) -> list[int]:
        # AUTOINCREMENT keeps the largest id ever given in sqlite_sequence, and raises it when a
        # larger one is inserted; BEGIN IMMEDIATE keeps other writers out meanwhile.
        last = _sqlite_sequence(db, "items")
        return list(range(last + 1, last + 1 + count))

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

    def back_up(self, path: Path) -> None:
        """SQLite's online backup API: one consistent state, safe while another process
        writes; the copy is one file, complete by itself."""
        target = sqlite3.connect(path)
        try:
            with self._reading() as db:
                db.backup(target)
            target.execute("PRAGMA journal_mode = DELETE")
        finally:
            target.close()

    def restore(
        self,
        meta: Iterable[tuple[str, str]],
        rows: Iterable[Sequence[Any]],
        changes: Iterable[Sequence[Any]],
        last_id: int,
        last_seq: int,
    ) -> None:
        """Fill an empty store with another store's contents in one transaction: meta, rows
        (CHECKED_COLUMNS and checksum, ids kept), the change log, and the last id and seq ever
        given, so that ids and seqs go on where the other store's would."""
        with self._transaction() as db:
            db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta)
            db.executemany(INSERT_ROW, rows)
            db.executemany("INSERT INTO changes (seq, op, item_id) VALUES (?, ?, ?)", changes)
            for name, last in (("items", last_id), ("changes", last_seq)):
                db.execute("DELETE FROM sqlite_sequence WHERE name = ?", (name,))
                db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (name, last))


def _sqlite_sequence(db: Statements, table: str) -> int:
    """The last id (or seq) AUTOINCREMENT gave in a table, 0 before any."""
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
    return int(row[0]) if row else 0
