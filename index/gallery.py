"""A gallery: a living collection of normalised embeddings searched by inner product.

On disk, one folder per collection:
    items.sqlite (+ -wal, -shm)   every item and its embedding, the change log, the model facts;
                                  the source of truth (see index/store.py for its guarantees)
    snapshot-SEQ-XXXX.faiss       the FAISS index as of change SEQ, derived from SQLite
    snapshot.json                 names the snapshot, its seq, fingerprint, dim, factory, params
    images/SHA256.EXT             uploaded images, kept so that an item's path is a real file

A write commits to SQLite first, then updates FAISS, both under the write side of a
readers-writer lock, and returns only then: what was acknowledged is on disk, and no search
sees SQLite and FAISS disagree. At load the snapshot is caught up with SQLite by comparing ids
(ids are never reused); a missing, corrupt or mismatched snapshot is rebuilt from the stored
embeddings, loudly. Indexes that cannot remove ids (HNSW) hide deleted ones with a selector
until the next rebuild.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index import kinds
from index.errors import EmptyIndex, IndexMissing, ItemNotFound, ModelMismatch
from index.locks import ReadWriteLock
from index.snapshot import SnapshotUnusable, read_snapshot, write_snapshot
from index.store import Item, ItemStore, NewItem
from models.files import atomic_write

log = logging.getLogger(__name__)

ITEMS_FILE = "items.sqlite"
IMAGES_DIR = "images"
LEGACY_POINTER = "CURRENT"  # the folder format before the living collection
EXACT = "Flat"
TUNING_QUERIES = 200


@dataclass(frozen=True)
class Neighbour:
    """One search result."""

    id: int
    path: str
    label: str | None
    score: float


@dataclass(frozen=True)
class Added:
    """What became of one item given to add: its id (None when skipped as a duplicate) and the
    most similar item already in the collection when it scored at least the threshold."""

    id: int | None
    duplicate_of: int | None = None
    duplicate_score: float | None = None


class GalleryIndex:
    """Items searched by inner product; SQLite holds them, FAISS is derived from it."""

    def __init__(
        self,
        store: ItemStore,
        fingerprint: str,
        dim: int,
        factory: str | None = None,
        snapshot_every: int = 1000,
    ):
        self.store = store
        self.fingerprint = fingerprint
        self._dim = dim
        self._factory_override = factory
        self.factory = EXACT
        self.search_params: dict[str, Any] = {}
        self.snapshot_every = snapshot_every
        self.index: faiss.Index = _new_index(dim, EXACT)
        self._lock = ReadWriteLock()
        self._hidden: set[int] = set()  # deleted ids an index without remove_ids still holds
        self._applied_seq = 0  # the last change the FAISS index contains
        self._snapshot_seq = 0
        self._snapshot_mutex = threading.Lock()
        self._snapshotting: threading.Thread | None = None

    @property
    def directory(self) -> Path | None:
        """The collection's folder; None for a collection in memory."""
        return None if self.store.path is None else self.store.path.parent

    @property
    def dim(self) -> int:
        """Embedding size."""
        return self._dim

    def __len__(self) -> int:
        return self.index.ntotal - len(self._hidden)

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
    ) -> GalleryIndex:
        """A new empty collection, in memory or in a folder that holds none yet."""
        if directory is not None:
            if (directory / ITEMS_FILE).exists():
                raise FileExistsError(f"{directory} already holds a collection")
            directory.mkdir(parents=True, exist_ok=True)
        store = ItemStore(None if directory is None else directory / ITEMS_FILE)
        store.set_meta({"fingerprint": fingerprint, "dim": str(dim)})
        gallery = cls(store, fingerprint, dim, factory, snapshot_every)
        gallery.factory = factory or EXACT
        gallery.index = _new_index(dim, gallery.factory)
        return gallery

    @classmethod
    def load(
        cls,
        directory: Path,
        fingerprint: str | None = None,
        factory: str | None = None,
        snapshot_every: int = 1000,
    ) -> GalleryIndex:
        """Open a collection; with a fingerprint, refuse one built with another model."""
        if not (directory / ITEMS_FILE).is_file():
            hint = (
                " (it is in the old format, which cannot be updated)"
                if (directory / LEGACY_POINTER).exists()
                else ""
            )
            raise IndexMissing(
                f"no index at {directory}{hint}: build one with "
                "'imgsim index GALLERY_DIR --model BUNDLE'"
            )
        store = ItemStore(directory / ITEMS_FILE)
        meta = store.meta()
        gallery = cls(store, meta["fingerprint"], int(meta["dim"]), factory, snapshot_every)
        if fingerprint is not None:
            try:
                gallery.check_model(fingerprint)
            except ModelMismatch:
                store.close()
                raise
        gallery._start()
        return gallery

    def _start(self) -> None:
        """Load the snapshot and catch it up with SQLite, or rebuild the index from SQLite."""
        assert self.directory is not None
        _remove_leftovers(self.directory)
        try:
            index, info = read_snapshot(self.directory)
            self._check_snapshot(index, info)
        except SnapshotUnusable as problem:
            log.warning(
                "REBUILDING the index of %s from its %d stored embeddings: %s",
                self.directory,
                self.store.count(),
                problem,
            )
            with self._lock.write():
                self._rebuild()
            self.snapshot()
            return
        self.index, self.factory = index, info["factory"]
        self.search_params = info.get("search_params") or {}
        _apply_search_params(self.index, self.search_params)
        self._snapshot_seq = info["last_seq"]
        with self._lock.write():
            added, removed = self._catch_up()
            self._applied_seq = self.store.last_seq()
        log.info(
            "loaded index of %s as of change %d, caught up to %d (+%d, -%d): %d items",
            self.directory,
            info["last_seq"],
            self._applied_seq,
            added,
            removed,
            len(self),
        )

    def _check_snapshot(self, index: faiss.Index, info: dict[str, Any]) -> None:
        if info.get("fingerprint") != self.fingerprint or info.get("dim") != self.dim:
            raise SnapshotUnusable("the snapshot is of another model or embedding size")
        if index.d != self.dim:
            raise SnapshotUnusable(f"the snapshot holds vectors of size {index.d}")
        if info.get("last_seq", -1) > self.store.last_seq():
            raise SnapshotUnusable("the snapshot holds changes the item database does not")
        wanted = self._factory_override
        if wanted is not None and wanted != info.get("factory"):
            raise SnapshotUnusable(f"the index kind {wanted} is asked for")
        if wanted is None and _choose_factory(self.store.count(), self.dim) != info.get("factory"):
            raise SnapshotUnusable("the collection's size now calls for another index kind")

    def check_model(self, fingerprint: str) -> None:
        """Raise ModelMismatch unless the index was built with the model of this fingerprint."""
        if fingerprint != self.fingerprint:
            raise ModelMismatch(
                f"the index was built with model {self.fingerprint}, not with the model being "
                f"served ({fingerprint}); rebuild it with 'imgsim index GALLERY_DIR --model BUNDLE'"
            )

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
        embeddings = self._checked(embeddings)
        if len(embeddings) != len(items):
            raise ValueError("embeddings and items must have the same length")
        with self._lock.write():
            matches = self._duplicates(embeddings, duplicate_threshold)
            keep = [i for i, m in enumerate(matches) if not (skip_duplicates and m)]
            if contents is not None:
                for i in keep:
                    _keep_file(Path(items[i].path), contents[i])
            ids, seq = self.store.insert([items[i] for i in keep], embeddings[keep])
            self._apply(seq, add=(embeddings[keep], np.asarray(ids, dtype=np.int64)))
        self._snapshot_soon()
        id_of = dict(zip(keep, ids, strict=True))
        return [
            Added(id_of.get(i), *(_resolve(m, id_of) if m else (None, None)))
            for i, m in enumerate(matches)
        ]

    def delete(self, item_id: int) -> Item:
        """Remove an item (and its kept image when no other item shares it); returns it."""
        with self._lock.write():
            found = self.store.delete(item_id)
            if found is None:
                raise ItemNotFound(f"there is no image with id {item_id}")
            item, seq = found
            self._apply(seq, remove=np.asarray([item_id], dtype=np.int64))
            self._forget_file(item)
        self._snapshot_soon()
        return item

    def _apply(
        self,
        seq: int,
        add: tuple[np.ndarray, np.ndarray] | None = None,
        remove: np.ndarray | None = None,
    ) -> None:
        """Bring FAISS up to a committed change; if that fails, rebuild it from SQLite."""
        try:
            if not self.index.is_trained:  # an IVF index gets trained once it has items
                self._rebuild()
                return
            if add is not None and len(add[1]):
                self.index.add_with_ids(*add)
            if remove is not None:
                self._remove(remove)
        except (RuntimeError, MemoryError):
            log.exception("updating the FAISS index failed; rebuilding it from SQLite")
            self._rebuild()
        self._applied_seq = seq

    def _remove(self, ids: np.ndarray) -> None:
        try:
            self.index.remove_ids(ids)
        except RuntimeError:  # HNSW cannot remove: hide until the next rebuild
            self._hidden.update(int(i) for i in ids)

    def _keep_path(self, sha256: str, suffix: str) -> Path:
        if self.directory is None:
            raise ValueError("a collection in memory cannot keep image files")
        return self.directory / IMAGES_DIR / f"{sha256}{suffix}"

    def image_path(self, sha256: str, suffix: str) -> str:
        """Where an uploaded image of this content is kept."""
        return str(self._keep_path(sha256, suffix))

    def _forget_file(self, item: Item) -> None:
        if self.directory is None or item.sha256 is None:
            return
        path = Path(item.path)
        kept = path.parent == self.directory / IMAGES_DIR
        if kept and not len(self.store.ids(sha256=item.sha256)):
            path.unlink(missing_ok=True)

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
        queries = self._checked(queries.reshape(-1, self.dim) if queries.ndim == 1 else queries)
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
        if len(self) == 0:
            raise EmptyIndex("the index is empty: add images with POST /images or 'imgsim index'")
        selectors: list[faiss.IDSelector] = []  # kept alive until the search returns
        if label is not None:
            allowed = self.store.ids(label=label)
            if not len(allowed):
                return [[] for _ in queries]
            selectors.append(faiss.IDSelectorBatch(allowed))
        hidden = self._hidden | exclude
        if hidden:
            selectors.append(faiss.IDSelectorBatch(np.fromiter(hidden, dtype=np.int64)))
            selectors.append(faiss.IDSelectorNot(selectors[-1]))
        if label is not None and hidden:
            selectors.append(faiss.IDSelectorAnd(selectors[0], selectors[-1]))
        params = _search_parameters(self.index, selectors[-1]) if selectors else None
        distances, ids = self.index.search(queries, min(k, self.index.ntotal), params=params)
        scores = kinds.similarities(self.index, distances)  # IVF kinds search by L2
        rows = self.store.rows({int(i) for i in ids.ravel() if i >= 0})
        return [
            [
                Neighbour(int(i), *rows[int(i)], float(s))
                for i, s in zip(id_row, score_row, strict=True)
                if int(i) in rows
            ]
            for id_row, score_row in zip(ids, scores, strict=True)
        ]

    def _duplicates(
        self, embeddings: np.ndarray, threshold: float | None
    ) -> list[tuple[str, int, float] | None]:
        """For each embedding its best match at or above the threshold: ('stored', id, score)
        in the collection, or ('batch', position, score) earlier in the same call."""
        if threshold is None:
            return [None] * len(embeddings)
        best: list[tuple[str, int, float] | None] = [None] * len(embeddings)
        if len(self):
            for i, hits in enumerate(self._search(embeddings, 1, None, set())):
                if hits and hits[0].score >= threshold:
                    best[i] = ("stored", hits[0].id, hits[0].score)
        within = embeddings @ embeddings.T
        for i in range(1, len(embeddings)):
            j = int(np.argmax(within[i, :i]))
            score = float(within[i, j])
            if score >= threshold and (best[i] is None or score > best[i][2]):
                best[i] = ("batch", j, score)
        return best

    def get(self, item_id: int) -> Item:
        """The stored item of that id."""
        item = self.store.get(item_id)
        if item is None:
            raise ItemNotFound(f"there is no image with id {item_id}")
        return item

    def ids_of_content(self, sha256: str) -> list[int]:
        """The ids of items whose image has this content hash."""
        return [int(i) for i in self.store.ids(sha256=sha256)]

    def known_contents(self) -> set[str]:
        """The content hashes of every item."""
        return self.store.sha256s()

    def labels(self) -> dict[str | None, int]:
        """How many items carry each label."""
        return self.store.labels()

    def info(self) -> dict[str, Any]:
        """Size, index kind, model and change counters, for GET /index."""
        with self._lock.read():
            return {
                "size": len(self),
                "index_type": self.factory,
                "model": self.fingerprint,
                "dim": self.dim,
                "last_change": self._applied_seq,
                "snapshot_change": self._snapshot_seq,
                "search_params": self.search_params,
            }

    def consistent(self) -> bool:
        """Whether FAISS holds exactly the ids SQLite holds (a full scan: for checks and tests)."""
        with self._lock.read():
            live = self.store.ids()
            held = np.setdiff1d(_index_ids(self.index), np.fromiter(self._hidden, np.int64))
            return len(live) == len(held) and bool(np.array_equal(np.sort(live), np.sort(held)))

    # -- rebuilding and snapshots ---------------------------------------------------------

    def _catch_up(self) -> tuple[int, int]:
        """Add what SQLite has and FAISS lacks, remove the reverse; returns both counts."""
        held = _index_ids(self.index)
        live = self.store.ids()
        missing = np.setdiff1d(live, held, assume_unique=True)
        extra = np.setdiff1d(held, live, assume_unique=True)
        for ids, vectors in self.store.embeddings(self.dim, missing):
            self.index.add_with_ids(vectors, ids)
        if len(extra):
            self._remove(extra)
        return len(missing), len(extra)

    def _rebuild(self) -> None:
        """Build the index afresh from every stored embedding (caller holds the write lock)."""
        count = self.store.count()
        factory = self._factory_override or _choose_factory(count, self.dim)
        index = _new_index(self.dim, factory)
        chunks = list(self.store.embeddings(self.dim))
        if chunks:
            kinds.train_if_needed(index, chunks[0][1])
        for ids, vectors in chunks:
            index.add_with_ids(vectors, ids)
        self.index, self.factory, self._hidden = index, factory, set()
        self.search_params = _tune(index, chunks, factory)
        self._applied_seq = self.store.last_seq()
        log.info("built a %s index of %d items", factory, index.ntotal)

    def rebuild(self) -> None:
        """Rebuild the index from SQLite (compacts deletions hidden from HNSW), then snapshot."""
        with self._lock.write():
            self._rebuild()
        self.snapshot()

    def snapshot(self) -> None:
        """Write the index and the last change it contains to disk (no-op in memory)."""
        if self.directory is None:
            return
        with self._snapshot_mutex:
            with self._lock.read():
                data = faiss.serialize_index(self.index)
                info = {
                    "last_seq": self._applied_seq,
                    "fingerprint": self.fingerprint,
                    "dim": self.dim,
                    "factory": self.factory,
                    "search_params": self.search_params,
                    "count": self.index.ntotal,
                }
            write_snapshot(self.directory, data, info)
            self.store.forget_changes(info["last_seq"])
            self._snapshot_seq = info["last_seq"]

    def _snapshot_soon(self) -> None:
        """Snapshot in a background thread once enough changes have piled up."""
        due = self._applied_seq - self._snapshot_seq >= self.snapshot_every
        running = self._snapshotting is not None and self._snapshotting.is_alive()
        if due and not running and self.directory is not None:
            self._snapshotting = threading.Thread(target=self.snapshot, daemon=True)
            self._snapshotting.start()

    def close(self) -> None:
        """Snapshot what changed and close the database; the object is unusable afterwards."""
        if self._snapshotting is not None:
            self._snapshotting.join()
        if self._applied_seq != self._snapshot_seq:
            self.snapshot()
        self.store.close()

    def _checked(self, embeddings: np.ndarray) -> np.ndarray:
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(
                f"expected embeddings of shape (n, {self.dim}), got {embeddings.shape}"
            )
        return embeddings


def replace_directory(new: Path, old: Path) -> None:
    """Put a freshly built collection folder in place of an old one."""
    if old.exists():
        aside = old.with_name(f".{old.name}.old-{uuid.uuid4().hex[:6]}")
        os.rename(old, aside)
        os.rename(new, old)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(new, old)


def _resolve(match: tuple[str, int, float], id_of: dict[int, int]) -> tuple[int | None, float]:
    where, which, score = match
    return (which if where == "stored" else id_of.get(which)), score


def _keep_file(path: Path, content: bytes) -> None:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_bytes(content))


def _remove_leftovers(directory: Path) -> None:
    """Temporary files of writes a crash interrupted."""
    for leftover in [*directory.glob(".*.tmp"), *directory.glob(f"{IMAGES_DIR}/.*.tmp")]:
        leftover.unlink(missing_ok=True)


def _choose_factory(count: int, dim: int) -> str:
    return kinds.choose_factory(max(count, 1), dim)


def _new_index(dim: int, factory: str) -> faiss.Index:
    return kinds.build_index(dim, factory)


def _tune(index: faiss.Index, chunks: list[tuple[np.ndarray, np.ndarray]], factory: str) -> dict:
    """Tune an approximate index to the recall target on a sample of stored embeddings."""
    if factory == EXACT or not chunks:
        return {}
    ids = np.concatenate([c[0] for c in chunks])
    vectors = np.concatenate([c[1] for c in chunks])
    rng = np.random.default_rng(0)
    queries = vectors[rng.choice(len(vectors), min(TUNING_QUERIES, len(vectors)), replace=False)]
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(queries, 10)
    params = kinds.tune_search(index, queries, ids[truth])
    kinds.apply_search_params(index, params)
    return params


def _apply_search_params(index: faiss.Index, params: dict[str, Any]) -> None:
    if params:
        kinds.apply_search_params(index, params)


def _index_ids(index: faiss.Index) -> np.ndarray:
    """Every id the index holds: from the IDMap, or from the lists of an unwrapped IVF index."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    lists = faiss.extract_index_ivf(index).invlists
    parts = [np.zeros(0, np.int64)]
    for number in range(lists.nlist):
        if size := lists.list_size(number):
            parts.append(faiss.rev_swig_ptr(lists.get_ids(number), size).astype(np.int64))
    return np.concatenate(parts)


def _search_parameters(index: faiss.Index, selector: faiss.IDSelector) -> faiss.SearchParameters:
    """Search parameters carrying a selector and the index's own tuned settings; made afresh
    for each search, since IndexIDMap swaps the selector inside them while it searches."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe)
    inner = faiss.downcast_index(index)
    while isinstance(inner, faiss.IndexIDMap | faiss.IndexIDMap2 | faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)
    return faiss.SearchParameters(sel=selector)
