"""Index files: checked at open, whole after close, backed up, none left by a failed add. The
tests that take `database` run with the items in SQLite and in PostgreSQL (tests/postgres.py)."""

from __future__ import annotations

import errno
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from app.cli import main
from index import uploads
from index.database import Database
from index.errors import DuplicateExternalId, IndexCorrupt, InsufficientStorage
from index.gallery import GalleryIndex
from index.store import NewItem
from models.files import atomic_write
from tests.postgres import behind_imgsims_back

DIM = 8


def vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def collection(
    directory: Path, n: int = 300, close: bool = True, database: Database | None = None
) -> GalleryIndex:
    """A collection of n items, each with a kept image file (its bytes: its number)."""
    gallery = GalleryIndex.create(
        DIM, "model-a", directory, snapshot_every=10_000, database=database
    )
    for start in range(0, n, 50):
        batch = range(start, min(n, start + 50))
        items = [_item(gallery, i) for i in batch]
        gallery.add(vectors(len(batch), start), items, contents=[b"image %d" % i for i in batch])
    if close:
        gallery.close()
    return gallery


def _item(gallery: GalleryIndex, i: int, external_id: str | None = None) -> NewItem:
    return NewItem(gallery.image_path(f"{i:064d}", ".png"), "l", external_id, f"{i:064d}")


@pytest.fixture
def index_dir(tmp_path: Path) -> Path:
    collection(tmp_path / "index")
    return tmp_path / "index"


def test_a_whole_index_opens(tmp_path: Path, database: Database | None) -> None:
    collection(tmp_path / "index", database=database)
    for thorough in (False, True):
        gallery = GalleryIndex.load(
            tmp_path / "index", "model-a", thorough_check=thorough, database=database
        )
        assert len(gallery) == 300 and gallery.consistent()
        gallery.close()


def test_an_empty_file_is_named(index_dir: Path) -> None:
    (index_dir / "items.sqlite").write_bytes(b"")
    with pytest.raises(IndexCorrupt, match=r"items.sqlite is empty \(0 bytes\).*--rebuild"):
        GalleryIndex.load(index_dir, "model-a")


def test_a_foreign_file_is_named(index_dir: Path) -> None:
    (index_dir / "items.sqlite").write_bytes(b"PK\x03\x04 a zip, say" * 100)
    with pytest.raises(IndexCorrupt, match="is not a SQLite database.*imgsim backup"):
        GalleryIndex.load(index_dir, "model-a")


def test_another_sqlite_database_is_named(index_dir: Path) -> None:
    (index_dir / "items.sqlite").unlink()
    other = sqlite3.connect(index_dir / "items.sqlite")
    other.execute("CREATE TABLE contacts (name TEXT)")
    other.commit()
    other.close()
    with pytest.raises(IndexCorrupt, match="not an imgsim index.*no meta, items, changes table"):
        GalleryIndex.load(index_dir, "model-a")
    assert "items" not in _tables(index_dir / "items.sqlite")  # left as it was


def _tables(path: Path) -> set[str]:
    connection = sqlite3.connect(path)
    try:
        return {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    finally:
        connection.close()


def test_random_byte_flips_are_found(index_dir: Path) -> None:
    path = index_dir / "items.sqlite"
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(12)
    for offset in rng.integers(100, len(data), 200):  # past the header: a SQLite file still
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexCorrupt, match="is damaged"):
        GalleryIndex.load(index_dir, "model-a")


def test_the_cli_names_a_damaged_index_in_one_paragraph(
    index_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (index_dir / "items.sqlite").write_bytes(b"")
    assert main(["backup", str(index_dir), str(tmp_path / "copy")]) == 2
    err = capsys.readouterr().err
    assert "is empty (0 bytes)" in " ".join(err.split()) and "Traceback" not in err
    assert not (tmp_path / "copy").exists()


def test_after_close_the_database_file_alone_is_complete(tmp_path: Path) -> None:
    collection(tmp_path / "index", n=323)
    wal = tmp_path / "index" / "items.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    alone = tmp_path / "alone.sqlite"
    shutil.copyfile(tmp_path / "index" / "items.sqlite", alone)  # without -wal and -shm
    connection = sqlite3.connect(alone)
    assert connection.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 323
    connection.close()


def test_a_backup_restores_a_working_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], database: Database | None
) -> None:
    """A backup is a folder with its own items.sqlite: from PostgreSQL too, it is served as it
    is, and its ids and seqs go on where the database's would."""
    index_dir = tmp_path / "index"
    gallery = collection(index_dir, n=120, close=False, database=database)  # as when served
    gallery.delete(120)
    gallery.add(vectors(1, 7), [_item(gallery, 500, "sku-500")], contents=[b"image 500"])
    gallery.snapshot()
    gallery.delete(3)  # after the snapshot: the copy catches it up from its items
    with_database = [] if database is None else ["--database", database.url]
    assert main(["backup", str(index_dir), str(tmp_path / "copy"), *with_database]) == 0
    assert "backed up 119 items" in capsys.readouterr().out
    gallery.close()
    shutil.rmtree(index_dir)
    shutil.move(tmp_path / "copy", index_dir)
    restored = GalleryIndex.load(index_dir, "model-a", thorough_check=True)
    assert len(restored) == 119 and restored.consistent() and restored.last_change == 123
    item = restored.get(7)
    assert Path(item.path).read_bytes() == b"image 6"  # ids start at 1
    assert restored.get(121).external_id == "sku-500"
    assert restored.search(vectors(1, 0)[:1], 1)[0][0].id == 1
    assert [a.id for a in restored.add(vectors(1, 8), [_item(restored, 501)])] == [122]
    restored.close()


def test_a_backup_never_overwrites(index_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "copy").mkdir()
    assert main(["backup", str(index_dir), str(tmp_path / "copy")]) == 2


def test_a_repeated_409_leaves_no_file(tmp_path: Path, database: Database | None) -> None:
    gallery = collection(tmp_path / "index", n=3, close=False, database=database)
    gallery.add(vectors(1, 9), [_item(gallery, 900, "x")], contents=[b"first"])
    images = sorted((tmp_path / "index" / "images").iterdir())
    for attempt in range(3):
        with pytest.raises(DuplicateExternalId):
            gallery.add(vectors(1, 10 + attempt), [_item(gallery, 901 + attempt, "x")],
                        contents=[b"other %d" % attempt])  # fmt: skip
    assert sorted((tmp_path / "index" / "images").iterdir()) == images
    assert len(gallery) == 4 and gallery.store.count() == 4
    gallery.close()


def test_a_full_disk_during_add_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gallery = collection(tmp_path / "index", n=5, close=False)
    images = sorted((tmp_path / "index" / "images").iterdir())
    writes = []

    def fills_the_disk(path: Path, write: object) -> None:
        writes.append(path)
        if len(writes) == 2:  # the first image of the add is written, the second is not

            def half(tmp: Path) -> None:
                tmp.write_bytes(b"half")
                raise OSError(errno.ENOSPC, "No space left on device")

            atomic_write(path, half)
        atomic_write(path, write)

    monkeypatch.setattr(uploads, "atomic_write", fills_the_disk)
    with pytest.raises(InsufficientStorage, match="disk is full"):
        gallery.add(vectors(2, 50), [_item(gallery, 50), _item(gallery, 51)], contents=[b"a", b"b"])
    assert sorted((tmp_path / "index" / "images").iterdir()) == images  # no temporary file
    assert len(gallery) == 5 and gallery.store.count() == 5 and gallery.consistent()
    monkeypatch.undo()
    gallery.add(vectors(2, 50), [_item(gallery, 50), _item(gallery, 51)], contents=[b"a", b"b"])
    assert len(gallery) == 7
    gallery.close()


def _flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_stored_path_is_found_by_its_row(index_dir: Path) -> None:
    """quick_check reads structure, not values: the row's checksum names the damaged row."""
    database = index_dir / "items.sqlite"
    gallery = GalleryIndex.load(index_dir, "model-a")
    item = gallery.get(42)
    gallery.close()
    _flip(database, database.read_bytes().index(item.path.encode()) + len(item.path) - 5)
    connection = sqlite3.connect(database)
    assert connection.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    connection.close()
    with pytest.raises(IndexCorrupt, match=r"1 damaged row\(s\) \(ids 42\).*--rebuild"):
        GalleryIndex.load(index_dir, "model-a")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bit_flips_are_refused_or_harmless(index_dir: Path, seed: int) -> None:
    """50 random bits flipped in the database: it is refused, or every row reads as before."""
    database = index_dir / "items.sqlite"
    clean = sqlite3.connect(database).execute("SELECT * FROM items ORDER BY id").fetchall()
    rng = np.random.default_rng(seed)
    for offset in rng.integers(0, database.stat().st_size, 50):
        _flip(database, int(offset), int(rng.integers(0, 8)))
    try:
        GalleryIndex.load(index_dir, "model-a").close()
    except IndexCorrupt:
        return
    assert sqlite3.connect(database).execute("SELECT * FROM items ORDER BY id").fetchall() == clean


def test_a_file_from_before_checksums_gets_them_and_is_checked(index_dir: Path) -> None:
    database = index_dir / "items.sqlite"
    connection = sqlite3.connect(database)
    connection.execute("ALTER TABLE items DROP COLUMN checksum")
    connection.commit()
    connection.close()
    GalleryIndex.load(index_dir, "model-a").close()  # migrated: every row summed
    connection = sqlite3.connect(database)
    unsummed = connection.execute("SELECT COUNT(*) FROM items WHERE checksum IS NULL").fetchone()
    assert unsummed == (0,)
    connection.execute("UPDATE items SET label = 'm' WHERE id = 7")  # behind imgsim's back
    connection.commit()
    connection.close()
    with pytest.raises(IndexCorrupt, match=r"ids 7\)"):
        GalleryIndex.load(index_dir, "model-a")


def test_a_row_changed_behind_imgsims_back_is_named(
    tmp_path: Path, database: Database | None
) -> None:
    collection(tmp_path / "index", n=60, database=database)
    behind_imgsims_back(tmp_path / "index", database, "UPDATE items SET label = 'm' WHERE id = 7")
    with pytest.raises(IndexCorrupt, match=r"1 damaged row\(s\) \(ids 7\).*--rebuild"):
        GalleryIndex.load(tmp_path / "index", "model-a", database=database)
    embedding = "UPDATE items SET embedding = ? WHERE id IN (8, 9)"
    behind_imgsims_back(tmp_path / "index", database, embedding, (vectors(1, 1).tobytes(),))
    with pytest.raises(IndexCorrupt, match=r"3 damaged row\(s\) \(ids 7, 8, 9\)"):
        GalleryIndex.load(tmp_path / "index", "model-a", database=database)
