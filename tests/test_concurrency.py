"""Many threads adding, deleting and searching one gallery: it stays consistent, and a search
that starts after a delete was acknowledged never returns the deleted item; and two processes
writing to one item database (SQLite's file, or PostgreSQL) lose and duplicate nothing.

No clock decides anything, so a loaded machine cannot make it flaky: each writer does a fixed
amount of work; each delete waits until a search has started after it, so every delete is raced
by searches; searchers run until the writers are done; and "after" is the order of tickets from
one counter, drawn under one lock.
"""

from __future__ import annotations

import itertools
import multiprocessing
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from index.database import Database
from index.folder import existing_store
from index.gallery import GalleryIndex
from index.store import NewItem
from tests.postgres import behind_imgsims_back

DIM = 16
ADD_BATCHES = 60  # per adder
DELETES = 40  # per deleter
STUCK = 120.0  # seconds a deleter waits for a search before failing instead of hanging


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("factory", ["Flat", "HNSW16"])  # removes ids / hides them
def test_threads_adding_deleting_and_searching(
    tmp_path: Path, factory: str, database: Database | None
) -> None:
    gallery = GalleryIndex.create(
        DIM, "fp", tmp_path / "idx", factory=factory, snapshot_every=40, database=database
    )
    rng = np.random.default_rng(0)
    first = unit(rng, 300)
    vectors = {
        a.id: v for a, v in zip(gallery.add(first, [NewItem("x")] * 300), first, strict=True)
    }
    live = set(vectors)
    tickets = itertools.count()  # drawn under guard: their order is the order of events
    deleted_at: dict[int, int] = {}  # id -> ticket drawn once its delete was acknowledged
    searches: list[tuple[int, set[int]]] = []  # (ticket drawn as it started, ids returned)
    started = [0]  # searches started so far
    guard = threading.Condition()  # guards the bookkeeping above, not the gallery
    writers_done = threading.Event()
    errors: list[BaseException] = []

    def adder(seed: int) -> None:
        local = np.random.default_rng(seed)
        for _ in range(ADD_BATCHES):
            batch = unit(local, int(local.integers(1, 4)))
            added = gallery.add(batch, [NewItem("x", "l")] * len(batch))
            with guard:
                for a, v in zip(added, batch, strict=True):
                    vectors[a.id] = v
                    live.add(a.id)

    def searched_since(count: int) -> Callable[[], bool]:
        return lambda: started[0] > count or bool(errors)

    def deleter(seed: int) -> None:
        local = random.Random(seed)
        for _ in range(DELETES):  # 300 items to start with: never runs out
            with guard:
                victim = local.choice(sorted(live))
                live.discard(victim)  # only this thread deletes it
            gallery.delete(victim)
            with guard:
                deleted_at[victim] = next(tickets)
                if not guard.wait_for(searched_since(started[0]), STUCK):
                    raise TimeoutError(f"no search started within {STUCK} s of a delete")

    def searcher(seed: int) -> None:
        local = random.Random(seed)
        while not writers_done.is_set():
            with guard:  # aim at recently deleted items: the likeliest to leak
                pool = list(deleted_at)[-20:] or sorted(live)
                query = np.stack([vectors[local.choice(pool)] for _ in range(4)])
                ticket = next(tickets)
                started[0] += 1
                guard.notify_all()
            found = gallery.search(query, 10)
            with guard:
                searches.append((ticket, {n.id for row in found for n in row}))

    def run(target: Callable[[int], None], seed: int) -> None:
        try:
            target(seed)
        except BaseException as err:  # reported below, with the thread's traceback
            with guard:
                errors.append(err)
                guard.notify_all()

    writers = [adder, adder, deleter, deleter]
    threads = [threading.Thread(target=run, args=(r, i)) for i, r in enumerate(writers)]
    searchers = [threading.Thread(target=run, args=(searcher, 10 + i)) for i in range(3)]
    for thread in threads + searchers:
        thread.start()
    for thread in threads:
        thread.join()
    writers_done.set()
    for thread in searchers:
        thread.join()
    if errors:
        raise errors[0]

    assert len(deleted_at) == 2 * DELETES
    last_search = max(ticket for ticket, _ in searches)
    assert all(at < last_search for at in deleted_at.values())  # searches followed every delete
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
    reloaded = GalleryIndex.load(tmp_path / "idx", factory=factory, database=database)
    assert reloaded.consistent() and len(reloaded) == len(live)
    reloaded.close()


ROUNDS = 30  # per process: an add of three items and a delete of one of them


def write_in_turns(
    directory: Path, database: Database | None, seed: int, turns: Any, results: Any
) -> None:
    """In a process of its own: ROUNDS adds and deletes through the item store, every round
    begun with the other process at a barrier; puts (seed, adds, deletes) on results, each add
    as (ids, seq), each delete as (id, seq)."""
    store = existing_store(directory, database=database)
    rng = np.random.default_rng(seed)
    adds, deletes = [], []
    for _ in range(ROUNDS):
        turns.wait(timeout=60)
        ids, seq = store.insert([NewItem(f"/p{seed}.png")] * 3, unit(rng, 3))
        adds.append((ids, seq))
        _, seq = store.delete(ids[1])
        deletes.append((ids[1], seq))
    store.close()
    results.put((seed, adds, deletes))


def test_two_processes_writing_one_database(tmp_path: Path, database: Database | None) -> None:
    """Each round both processes write at once: every id is given once, each write's changes
    have consecutive seqs (the writers took turns), the change log holds every change once,
    and the collection opens consistent."""
    GalleryIndex.create(DIM, "fp", tmp_path / "idx", database=database).close()
    context = multiprocessing.get_context("spawn")  # nothing of this process's threads inherited
    turns, results = context.Barrier(2), context.Queue()
    writers = [
        context.Process(
            target=write_in_turns, args=(tmp_path / "idx", database, seed, turns, results)
        )
        for seed in (1, 2)
    ]
    for writer in writers:
        writer.start()
    done = {}
    for _ in writers:
        seed, adds, deletes = results.get(timeout=300)
        done[seed] = (adds, deletes)
    for writer in writers:
        writer.join(timeout=60)
        assert writer.exitcode == 0

    adds = [add for mine, _ in done.values() for add in mine]
    deletes = [delete for _, mine in done.values() for delete in mine]
    added = sorted(i for ids, _ in adds for i in ids)
    assert added == list(range(1, 6 * ROUNDS + 1))  # none lost, none given twice
    log = behind_imgsims_back(tmp_path / "idx", database, "SELECT seq, op, item_id FROM changes")
    assert sorted(seq for seq, _, _ in log) == list(range(1, 8 * ROUNDS + 1))
    seq_of = {(op, item): seq for seq, op, item in log}
    assert len(seq_of) == len(log)  # no change twice
    for ids, seq in adds:  # one write's ids and seqs follow each other: nobody wrote between
        assert ids == list(range(ids[0], ids[0] + 3))
        assert [seq_of["add", i] for i in ids] == [seq - 2, seq - 1, seq]
    assert all(seq_of["delete", item] == seq for item, seq in deletes)
    first, second = (sorted(seq for _, seq in mine) for mine, _ in done.values())
    assert first[0] < second[-1] and second[0] < first[-1]  # their writes interleaved
    gallery = GalleryIndex.load(tmp_path / "idx", database=database)
    assert gallery.consistent() and len(gallery) == 4 * ROUNDS
    assert set(gallery.store.ids().tolist()) == set(added) - {item for item, _ in deletes}
    gallery.close()
