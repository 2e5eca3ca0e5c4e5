"""A gallery: a living collection of normalised embeddings searched by inner product.

The item store (index/store.py: SQLite, or PostgreSQL) holds the items; a FAISS index
(index/vectors.py) is derived from it; one folder per collection holds both, or the snapshots
beside a database (index/folder.py). A write commits to the store, then updates FAISS, both under
the write side of a readers-writer lock, and returns only then: what was acknowledged is stored,
and no search sees the store and FAISS disagree. At load the snapshot is caught up with the store
or rebuilt from it, loudly (index/recovery.py); replicas follow each other's writes (`follow`).
The index kind is the one asked for, or chosen for the size within a memory limit
(index/kinds.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from index import duplicates, folder, recovery, search
from index.database import Database
from index.duplicates import Added
from index.errors import (
    ItemNotFound,
    ModelMismatch,
    disk_full_refused,
)
from index.items import ADDED_CLASSES, StoredItems
from index.kinds import KindChoice
from index.locks import ReadWriteLock
from index.search import Neighbour
from index.snapshot import Snapshots
from index.store import BaseItemStore, Item, NewItem
from index.uploads import KeptImages
from index.vectors import VectorIndex, rows_of

log = logging.getLogger(__name__)

MAX_INDEX_MEMORY = "max_index_memory"  # the meta key of the collection's memory limit


class GalleryIndex(StoredItems):
    """Items searched by inner product; the item store holds them, FAISS is derived from it.
    What the store answers alone (items, hashes, labels, added classes) is StoredItems'."""

    def __init__(
        self,
        store: BaseItemStore,
        directory: Path | None,
        fingerprint: str,
        kind: KindChoice,
        snapshot_every: int,
        uploads: str | None = None,
    ):
        self.store = store
        self.directory = directory  # the collection's folder; None for a collection in memory
        self.fingerprint = fingerprint
        self.kind = kind
        self.vectors = VectorIndex.empty(kind.dim, kind.for_size(0))
        self._images = KeptImages(self.directory, uploads)
        self._snapshots = Snapshots(self.directory, store, snapshot_every)
        self._lock = ReadWriteLock()
        self._applied_seq = 0  # the last change the FAISS index contains

    @property
    def dim(self) -> int:
        """Embedding size."""
        return self.kind.dim

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def last_change(self) -> int:
        """The seq of the last add or delete the index contains."""
        return self._applied_seq

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        dim: int,
        fingerprint: str,
        directory: Path | None = None,
        factory: str | None = None,
        snapshot_every: int = 1000,
        max_index_memory: int | None = None,
        database: Database | None = None,
        uploads: str | None = None,
    ) -> GalleryIndex:
        """A new empty collection, in memory or in a folder that holds none yet (with a
        database, one that holds none yet keeps the items). Without a factory, the index kind is
        chosen from the size, within max_index_memory bytes if given (recorded with it)."""
        store = folder.new_store(directory, database)
        limit = {} if max_index_memory is None else {MAX_INDEX_MEMORY: str(max_index_memory)}
        store.set_meta({"fingerprint": fingerprint, "dim": str(dim), **limit})
        kind = KindChoice(dim, factory, max_index_memory)
        return cls(store, directory, fingerprint, kind, snapshot_every, uploads)

    @classmethod
    def load(
        cls,
        directory: Path,
        fingerprint: str | None = None,
        factory: str | None = None,
        snapshot_every: int = 1000,
        thorough_check: bool = False,
        database: Database | None = None,
        uploads: str | None = None,
    ) -> GalleryIndex:
        """Open a collection (its items in the database if given), checked (SQLite's
        integrity_check if thorough_check, else its quick_check; every row's checksum); with a
        fingerprint, refuse one built with another model."""
        store = folder.existing_store(directory, thorough_check, database)
        meta = store.meta()
        limit = int(meta[MAX_INDEX_MEMORY]) if MAX_INDEX_MEMORY in meta else None
        kind = KindChoice(int(meta["dim"]), factory, limit)
        gallery = cls(store, directory, meta["fingerprint"], kind, snapshot_every, uploads)
        if fingerprint is not None:
            try:
                gallery.check_model(fingerprint)
            except ModelMismatch:
                store.close()
                raise
        gallery._start()
        return gallery

    def _start(self) -> None:
        """Load the snapshot and catch it up with the store, or rebuild the index from it."""
        assert self.directory is not None
        with self._lock.write():
            self.vectors, snapshot_seq = recovery.opened(
                self.directory, self.store, self.fingerprint, self.kind
            )
            self._applied_seq = self.store.last_seq()
            if self.store.shared:  # other processes may have written while it was opened
                self._applied_seq = recovery.compared(self.vectors, self.store, self.dim)
        if snapshot_seq is None:
            self.snapshot()
        else:
            self._snapshots.seq = snapshot_seq

    def limit_memory(self, max_index_memory: int) -> None:
        """Keep the index within max_index_memory bytes from now on (recorded), rebuilt now if
        that calls for IVF-PQ; ValueError, and nothing recorded, when no kind fits."""
        kind = replace(self.kind, max_memory=max_index_memory)
        factory = kind.for_size(self.store.count())
        self.store.set_meta({MAX_INDEX_MEMORY: str(max_index_memory)})
        self.kind = kind
        if factory != self.vectors.factory:
            self.rebuild()

    # -- writes --------------------------------------------------------------------------

    def add(
        self,
        embeddings: np.ndarray,
        items: Sequence[NewItem],
        duplicate_threshold: float | None = None,
        skip_duplicates: bool = False,
        contents: Sequence[bytes] | None = None,
    ) -> list[Added]:
        """Store items with their normalised embeddings and index them, in one step.

        With a threshold, each item is compared with the collection (and the items before it
        in this call); a match scoring at least the threshold is reported, and with
        skip_duplicates the item is not added. contents, when given, are the image bytes, kept
        under images/ at each item's path before the commit.
        """
        embeddings = rows_of(self.dim, embeddings)
        if len(embeddings) != len(items):
            raise ValueError("embeddings and items must have the same length")
        with self._lock.write():
            matches = search.duplicates_of(
                self.vectors, self.store, embeddings, duplicate_threshold
            )
            keep = [i for i, m in enumerate(matches) if not (skip_duplicates and m)]
            written: list[str] = []
            try:  # a failed add (duplicate external id, full disk) leaves no file behind
                with disk_full_refused("the images"):
                    for i in keep if contents is not None else []:
                        if self._images.keep(items[i].path, contents[i]):
                            written.append(items[i].path)
                    ids, seq = self.store.insert([items[i] for i in keep], embeddings[keep])
            except BaseException:
                for path in written:
                    self._images.discard(path)
                raise
            self._apply(seq, len(ids), add=(embeddings[keep], np.asarray(ids, dtype=np.int64)))
        self._snapshots.soon(self._applied_seq, self._captured)
        return duplicates.outcomes(matches, dict(zip(keep, ids, strict=True)))

    def fill(self, embeddings: np.ndarray, items: Sequence[NewItem]) -> None:
        """Store the first items of an empty collection and build its index from their
        embeddings in one step: of the kind for their number, trained and tuned on them."""
        embeddings = rows_of(self.dim, embeddings)
        with self._lock.write():
            if self.store.count():
                raise ValueError("the collection is not empty: add to it instead")
            ids, seq = self.store.insert(items, embeddings)
            ids = np.asarray(ids, dtype=np.int64)
            kind = self.kind.for_size(len(ids))
            self.vectors = VectorIndex.built(self.dim, kind, ids, embeddings)
            self._applied_seq = seq

    def delete(self, item_id: int) -> Item:
        """Remove an item (and its kept image when no other item shares it); returns it."""
        with self._lock.write(), disk_full_refused(f"the deletion of image {item_id}"):
            found = self.store.delete(item_id)
            if found is None:
                raise ItemNotFound(f"there is no image with id {item_id}")
            item, seq = found
            self._apply(seq, 1, remove=np.asarray([item_id], dtype=np.int64))
            self._images.forget(item, self.store)
        self._snapshots.soon(self._applied_seq, self._captured)
        return item

    def _apply(
        self,
        seq: int,
        count: int,
        add: tuple[np.ndarray, np.ndarray] | None = None,
        remove: np.ndarray | None = None,
    ) -> None:
        """Bring FAISS up to this process's committed write of `count` changes up to seq
        (index/recovery.py); when another process's changes came before them in the shared
        store, take them all from the change log, in order."""
        if seq - count != self._applied_seq:
            self._apply_log(self.store.changes_since(self._applied_seq))
            return
        self.vectors = recovery.applied(self.vectors, self.store, self.kind, add, remove)
        self._applied_seq = seq

    # -- following the changes of other processes ----------------------------------------

    def follow(self) -> int:
        """Apply the changes other processes (replicas on one database) committed since the
        last one applied; returns the seq of the last change applied."""
        with self._lock.write():
            self._apply_log(self.store.changes_since(self._applied_seq))
            return self._applied_seq

    def _apply_log(self, changes: list[tuple[int, str, int]] | None) -> None:
        """Under the write lock: FAISS brought through the logged changes after the last one
        applied, or, where the log no longer reaches back that far (None), compared whole."""
        if changes is None:
            log.warning(
                "the change log no longer reaches back to change %d: comparing every id of the "
                "index with the store's",
                self._applied_seq,
            )
            self._applied_seq = recovery.compared(self.vectors, self.store, self.dim)
        elif changes:
            self.vectors = recovery.through_log(self.vectors, self.store, self.kind, changes)
            self._applied_seq = changes[-1][0]

    def image_path(self, sha256: str, suffix: str) -> str:
        """Where an uploaded image of this content is kept."""
        return self._images.path(sha256, suffix)

    def image_file(self, item: Item) -> Path:
        """A file on this machine holding an item's image (fetched, for one kept in an object
        store); it may not exist, when the image is gone."""
        return self._images.local(item.path)

    # -- reads ---------------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        k: int,
        label: str | None = None,
        exclude: Iterable[int] = (),
    ) -> list[list[Neighbour]]:
        """The k nearest items of each query, best first, optionally only those with a label
        and never the excluded ids."""
        queries = rows_of(self.dim, queries.reshape(-1, self.dim) if queries.ndim == 1 else queries)
        with self._lock.read():
            return self._search(queries, k, label, set(exclude))

    def search_by_id(self, item_id: int, k: int, label: str | None = None) -> list[Neighbour]:
        """The k nearest items of a stored item, leaving it out."""
        with self._lock.read():
            vectors = list(self.store.embeddings(self.dim, np.asarray([item_id])))
            if not vectors:
                raise ItemNotFound(f"there is no image with id {item_id}")
            return self._search(vectors[0][1], k, label, {item_id})[0]

    def _search(
        self, queries: np.ndarray, k: int, label: str | None, exclude: set[int]
    ) -> list[list[Neighbour]]:
        return search.nearest(self.vectors, self.store, queries, k, label, exclude)

    def keep_added_classes(self, text: str) -> None:
        """Replace the added classes, durably (answered after the commit)."""
        with self._lock.write(), disk_full_refused("the change of classes"):
            self.store.set_meta({ADDED_CLASSES: text})

    def info(self) -> dict[str, Any]:
        """Size, index kind, model and change counters, for GET /index."""
        with self._lock.read():
            return {
                "size": len(self),
                "index_type": self.vectors.factory,
                "model": self.fingerprint,
                "dim": self.dim,
                "last_change": self._applied_seq,
                "snapshot_change": self._snapshots.seq,
                "search_params": self.vectors.search_params,
            }

    def consistent(self) -> bool:
        """Whether FAISS holds exactly the ids the store holds (a full scan: for checks, tests)."""
        with self._lock.read():
            live, held = self.store.ids(), self.vectors.ids()
            return len(live) == len(held) and bool(np.array_equal(np.sort(live), np.sort(held)))

    # -- rebuilding and snapshots ---------------------------------------------------------

    def rebuild(self) -> None:
        """Rebuild the index from the store (compacts deletions hidden from HNSW), then snapshot."""
        with self._lock.write():
            self.vectors = recovery.rebuilt(self.store, self.kind)
            self._applied_seq = self.store.last_seq()
        self.snapshot()

    def snapshot(self) -> None:
        """Write the index and the last change it contains to disk (no-op in memory)."""
        self._snapshots.take(self._captured)

    def _captured(self) -> tuple[np.ndarray, dict[str, Any]]:
        with self._lock.read():
            data, about = self.vectors.serialized()
            return data, {
                "last_seq": self._applied_seq,
                "fingerprint": self.fingerprint,
                "dim": self.dim,
                **about,
            }

    def close(self) -> None:
        """Snapshot what changed (unless the disk is full: see Snapshots.last) and close the
        database; the object is unusable afterwards."""
        self._snapshots.last(self._applied_seq, self._captured)
        self.store.close()
