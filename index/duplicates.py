"""Near-duplicates among added images: each is matched with its most similar stored item and
with the items before it in the same batch; a match scoring at least the threshold counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# ('stored', item id, score) or ('batch', position in the batch, score)
Match = tuple[str, int, float]


@dataclass(frozen=True)
class Added:
    """What became of one item given to add: its id (None when skipped as a duplicate) and the
    most similar item already in the collection when it scored at least the threshold."""

    id: int | None
    duplicate_of: int | None = None
    duplicate_score: float | None = None


def best_matches(
    embeddings: np.ndarray, threshold: float, nearest: Sequence[tuple[int, float] | None]
) -> list[Match | None]:
    """For each embedding its best match at or above the threshold, given its nearest stored
    item (id, score) if any: that item, or an earlier embedding of the batch that scores more."""
    best: list[Match | None] = [
        ("stored", *hit) if hit is not None and hit[1] >= threshold else None for hit in nearest
    ]
    within = embeddings @ embeddings.T
    for i in range(1, len(embeddings)):
        j = int(np.argmax(within[i, :i]))
        score = float(within[i, j])
        if score >= threshold and (best[i] is None or score > best[i][2]):
            best[i] = ("batch", j, score)
    return best


def outcomes(matches: Sequence[Match | None], id_of: dict[int, int]) -> list[Added]:
    """What became of each item, given the ids of those added by batch position; a batch match
    is reported as the id its earlier copy got."""
    return [
        Added(id_of.get(i), *(_resolve(m, id_of) if m else (None, None)))
        for i, m in enumerate(matches)
    ]


def _resolve(match: Match, id_of: dict[int, int]) -> tuple[int | None, float]:
    where, which, score = match
    return (which if where == "stored" else id_of.get(which)), score
