"""Checking a collection's item database before it is opened: a file that is empty, not SQLite,
SQLite but not an index, or damaged is named plainly, with what to do, instead of being served.
The checks of what it records (model facts, row checksums) serve PostgreSQL's too."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from index.errors import IndexCorrupt
from index.store import CHECKED_COLUMNS, Statements, row_checksum

log = logging.getLogger(__name__)

SQLITE_HEADER = b"SQLite format 3\x00"
TABLES = ("meta", "items", "changes")  # see index/store.py
META_KEYS = ("fingerprint", "dim")
MAX_REPORTED = 5  # problems quoted from the integrity check


def check_items_file(path: Path, thorough: bool = False) -> None:
    """Raise IndexCorrupt, saying what is wrong and what to do, unless path is a whole item
    database: SQLite's quick_check (integrity_check, which also reads every index, if thorough)."""
    fix = (
        f"Restore the folder {path.parent} from a backup (see 'imgsim backup'), or build it "
        f"again with 'imgsim index GALLERY_DIR --out {path.parent} --rebuild'."
    )
    with path.open("rb") as file:
        header = file.read(len(SQLITE_HEADER))
    if not header:
        raise IndexCorrupt(f"{path} is empty (0 bytes), so it holds no index. {fix}")
    if header != SQLITE_HEADER:
        raise IndexCorrupt(f"{path} is not a SQLite database, so not an imgsim index. {fix}")
    connection = sqlite3.connect(path)
    try:
        _check(connection, path, thorough, fix)
    except sqlite3.DatabaseError as err:
        raise IndexCorrupt(f"{path} is damaged: SQLite cannot read it ({err}). {fix}") from err
    finally:
        connection.close()


def _check(connection: sqlite3.Connection, path: Path, thorough: bool, fix: str) -> None:
    check = "integrity_check" if thorough else "quick_check"
    problems = [row[0] for row in connection.execute(f"PRAGMA {check}({MAX_REPORTED})")]
    if problems != ["ok"]:
        raise IndexCorrupt(f"{path} is damaged ({check}: {'; '.join(problems)}). {fix}")
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    missing = [table for table in TABLES if table not in tables]
    if missing:
        raise IndexCorrupt(
            f"{path} is a SQLite database but not an imgsim index (it has no "
            f"{', '.join(missing)} table). {fix}"
        )
    check_meta(connection, str(path), fix)
    columns = {row[1] for row in connection.execute("PRAGMA table_info(items)")}
    if "checksum" in columns:  # a file from before checksums gets them when the store opens it
        check_checksums(connection, str(path), fix)
    log.info("%s passed SQLite's %s and every row's checksum", path, check)


def check_meta(db: Statements, where: str, fix: str) -> None:
    """IndexCorrupt unless the collection records its model fingerprint and embedding size."""
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    absent = [key for key in META_KEYS if key not in meta]
    if absent:
        raise IndexCorrupt(f"{where} does not record the index's {', '.join(absent)}. {fix}")


def check_checksums(db: Statements, where: str, fix: str) -> None:
    """IndexCorrupt, naming the first ids, unless every row matches its checksum."""
    damaged = damaged_rows(db)
    if damaged:
        shown = ", ".join(map(str, damaged[:MAX_REPORTED])) + (" ..." if len(damaged) > 5 else "")
        raise IndexCorrupt(
            f"{where} has {len(damaged)} damaged row(s) (ids {shown}): what is stored no longer "
            f"matches its checksum, so their paths, labels or embeddings cannot be trusted. {fix}"
        )


def damaged_rows(db: Statements, chunk: int = 10_000) -> list[int]:
    """The ids of the rows whose checksum does not match what they hold (see row_checksum),
    read chunk rows at a time (a PostgreSQL result is held whole by the client)."""
    damaged, last = [], 0
    while True:
        rows = db.execute(
            f"SELECT {CHECKED_COLUMNS}, checksum FROM items"
            " WHERE id > ? AND checksum IS NOT NULL ORDER BY id LIMIT ?",
            (last, chunk),
        ).fetchall()
        if not rows:
            return damaged
        damaged += [row[0] for row in rows if row_checksum(row[:-1]) != row[-1]]
        last = rows[-1][0]
