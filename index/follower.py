"""Following a shared collection: a replica's FAISS index kept up with the changes the other
replicas commit to the one PostgreSQL database they share.

A thread listens for the seq each write announces on commit (index/pg_store.py) and applies the
change log from the last change it holds (GalleryIndex.follow); it also looks every CATCH_UP_S
without being woken, in case a notification was missed. While the database is out of reach it
says why (for /ready) and tries again every RETRY_S, so that a replica recovers without a restart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from index.errors import DatabaseUnavailable
from index.gallery import GalleryIndex

log = logging.getLogger(__name__)

CATCH_UP_S = 2.0  # the longest a missed notification can hide a change
RETRY_S = 1.0  # between tries to reach the database again
STOP_CHECK_S = 0.5  # the longest stop waits for the thread


@dataclass(frozen=True)
class FollowerState:
    """How far a replica's index is behind the shared collection."""

    applied: int  # the last change its index holds
    latest: int  # the latest change it knows was committed
    lag_seconds: float  # since it first knew of a change it has not applied; 0 when none
    problem: str | None  # why it cannot follow now (the database is out of reach), or None

    @property
    def lag_changes(self) -> int:
        """Changes committed and not yet applied."""
        return max(self.latest - self.applied, 0)


class ChangeFollower:
    """Applies the changes of the other processes that share a gallery's item store, and hands
    on the classes added from examples whenever another process changed them."""

    def __init__(
        self,
        gallery: GalleryIndex,
        classes_changed: Callable[[str | None], None] = lambda text: None,
        catch_up_every: float = CATCH_UP_S,
    ):
        self.gallery = gallery
        self.classes_changed = classes_changed
        self._classes = gallery.added_classes()
        self.catch_up_every = catch_up_every
        self._latest = gallery.last_change
        self._behind_since: float | None = None
        self._problem: str | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imgsim-follower", daemon=True)

    def start(self) -> None:
        """Follow in a thread of its own until stop."""
        self._thread.start()

    def stop(self) -> None:
        """Stop following (within STOP_CHECK_S, or the change being applied)."""
        self._stopping.set()
        self._thread.join(timeout=STOP_CHECK_S + 10)

    def state(self) -> FollowerState:
        """The applied and latest change, the lag, and any problem: read without the database."""
        behind = self._behind_since
        applied = self.gallery.last_change
        return FollowerState(
            applied=applied,
            latest=max(self._latest, applied),
            lag_seconds=time.monotonic() - behind if behind is not None else 0.0,
            problem=self._problem,
        )

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                with self.gallery.store.announcements() as wait:
                    self._catch_up(None)  # listening already: nothing committed from now is missed
                    last = time.monotonic()
                    while not self._stopping.is_set():
                        announced = wait(STOP_CHECK_S)  # in slices, so that stop is prompt
                        if announced is not None or time.monotonic() - last >= self.catch_up_every:
                            self._catch_up(announced)
                            last = time.monotonic()
            except DatabaseUnavailable as err:
                if self._problem is None:
                    log.error("cannot follow the collection's changes: %s", err)
                self._problem = str(err)
                self._stopping.wait(RETRY_S)
            except Exception as err:  # a bug must not end following for good: log, try again
                log.exception("following the collection's changes failed")
                self._problem = f"following the collection's changes failed: {err}"
                self._stopping.wait(RETRY_S)

    def _catch_up(self, announced: int | None) -> None:
        """Note the latest change announced, if any, then apply the log."""
        if announced is not None and announced > self.gallery.last_change:
            self._latest = max(self._latest, announced)
            if self._behind_since is None:
                self._behind_since = time.monotonic()
        applied = self.gallery.follow()
        classes = self.gallery.added_classes()
        if classes != self._classes:
            self._classes = classes
            self.classes_changed(classes)
        if self._problem is not None:
            log.info("following the collection's changes again, from change %d", applied)
            self._problem = None
        self._latest = max(self._latest, applied)
        if applied >= self._latest:
            self._behind_since = None
