"""The FAISS side of a gallery: one index of one kind, tuned, searched by cosine similarity.

FAISS cannot remove ids from some kinds (HNSW); their deleted ids stay in the index, hidden from
every search by a selector, until the index is next built afresh. The hidden ids need no saving:
after a reload they are the ids the snapshot holds and SQLite does not (see index/recovery.py).
Not thread-safe: the gallery's readers-writer lock guards it.
"""

from __future__ import annotations

import logging
from typing import Any

import faiss
import numpy as np

from index import kinds

log = logging.getLogger(__name__)


def rows_of(dim: int, embeddings: np.ndarray) -> np.ndarray:
    """Embeddings as a contiguous float32 (n, dim) matrix; ValueError for another shape."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[1] != dim:
        raise ValueError(f"expected embeddings of shape (n, {dim}), got {embeddings.shape}")
    return embeddings


class VectorIndex:
    """A FAISS index with its factory string, tuned search parameters and hidden ids."""

    def __init__(self, index: faiss.Index, factory: str, search_params: dict[str, Any]):
        self.index = index
        self.factory = factory
        self.search_params = search_params
        kinds.apply_search_params(index, search_params)
        self.hidden: set[int] = set()  # deleted ids the index still holds

    @classmethod
    def empty(cls, dim: int, factory: str) -> VectorIndex:
        """An index of kind `factory` holding nothing."""
        return cls(kinds.build_index(dim, factory), factory, {})

    @classmethod
    def built(cls, dim: int, factory: str, ids: np.ndarray, vectors: np.ndarray) -> VectorIndex:
        """An index of kind `factory` trained on, holding and tuned on these embeddings."""
        index, search_params = kinds.build_filled(dim, factory, ids, vectors)
        log.info("built a %s index of %d items", factory, index.ntotal)
        return cls(index, factory, search_params)

    def __len__(self) -> int:
        return self.index.ntotal - len(self.hidden)

    @property
    def is_trained(self) -> bool:
        """False for an IVF index before it has seen embeddings to train on."""
        return self.index.is_trained

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Index embeddings under their ids."""
        self.index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> None:
        """Remove ids, or hide them where the kind cannot remove (HNSW)."""
        try:
            self.index.remove_ids(ids)
        except RuntimeError:
            self.hidden.update(int(i) for i in ids)

    def ids(self) -> np.ndarray:
        """Every id a search can return (a full scan)."""
        return np.setdiff1d(kinds.held_ids(self.index), np.fromiter(self.hidden, np.int64))

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None, exclude: set[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Ids (-1 where fewer are found) and cosine similarities of the k nearest of each
        query, best first: only among `allowed` ids when given, never hidden or excluded ones."""
        selectors: list[faiss.IDSelector] = []  # kept alive until the search returns
        if allowed is not None:
            selectors.append(faiss.IDSelectorBatch(allowed))
        hidden = self.hidden | exclude
        if hidden:
            selectors.append(faiss.IDSelectorBatch(np.fromiter(hidden, dtype=np.int64)))
            selectors.append(faiss.IDSelectorNot(selectors[-1]))
        if allowed is not None and hidden:
            selectors.append(faiss.IDSelectorAnd(selectors[0], selectors[-1]))
        params = kinds.search_parameters(self.index, selectors[-1]) if selectors else None
        distances, ids = self.index.search(queries, min(k, self.index.ntotal), params=params)
        return ids, kinds.similarities(self.index, distances)  # IVF kinds search by L2

    def serialized(self) -> tuple[np.ndarray, dict[str, Any]]:
        """The index as bytes, and what a snapshot records of it."""
        info = {
            "factory": self.factory,
            "search_params": self.search_params,
            "count": self.index.ntotal,
        }
        return faiss.serialize_index(self.index), info
