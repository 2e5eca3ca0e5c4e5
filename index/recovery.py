"""Keeping the FAISS index derived from SQLite, the source of truth: at load, after each
committed change, and afresh whenever it cannot be trusted.

At load, a crash can have left temporary files of interrupted writes (removed), a snapshot
older than the last commits (caught up by comparing ids with SQLite's, which works because ids
are never reused), or a snapshot that is missing, corrupt, of another model or of another kind
than the collection now calls for: `usable_snapshot` says why, and the index is rebuilt from
the stored embeddings, loudly. After a change, the index is updated in place, or rebuilt from
SQLite when it cannot be (an IVF index untrained as yet, a FAISS failure).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index.kinds import KindChoice
from index.snapshot import SnapshotUnusable, read_snapshot
from index.store import BaseItemStore
from index.uploads import IMAGES_DIR
from index.vectors import VectorIndex

log = logging.getLogger(__name__)

COMPARE_TRIES = 5  # whole comparisons (see compared) before settling for the last one


def opened(
    directory: Path, store: BaseItemStore, fingerprint: str, choice: KindChoice
) -> tuple[VectorIndex, int | None]:
    """The collection's index at load and the change its snapshot holds: the snapshot caught
    up with SQLite, or, after a loud warning, an index rebuilt from SQLite and None."""
    remove_leftovers(directory)
    try:
        index, info = usable_snapshot(directory, store, fingerprint, choice)
    except SnapshotUnusable as problem:
        log.warning(
            "REBUILDING the index of %s from its %d stored embeddings: %s",
            directory,
            store.count(),
            problem,
        )
        return rebuilt(store, choice), None
    vectors = VectorIndex(index, info["factory"], info.get("search_params") or {})
    added, removed = catch_up(vectors, store, choice.dim)
    log.info(
        "loaded index of %s as of change %d, caught up to %d (+%d, -%d): %d items",
        directory,
        info["last_seq"],
        store.last_seq(),
        added,
        removed,
        len(vectors),
    )
    return vectors, info["last_seq"]


def applied(
    vectors: VectorIndex,
    store: BaseItemStore,
    choice: KindChoice,
    add: tuple[np.ndarray, np.ndarray] | None = None,
    remove: np.ndarray | None = None,
) -> VectorIndex:
    """The index brought up to a committed change: `add` (embeddings, ids) and `remove` ids."""
    try:
        if not vectors.is_trained:  # an IVF index is trained once it has items
            return rebuilt(store, choice)
        if add is not None and len(add[1]):
            vectors.add(*add)
        if remove is not None:
            vectors.remove(remove)
        return vectors
    except (RuntimeError, MemoryError):
        log.exception("updating the FAISS index failed; rebuilding it from SQLite")
        return rebuilt(store, choice)


def rebuilt(store: BaseItemStore, choice: KindChoice) -> VectorIndex:
    """A fresh index of every stored embedding, of the kind for their number, tuned."""
    none = (np.zeros(0, np.int64), np.zeros((0, choice.dim), np.float32))
    chunks = [none, *store.embeddings(choice.dim)]
    ids, vectors = np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])
    return VectorIndex.built(choice.dim, choice.for_size(len(ids)), ids, vectors)


def usable_snapshot(
    directory: Path, store: BaseItemStore, fingerprint: str, choice: KindChoice
) -> tuple[faiss.Index, dict[str, Any]]:
    """The saved index and its info, when they are of this model and of the kind the collection
    calls for (the one asked for, or chosen) and hold no change SQLite lacks."""
    index, info = read_snapshot(directory)
    if info.get("fingerprint") != fingerprint or info.get("dim") != choice.dim:
        raise SnapshotUnusable("the snapshot is of another model or embedding size")
    if index.d != choice.dim:
        raise SnapshotUnusable(f"the snapshot holds vectors of size {index.d}")
    if info.get("last_seq", -1) > store.last_seq():
        raise SnapshotUnusable("the snapshot holds changes the item database does not")
    if info.get("factory") != choice.for_size(store.count()):
        raise SnapshotUnusable(
            f"the index kind {choice.asked} is asked for"
            if choice.asked
            else "the collection's size or memory limit now calls for another index kind"
        )
    return index, info


def catch_up(vectors: VectorIndex, store: BaseItemStore, dim: int) -> tuple[int, int]:
    """Add to the index what SQLite has and it lacks, remove the reverse; returns both counts."""
    held = vectors.ids()
    live = store.ids()
    missing = np.setdiff1d(live, held, assume_unique=True)
    extra = np.setdiff1d(held, live, assume_unique=True)
    for ids, embeddings in store.embeddings(dim, missing):
        vectors.add(embeddings, ids)
    if len(extra):
        vectors.remove(extra)
    return len(missing), len(extra)


def remove_leftovers(directory: Path) -> None:
    """Delete the temporary files of writes a crash interrupted (snapshots, kept images)."""
    for leftover in [*directory.glob(".*.tmp"), *directory.glob(f"{IMAGES_DIR}/.*.tmp")]:
        leftover.unlink(missing_ok=True)


def through_log(
    vectors: VectorIndex,
    store: BaseItemStore,
    choice: KindChoice,
    changes: list[tuple[int, str, int]],
) -> VectorIndex:
    """The index brought through changes other processes logged, (seq, op, id) in order: the
    items added and not deleted again added, the earlier ones deleted removed."""
    added = {item for _, op, item in changes if op == "add"}
    deleted = {item for _, op, item in changes if op == "delete"}
    fresh = np.fromiter(sorted(added - deleted), dtype=np.int64)  # a later delete may win
    chunks = list(store.embeddings(choice.dim, fresh)) if len(fresh) else []
    add = None
    if chunks:
        add = (np.concatenate([c[1] for c in chunks]), np.concatenate([c[0] for c in chunks]))
    remove = np.fromiter(sorted(deleted - added), dtype=np.int64)
    return applied(vectors, store, choice, add, remove)


def compared(vectors: VectorIndex, store: BaseItemStore, dim: int) -> int:
    """The index made to hold exactly the stored ids by comparing the two sets, repeated until
    no change was committed meanwhile (COMPARE_TRIES at most); the seq it is then as of."""
    for _ in range(COMPARE_TRIES):
        before = store.last_seq()
        added, removed = catch_up(vectors, store, dim)
        if store.last_seq() == before:
            break
    log.info("compared with the store: +%d, -%d, as of change %d", added, removed, before)
    return before
