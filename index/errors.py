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


class IncompatibleIndex(IndexProblem):
    """The index was written by a newer imgsim, in a format this one does not know."""


class DatabaseUnavailable(IndexProblem):
    """The database that holds the items cannot be reached or used."""


class InsufficientStorage(IndexProblem):
    """The disk (or quota) is full: nothing of the write was kept."""


def disk_is_full(err: BaseException) -> bool:
    """Whether an error says the disk (or quota) is full: ENOSPC, EDQUOT, SQLite's SQLITE_FULL."""
    return getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (
        getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    )


@contextmanager
def disk_full_refused(what: str) -> Iterator[None]:
    """Turn a full disk into InsufficientStorage, naming what could not be stored."""
    try:
        yield
    except (OSError, sqlite3.OperationalError) as err:
        if not disk_is_full(err):
            raise
        raise InsufficientStorage(
            f"the disk is full: {what} could not be stored, and nothing of it was kept; "
            "try again once space is freed"
        ) from err
