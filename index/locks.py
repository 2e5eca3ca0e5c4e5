"""A readers-writer lock: searches share it, writes hold it alone.

FAISS searches are safe against each other but not against a concurrent add or remove, and the
SQLite commit and the FAISS update of one write must look like one step to every search.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ReadWriteLock:
    """Many readers or one writer, phase-fair: a waiting writer holds back new readers, and
    the readers waiting when a write ends go before the next writer, so neither side starves.

    Not re-entrant: code holding it must not take it again.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._readers_waiting = 0
        self._readers_turn = False
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        """Hold the lock shared with other readers."""
        with self._condition:
            self._readers_waiting += 1
            while self._writing or (self._writers_waiting and not self._readers_turn):
                self._condition.wait()
            self._readers_waiting -= 1
            self._readers += 1
            if not self._readers_waiting and self._readers_turn:
                self._readers_turn = False
                self._condition.notify_all()
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                if not self._readers:
                    self._condition.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        """Hold the lock alone."""
        with self._condition:
            self._writers_waiting += 1
            while self._writing or self._readers or self._readers_turn:
                self._condition.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._condition:
                self._writing = False
                self._readers_turn = self._readers_waiting > 0
                self._condition.notify_all()
