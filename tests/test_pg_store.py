"""What only the PostgreSQL item store has: its schema's migrations, a database without a
collection, a server restarted or out of reach. What both stores share is tested with both, in
test_gallery.py, test_index_files.py, test_concurrency.py and test_durability.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psycopg
import pytest

from index import pg_store
from index.database import Database
from index.errors import DatabaseUnavailable, IncompatibleIndex, IndexMissing
from index.gallery import GalleryIndex
from index.store import NewItem
from tests.postgres import Cluster, behind_imgsims_back


def ten(directory: Path, database: Database) -> None:
    gallery = GalleryIndex.create(4, "fp", directory, database=database)
    vectors = np.eye(4, dtype=np.float32)[np.arange(10) % 4]
    gallery.add(vectors, [NewItem(f"/{i}.png") for i in range(10)])
    gallery.close()


def versions(directory: Path, database: Database) -> list[int]:
    rows = behind_imgsims_back(directory, database, "SELECT version FROM migrations")
    return sorted(version for (version,) in rows)


def test_an_old_schema_is_upgraded_and_a_newer_one_refused(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = Database(postgres_url)
    ten(tmp_path, database)
    assert versions(tmp_path, database) == list(range(1, len(pg_store.MIGRATIONS) + 1))
    newer = (*pg_store.MIGRATIONS, "ALTER TABLE items ADD COLUMN note TEXT")
    with monkeypatch.context() as patch:
        patch.setattr(pg_store, "MIGRATIONS", newer)
        gallery = GalleryIndex.load(tmp_path, "fp", database=database)  # upgraded at open
        assert len(gallery) == 10 and gallery.consistent()
        gallery.close()
    assert versions(tmp_path, database) == list(range(1, len(newer) + 1))
    assert behind_imgsims_back(tmp_path, database, "SELECT note FROM items WHERE id = 1") == [
        (None,)
    ]
    with pytest.raises(IncompatibleIndex, match=f"version {len(newer)}, .*newer imgsim"):
        GalleryIndex.load(tmp_path, "fp", database=database)


def test_a_failed_migration_leaves_the_schema_as_it_was(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = Database(postgres_url)
    ten(tmp_path, database)
    broken = (*pg_store.MIGRATIONS, "ALTER TABLE items ADD COLUMN note TEXT; SELECT 1/0")
    monkeypatch.setattr(pg_store, "MIGRATIONS", broken)
    with pytest.raises(psycopg.errors.DivisionByZero):
        GalleryIndex.load(tmp_path, "fp", database=database)
    monkeypatch.undo()
    assert versions(tmp_path, database) == list(range(1, len(pg_store.MIGRATIONS) + 1))
    columns = (
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = 'imgsim' AND table_name = 'items'"
    )
    assert ("note",) not in behind_imgsims_back(tmp_path, database, columns)
    GalleryIndex.load(tmp_path, "fp", database=database).close()


def test_a_database_without_a_collection_is_left_untouched(
    tmp_path: Path, postgres_url: str
) -> None:
    database = Database(postgres_url)
    with pytest.raises(IndexMissing, match=r"no collection in .*schema imgsim.*--database URL"):
        GalleryIndex.load(tmp_path / "index", "fp", database=database)
    schemas = "SELECT nspname FROM pg_namespace WHERE nspname = 'imgsim'"
    assert behind_imgsims_back(tmp_path, database, schemas) == []
    assert not (tmp_path / "index").exists()


def test_a_server_out_of_reach_is_named_without_its_password(tmp_path: Path) -> None:
    database = Database("postgresql://imgsim:s3cret@127.0.0.1:1/imgsim")  # nothing listens
    assert str(database) == "postgresql://imgsim:***@127.0.0.1:1/imgsim (schema imgsim)"
    with pytest.raises(DatabaseUnavailable, match="cannot use the PostgreSQL database") as err:
        GalleryIndex.load(tmp_path, "fp", database=database)
    assert "s3cret" not in str(err.value)


def test_a_restarted_server_costs_no_failed_call(
    tmp_path: Path, postgres: Cluster, postgres_url: str
) -> None:
    """The pool checks a connection before handing it out: those the restart closed are
    replaced, and the next search and add answer as if nothing happened."""
    database = Database(postgres_url)
    ten(tmp_path, database)
    gallery = GalleryIndex.load(tmp_path, "fp", database=database)
    first = np.eye(4, dtype=np.float32)[:1]  # the vector of items 0, 4 and 8
    assert {n.path for n in gallery.search(first, 3)[0]} == {"/0.png", "/4.png", "/8.png"}
    postgres.restart()
    assert {n.path for n in gallery.search(first, 3)[0]} == {"/0.png", "/4.png", "/8.png"}
    [added] = gallery.add(np.eye(4, dtype=np.float32)[1:2], [NewItem("/10.png")])
    assert added.id == 11 and gallery.get(11).path == "/10.png"
    gallery.close()
