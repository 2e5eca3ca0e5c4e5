"""Searching a gallery: the k nearest stored items of query embeddings by inner product, with
the rows the store holds for them, and the best near-duplicate of each of a batch of new ones."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from index import duplicates
from index.errors import EmptyIndex
from index.store import BaseItemStore
from index.vectors import VectorIndex


@dataclass(frozen=True)
class Neighbour:
    """One search result."""

    id: int
    path: str
    label: str | None
    score: float


def nearest(
    vectors: VectorIndex,
    store: BaseItemStore,
    queries: np.ndarray,
    k: int,
    label: str | None,
    exclude: set[int],
) -> list[list[Neighbour]]:
    """The k nearest items of each query, best first: only those with the label if given,
    never the excluded ids, nor ids the store no longer holds."""
    if len(vectors) == 0:
        raise EmptyIndex("the index is empty: add images with POST /images or 'imgsim index'")
    allowed = None
    if label is not None:
        allowed = store.ids(label=label)
        if not len(allowed):
            return [[] for _ in queries]
    ids, scores = vectors.search(queries, k, allowed, exclude)
    rows = store.rows({int(i) for i in ids.ravel() if i >= 0})
    return [
        [
            Neighbour(int(i), *rows[int(i)], float(s))
            for i, s in zip(id_row, score_row, strict=True)
            if int(i) in rows
        ]
        for id_row, score_row in zip(ids, scores, strict=True)
    ]


def duplicates_of(
    vectors: VectorIndex, store: BaseItemStore, embeddings: np.ndarray, threshold: float | None
) -> list[duplicates.Match | None]:
    """Each embedding's best match at or above the threshold, among the stored items and the
    embeddings before it (see index/duplicates.py); all None without a threshold."""
    if threshold is None:
        return [None] * len(embeddings)
    empty = [[]] * len(embeddings)
    found = nearest(vectors, store, embeddings, 1, None, set()) if len(vectors) else empty
    best = [(hits[0].id, hits[0].score) if hits else None for hits in found]
    return duplicates.best_matches(embeddings, threshold, best)
