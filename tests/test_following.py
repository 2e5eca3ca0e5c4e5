"""Replicas on one PostgreSQL database, in one process: each gallery follows the others' adds
and deletes through the change log, woken by NOTIFY. The same with real server processes, and
their faults, is in test_replicas.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from index.database import Database
from index.folder import replace_directory
from index.follower import ChangeFollower
from index.gallery import GalleryIndex
from index.store import BaseItemStore, NewItem

DIM = 8


def vectors(count: int, seed: int) -> np.ndarray:
    found = np.random.default_rng(seed).normal(size=(count, DIM)).astype(np.float32)
    return found / np.linalg.norm(found, axis=1, keepdims=True)


def items(names: list[str]) -> list[NewItem]:
    return [NewItem(f"/{name}.png", label=name) for name in names]


@pytest.fixture
def two(tmp_path: Path, postgres_url: str):
    """Two galleries ("replicas") opened on one database and one shared folder."""
    database, folder = Database(postgres_url), tmp_path / "collection"
    first = GalleryIndex.create(DIM, "fp", folder, database=database)
    first.add(vectors(4, 0), items(["a", "b", "c", "d"]))
    second = GalleryIndex.load(folder, "fp", database=database)
    yield first, second
    second.close()
    first.close()


def found(gallery: GalleryIndex, query: np.ndarray) -> str | None:
    """The path of the nearest item, or None in an empty gallery."""
    [neighbours] = gallery.search(query, 1)
    return neighbours[0].path if neighbours else None


def test_a_replica_sees_anothers_adds_and_deletes_once_it_follows(two) -> None:
    first, second = two
    new = vectors(1, 1)
    [added] = first.add(new, items(["e"]))
    assert found(second, new) != "/e.png"  # not followed yet
    assert second.follow() == first.last_change
    assert found(second, new) == "/e.png" and len(second) == 5
    first.delete(added.id)
    second.follow()
    assert found(second, new) != "/e.png" and len(second) == 4
    assert second.consistent() and first.consistent()


def test_a_write_takes_the_changes_before_it_from_the_log_in_order(two) -> None:
    """The second replica writes without having followed: its index gets the first's change,
    committed before its own, too, and holds each item once."""
    first, second = two
    [gone] = first.add(vectors(1, 2), items(["f"]))
    first.delete(1)
    second.add(vectors(1, 3), items(["g"]))
    assert second.last_change == first.last_change + 1
    assert second.consistent() and len(second) == 5
    assert found(second, vectors(1, 2)) == "/f.png" and gone.id == 5
    assert sorted(second.vectors.ids().tolist()) == [2, 3, 4, 5, 6]


def test_a_replica_behind_a_forgotten_log_compares_every_id(two) -> None:
    """The log was dropped past the change the replica holds (another replica's snapshot, far
    ahead): it compares its ids with the store's instead and is then as of the latest change."""
    first, second = two
    first.add(vectors(3, 4), items(["h", "i", "j"]))
    first.delete(2)
    BaseItemStore.forget_changes(first.store, first.last_change)  # as SQLite's: no margin kept
    assert first.store.changes_since(second.last_change) is None
    assert second.follow() == first.last_change
    assert second.consistent() and len(second) == 6


def test_the_follower_applies_a_change_as_it_is_announced(two) -> None:
    """NOTIFY wakes it: the change is searchable well before the periodic catch-up (60 s)."""
    first, second = two
    follower = ChangeFollower(second, catch_up_every=60)
    follower.start()
    try:
        time.sleep(0.5)  # listening
        new = vectors(1, 5)
        first.add(new, items(["k"]))
        written = time.monotonic()
        while found(second, new) != "/k.png":
            assert time.monotonic() - written < 1.0, "not applied within 1 s"
            time.sleep(0.01)
        state = follower.state()
        assert state.applied == state.latest == first.last_change
        assert state.lag_changes == 0 and state.lag_seconds == 0 and state.problem is None
    finally:
        follower.stop()


def test_a_replica_follows_a_rebuild_that_replaced_the_collection(
    two, tmp_path: Path, postgres_url: str
) -> None:
    """`imgsim index --rebuild` builds a new collection beside the old one and swaps it in: its
    ids are above the old ones, and a replica that follows ends up holding exactly the new
    collection, not the old one's items beside it."""
    first, second = two
    database = Database(postgres_url)
    built = GalleryIndex.create(DIM, "fp", tmp_path / "built", database=database.staging())
    built.fill(vectors(2, 6), items(["new-1", "new-2"]))
    built.close()
    replace_directory(tmp_path / "built", tmp_path / "collection", database)
    second.follow()
    assert sorted(second.vectors.ids().tolist()) == [5, 6] and second.consistent()
    assert found(second, vectors(2, 6)[:1]) == "/new-1.png"


def test_replicas_take_turns_to_write_the_shared_snapshot(two, tmp_path: Path) -> None:
    """While one replica writes the folder's snapshot, another skips its own (and writes the
    next one), so that no snapshot names a file another replica removed."""
    first, second = two
    first.add(vectors(1, 7), items(["l"]))
    info = tmp_path / "collection" / "snapshot.json"
    with first.store.snapshot_turn() as ours:
        assert ours
        before = info.read_text()
        second.snapshot()  # skipped: the turn is taken
        assert info.read_text() == before
    second.follow()
    second.snapshot()
    assert json.loads(info.read_text())["last_seq"] == second.last_change
