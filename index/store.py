"""The item store: every item with its embedding and the change log; the source of truth.

`BaseItemStore` is what the gallery, recovery, snapshots and uploads use, written once over the
SQL that SQLite and PostgreSQL both speak; `ItemStore` (index/sqlite_store.py) keeps the items in
one SQLite file (the default), `PostgresItemStore` (index/pg_store.py) in a PostgreSQL database.
Either way a write returns only once committed, every add and delete appends to `changes`, whose
seq orders them (a FAISS snapshot records the last seq it contains), and ids are never reused.
"""

from __future__ import annotations

import logging
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from index.errors import DuplicateExternalId

log = logging.getLogger(__name__)


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
FORGOTTEN_CHANGES = "forgotten_changes"  # meta: the change log holds no seq up to this one
INSERT_ROW = f"INSERT INTO items ({CHECKED_COLUMNS}, checksum) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"


def row_checksum(row: Sequence) -> int:
    """CRC-32 of a row's CHECKED_COLUMNS as the database returns them (ints, strs, a float and
    bytes, alike in SQLite and PostgreSQL): finds a row whose bytes changed on disk in ways the
    database's own checks do not see (a flipped bit in a value)."""
    *fields, embedding = row
    head = "\x1f".join(repr(value) for value in fields).encode()
    return zlib.crc32(embedding, zlib.crc32(head))


class Statements(Protocol):
    """What the shared SQL runs on: a sqlite3 connection, or a psycopg cursor that takes the
    same ? placeholders (index/pg_store.py)."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Any: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any: ...


class BaseItemStore(ABC):
    """Items, their embeddings and the change log, whatever database holds them.

    A subclass provides the connections (`_reading`, `_transaction`: one that holds the writers'
    turn, so that within it the ids and seqs it takes are the latest), the seq of the last change
    and new ids; the queries are here, once.
    """

    @abstractmethod
    def _reading(self) -> AbstractContextManager[Statements]:
        """A connection to read with, committed after each statement."""

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[Statements]:
        """A write transaction, committed (durably) when the block ends, rolled back on error."""

    @abstractmethod
    def _last_seq(self, db: Statements) -> int:
        """The seq of the latest change, 0 before any (in a transaction: its own latest)."""

    @abstractmethod
    def _new_ids(self, db: Statements, count: int) -> list[int]:
        """Ids for count new items, above every id ever given, inside a write transaction."""

    @abstractmethod
    def close(self) -> None:
        """Close every connection; the store is unusable afterwards."""

    @abstractmethod
    def back_up(self, path: Path) -> None:
        """Write the items, the change log and meta, as of one moment, to a new SQLite file."""

    def set_meta(self, values: dict[str, str]) -> None:
        """Record facts about the collection (model fingerprint, embedding size, added
        classes), and tell the processes that follow it."""
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                values.items(),
            )
            self._announce(db, self._last_seq(db))

    def meta(self) -> dict[str, str]:
        """The recorded facts."""
        with self._reading() as db:
            return dict(db.execute("SELECT key, value FROM meta").fetchall())

    def insert(self, items: Sequence[NewItem], embeddings: np.ndarray) -> tuple[list[int], int]:
        """Store items in one transaction; returns their ids and the seq of the last change."""
        now = time.time()
        with self._transaction() as db:
            _refuse_taken_external_ids(db, items)
            ids = self._new_ids(db, len(items))
            rows = [
                (i, item.external_id, item.path, item.label, item.sha256, now, _blob(embedding))
                for i, item, embedding in zip(ids, items, embeddings, strict=True)
            ]
            db.executemany(INSERT_ROW, [(*row, row_checksum(row)) for row in rows])
            db.executemany(
                "INSERT INTO changes (op, item_id) VALUES ('add', ?)", [(i,) for i in ids]
            )
            seq = self._last_seq(db)
            self._announce(db, seq)
            return ids, seq

    def delete(self, item_id: int) -> tuple[Item, int] | None:
        """Remove an item; returns it and the seq of the change, or None when there is none."""
        with self._transaction() as db:
            item = _item(db, item_id)
            if item is None:
                return None
            db.execute("DELETE FROM items WHERE id = ?", (item_id,))
            db.execute("INSERT INTO changes (op, item_id) VALUES ('delete', ?)", (item_id,))
            seq = self._last_seq(db)
            self._announce(db, seq)
            return item, seq

    shared = False  # whether other processes may write to it meanwhile (index/gallery.py)

    def announcements(self) -> AbstractContextManager[Callable[[float], int | None]]:
        """A wait for the next change any process commits, where the store is shared."""
        raise NotImplementedError(f"{type(self).__name__} is not shared with other processes")

    @contextmanager
    def snapshot_turn(self) -> Iterator[bool]:
        """Whether this process may write the folder's snapshot now (always, but where replicas
        share the folder: then one at a time), held until the block ends."""
        yield True

    def _announce(self, db: Statements, seq: int) -> None:
        """Tell the other processes that follow the collection of a change, on commit (a
        store that no other process follows has nothing to do)."""
        return None

    def forget_changes(self, up_to: int) -> None:
        """Drop the change log up to a seq a snapshot contains (seqs are never reused), and
        record how far it was dropped, for changes_since."""
        with self._transaction() as db:
            db.execute("DELETE FROM changes WHERE seq <= ?", (up_to,))
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (FORGOTTEN_CHANGES, str(up_to)),
            )

    def changes_since(self, seq: int) -> list[tuple[int, str, int]] | None:
        """The changes after seq, (seq, op, item_id) in order; None when the log no longer
        holds all of them (dropped up to a later snapshot's seq)."""
        with self._reading() as db:
            found = db.execute("SELECT value FROM meta WHERE key = ?", (FORGOTTEN_CHANGES,))
            forgotten = found.fetchone()
            if forgotten is not None and int(forgotten[0]) > seq:
                return None
            rows = db.execute(
                "SELECT seq, op, item_id FROM changes WHERE seq > ? ORDER BY seq", (seq,)
            ).fetchall()
        return [(int(s), op, int(i)) for s, op, i in rows]

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

    def mean_embedding(self, dim: int) -> np.ndarray:
        """The mean of every stored embedding (float64; zeros when there are none)."""
        total, count = np.zeros(dim), 0
        for _, vectors in self.embeddings(dim):
            total += vectors.sum(0, dtype=np.float64)
            count += len(vectors)
        return total / max(count, 1)

    def labelled_sample(self, dim: int, per_label: int) -> tuple[np.ndarray, np.ndarray]:
        """The labels and embeddings of at most per_label items of each label (the first
        added), labelled items only."""
        with self._reading() as db:  # the ids chosen first: no embedding read that is not kept
            rows = db.execute(
                "SELECT label, embedding FROM items WHERE id IN (SELECT id FROM (SELECT id, "
                "ROW_NUMBER() OVER (PARTITION BY label ORDER BY id) AS n FROM items "
                "WHERE label IS NOT NULL) AS firsts WHERE n <= ?) ORDER BY label, id",
                (per_label,),
            ).fetchall()
        labels = np.asarray([row[0] for row in rows], dtype=object)
        vectors = np.frombuffer(b"".join(bytes(row[1]) for row in rows), dtype=np.float32)
        return labels, vectors.reshape(len(rows), dim)

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
            return self._last_seq(db)


def _refuse_taken_external_ids(db: Statements, items: Sequence[NewItem]) -> None:
    """DuplicateExternalId for the first item whose external id is stored already or given
    earlier in the batch (asked inside the write transaction, so no other writer is between)."""
    wanted = [item.external_id for item in items if item.external_id is not None]
    if not wanted:
        return
    marks = ",".join("?" * len(wanted))
    query = f"SELECT external_id FROM items WHERE external_id IN ({marks})"
    seen = {row[0] for row in db.execute(query, wanted).fetchall()}
    for external_id in wanted:
        if external_id in seen:
            raise DuplicateExternalId(f"another image already has the external id {external_id!r}")
        seen.add(external_id)


def _blob(embedding: np.ndarray) -> bytes:
    return np.ascontiguousarray(embedding, dtype=np.float32).tobytes()


def _item(db: Statements, item_id: int) -> Item | None:
    row = db.execute(f"SELECT {ITEM_COLUMNS} FROM items WHERE id = ?", (item_id,)).fetchone()
    return Item(*row) if row else None


def _matrix(rows: list[tuple[int, bytes]], dim: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
    vectors = np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float32)
    return ids, vectors.reshape(len(rows), dim)
