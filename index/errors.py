"""Errors of the index package, each a sentence a person can act on."""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager


class IndexProblem(Exception):
    """Base class for index errors."""


class IndexMissing(IndexProblem):
    """No index has been written at that place."""


class ModelMismatch(IndexProblem):
    """The index was built with other weights than the model asked to search it."""


class EmptyIndex(IndexProblem):
    """The index holds no items, so there is nothing to search."""


class ItemNotFound(IndexProblem):
    """No item of the collection has that id."""


class DuplicateExternalId(IndexProblem):
    """Another item of the collection already carries that external id."""


class IndexCorrupt(IndexProblem):
    """The item database cannot be read; the index is refused rather than served empty."""


class InsufficientStorage(IndexProblem):
    """The disk (or quota) is full: nothing of the write was kept."""


@contextmanager
def disk_full_refused(what: str) -> Iterator[None]:
    """Turn a full disk (ENOSPC, EDQUOT, SQLite's SQLITE_FULL) into InsufficientStorage."""
    try:
        yield
    except (OSError, sqlite3.OperationalError) as err:
        full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (
            getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
        )
        if not full:
            raise
        raise InsufficientStorage(
            f"the server's disk is full: {what} could not be stored, and nothing of it was kept"
        ) from err
