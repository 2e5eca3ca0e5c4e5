"""Many threads adding, deleting and searching one gallery: it stays consistent, and a search
that starts after a delete was acknowledged never returns the deleted item."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from index.gallery import GalleryIndex
from index.store import NewItem

DIM = 16
SECONDS = 2.0


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("factory", ["Flat", "HNSW16"])  # removes ids / hides them
def test_threads_adding_deleting_and_searching(tmp_path: Path, factory: str) -> None:
    gallery = GalleryIndex.create(DIM, "fp", tmp_path / "idx", factory=factory, snapshot_every=40)
    rng = np.random.default_rng(0)
    first = unit(rng, 300)
    vectors = {
        a.id: v for a, v in zip(gallery.add(first, [NewItem("x")] * 300), first, strict=True)
    }
    live = set(vectors)
    deleted_at: dict[int, float] = {}  # id -> when its delete was acknowledged
    searches: list[tuple[float, set[int]]] = []  # (start, ids returned)
    guard = threading.Lock()  # guards the bookkeeping above, not the gallery
    stop = time.monotonic() + SECONDS
    errors: list[BaseException] = []

    def adder(seed: int) -> None:
        local = np.random.default_rng(seed)
        while time.monotonic() < stop:
            batch = unit(local, int(local.integers(1, 4)))
            added = gallery.add(batch, [NewItem("x", "l")] * len(batch))
            with guard:
                for a, v in zip(added, batch, strict=True):
                    vectors[a.id] = v
                    live.add(a.id)

    def deleter(seed: int) -> None:
        local = random.Random(seed)
        while time.monotonic() < stop:
            with guard:
                if len(live) < 100:  # let the adders catch up
                    victim = None
                else:
                    victim = local.choice(sorted(live))
                    live.discard(victim)  # only this thread deletes it
            if victim is None:
                time.sleep(0.01)
                continue
            gallery.delete(victim)
            with guard:
                deleted_at[victim] = time.monotonic()

    def searcher(seed: int) -> None:
        local = random.Random(seed)
        while time.monotonic() < stop:
            with guard:  # aim at recently deleted items: the likeliest to leak
                pool = list(deleted_at)[-20:] or sorted(live)
                query = np.stack([vectors[local.choice(pool)] for _ in range(4)])
            started = time.monotonic()
            found = gallery.search(query, 10)
            with guard:
                searches.append((started, {n.id for row in found for n in row}))

    def run(target: Callable[[int], None], seed: int) -> None:
        try:
            target(seed)
        except BaseException as err:  # reported below, with the thread's traceback
            errors.append(err)

    roles = [adder, adder, deleter, deleter, searcher, searcher, searcher]
    threads = [threading.Thread(target=run, args=(r, i)) for i, r in enumerate(roles)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]

    assert len(deleted_at) > 20 and len(searches) > 50  # the run really interleaved
    leaked = [
        (item, start)
        for start, ids in searches
        for item in ids
        if item in deleted_at and deleted_at[item] < start
    ]
    assert not leaked
    assert gallery.consistent()
    assert len(gallery) == gallery.store.count() == len(live)
    gallery.close()
    reloaded = GalleryIndex.load(tmp_path / "idx", factory=factory)
    assert reloaded.consistent() and len(reloaded) == len(live)
