"""The gallery as a living collection: exact search, filters, adds and deletes, duplicates,
durability of the item store, recovery of the FAISS snapshot, the index kind under a memory
limit, and building one from a folder (with a stand-in for the model bundle). The tests that
take `database` run with each item store, SQLite and PostgreSQL (tests/postgres.py)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from app.stages import index_folder
from index import kinds
from index.database import Database
from index.errors import DuplicateExternalId, EmptyIndex, IndexMissing, ItemNotFound, ModelMismatch
from index.gallery import GalleryIndex
from index.snapshot import INFO_FILE
from index.store import BaseItemStore, NewItem
from models.bundle import Encoded
from tests.postgres import behind_imgsims_back
from tests.synthetic import noise_png


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def items(n: int, start: int = 0) -> list[NewItem]:
    return [NewItem(f"/g/{i}.png", "odd" if i % 2 else "even") for i in range(start, start + n)]


VECTORS = unit_vectors(200, 16, seed=0)


def filled(
    directory: Path | None = None, factory: str | None = None, database: Database | None = None
) -> GalleryIndex:
    gallery = GalleryIndex.create(16, "abc", directory, factory=factory, database=database)
    ids = [a.id for a in gallery.add(VECTORS, items(200))]
    assert ids == list(range(1, 201))  # ids start at 1; item i has id i + 1
    return gallery


@pytest.fixture
def gallery(tmp_path: Path, database: Database | None) -> Iterator[GalleryIndex]:
    """200 items: in memory, or with their items in PostgreSQL (and a folder for FAISS)."""
    gallery = filled(None if database is None else tmp_path / "idx", database=database)
    yield gallery
    gallery.close()


def brute_force(queries: np.ndarray, keep: np.ndarray, k: int) -> list[list[int]]:
    scores = queries @ VECTORS.T
    scores[:, ~keep] = -np.inf
    return (np.argsort(-scores, axis=1)[:, :k] + 1).tolist()


def ids_of(found: list) -> list[list[int]]:
    return [[n.id for n in row] for row in found]


def test_a_labelled_sample_takes_the_first_of_each_label(gallery: GalleryIndex) -> None:
    """What classes added from examples are fitted against (models/imprint.py): as many of
    each label, the first added, as stored; unlabelled items are not in it."""
    gallery.add(unit_vectors(3, 16, seed=2), [NewItem(f"/u/{i}.png", None) for i in range(3)])
    labels, embeddings = gallery.labelled_sample(20)
    assert sorted(labels.tolist()) == ["even"] * 10 + ["odd"] * 10
    np.testing.assert_array_equal(embeddings[labels == "even"], VECTORS[0:20:2])
    np.testing.assert_array_equal(embeddings[labels == "odd"], VECTORS[1:21:2])


def test_search_equals_brute_force(gallery: GalleryIndex) -> None:
    queries = unit_vectors(5, 16, seed=1)
    found = gallery.search(queries, 7)
    assert ids_of(found) == brute_force(queries, np.ones(200, bool), 7)
    best = found[0][0]
    assert best.path == f"/g/{best.id - 1}.png"
    assert best.label == ("odd" if (best.id - 1) % 2 else "even")
    assert best.score == pytest.approx(float(queries[0] @ VECTORS[best.id - 1]), abs=1e-5)


def test_label_filter_and_exclusion_are_exact(gallery: GalleryIndex) -> None:
    queries = unit_vectors(4, 16, seed=2)
    odd = np.arange(200) % 2 == 1
    assert ids_of(gallery.search(queries, 5, label="odd")) == brute_force(queries, odd, 5)
    top = gallery.search(queries, 1)[0][0].id
    keep = odd.copy()
    keep[top - 1] = False
    found = gallery.search(queries[:1], 5, label="odd", exclude=[top])
    assert ids_of(found) == brute_force(queries[:1], keep, 5)
    assert gallery.search(queries, 3, label="no such label") == [[], [], [], []]


def test_search_by_id_leaves_the_item_out(gallery: GalleryIndex) -> None:
    keep = np.ones(200, bool)
    keep[41] = False
    found = gallery.search_by_id(42, 6)
    assert [n.id for n in found] == brute_force(VECTORS[41:42], keep, 6)[0]
    with pytest.raises(ItemNotFound):
        gallery.search_by_id(999, 3)


def test_deleted_items_are_gone(gallery: GalleryIndex) -> None:
    top = gallery.search(VECTORS[10], 1)[0][0]
    assert top.id == 11 and top.score == pytest.approx(1.0, abs=1e-5)
    assert gallery.delete(11).path == "/g/10.png"
    assert len(gallery) == 199 and gallery.consistent()
    assert 11 not in ids_of(gallery.search(VECTORS[10], 200))[0]
    with pytest.raises(ItemNotFound):
        gallery.delete(11)
    with pytest.raises(ItemNotFound):
        gallery.get(11)


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF4,Flat"])
def test_scores_are_cosine_similarities_for_every_kind(tmp_path: Path, factory: str) -> None:
    gallery = filled(tmp_path / "idx", factory=factory)  # IVF kinds search by L2 inside
    for neighbour in gallery.search(VECTORS[7], 5)[0]:
        expected = float(VECTORS[7] @ VECTORS[neighbour.id - 1])
        assert neighbour.score == pytest.approx(expected, abs=1e-4)
    assert gallery.search(VECTORS[7], 1)[0][0].score == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("factory", ["HNSW16", "IVF4,Flat"])  # hides / removes deleted ids
def test_approximate_indexes_never_return_deleted_items(tmp_path: Path, factory: str) -> None:
    gallery = filled(tmp_path / "idx", factory=factory)
    for item_id in range(1, 201, 3):
        gallery.delete(item_id)
    found = ids_of(gallery.search(VECTORS, 20))
    assert not {i for row in found for i in row} & set(range(1, 201, 3))
    assert gallery.consistent() and len(gallery) == 200 - 67
    gallery.close()
    reloaded = GalleryIndex.load(tmp_path / "idx", factory=factory)
    assert reloaded.consistent() and len(reloaded) == 133
    assert not {i for row in ids_of(reloaded.search(VECTORS, 20)) for i in row} & set(
        range(1, 201, 3)
    )


def test_near_duplicates_are_flagged_and_optionally_skipped(gallery: GalleryIndex) -> None:
    nearly = VECTORS[5] + 0.01 * unit_vectors(1, 16, seed=3)[0]
    nearly /= np.linalg.norm(nearly)
    fresh = unit_vectors(1, 16, seed=4)[0]
    added = gallery.add(np.stack([nearly, fresh, fresh]), items(3, 500), duplicate_threshold=0.97)
    assert added[0].duplicate_of == 6 and added[0].duplicate_score > 0.97
    assert added[1].duplicate_of is None and added[1].id == 202
    assert added[2].duplicate_of == 202 and added[2].duplicate_score == pytest.approx(1.0)
    skipped = gallery.add(nearly[None], items(1), duplicate_threshold=0.97, skip_duplicates=True)
    assert skipped[0].id is None and skipped[0].duplicate_of == 201  # its first copy
    assert len(gallery) == 203


def test_external_ids_are_unique(gallery: GalleryIndex) -> None:
    one = gallery.add(VECTORS[:1], [NewItem("/a.png", external_id="sku-1")])[0].id
    assert gallery.get(one).external_id == "sku-1"
    with pytest.raises(DuplicateExternalId, match="sku-1"):
        gallery.add(VECTORS[:1], [NewItem("/b.png", external_id="sku-1")])
    twice = [NewItem("/c.png", external_id="sku-2"), NewItem("/d.png", external_id="sku-2")]
    with pytest.raises(DuplicateExternalId, match="sku-2"):  # within one batch too
        gallery.add(VECTORS[:2], twice)
    assert len(gallery) == 201 and gallery.store.count() == 201 and gallery.consistent()


def test_items_are_read_back_by_id_page_label_and_content(gallery: GalleryIndex) -> None:
    item = gallery.get(5)
    assert (item.id, item.path, item.label, item.external_id) == (5, "/g/4.png", "even", None)
    items, total = gallery.page(label="odd", offset=10, limit=3)
    assert total == 100 and [i.id for i in items] == [22, 24, 26]  # /g/21.png, /g/23.png, ...
    sha = "ab" * 32
    [added] = gallery.add(VECTORS[:1], [NewItem("/n.png", sha256=sha)])
    assert gallery.page(label="") == ([gallery.get(added.id)], 1)  # '' = without a label
    assert gallery.page(offset=199, limit=5)[1] == 201
    assert gallery.labels() == {"even": 100, "odd": 100, None: 1}
    assert gallery.ids_of_content(sha) == [added.id] and gallery.known_contents() == {sha}
    assert gallery.contents_by_path()["/n.png"] == sha and len(gallery.contents_by_path()) == 201


def test_reload_serves_the_same_and_ids_are_never_reused(
    tmp_path: Path, database: Database | None
) -> None:
    gallery = filled(tmp_path / "idx", database=database)
    gallery.delete(200)
    queries = unit_vectors(3, 16, seed=2)
    before = gallery.search(queries, 5)
    gallery.close()
    loaded = GalleryIndex.load(tmp_path / "idx", fingerprint="abc", database=database)
    assert loaded.search(queries, 5) == before
    assert loaded.labels() == {"even": 100, "odd": 99}
    assert [a.id for a in loaded.add(unit_vectors(2, 16, 5), items(2))] == [201, 202]
    assert loaded.get(201).path == "/g/0.png" and loaded.last_change == 203
    loaded.close()


def test_changes_after_the_snapshot_are_caught_up(
    tmp_path: Path, database: Database | None
) -> None:
    gallery = filled(tmp_path / "idx", database=database)
    gallery.snapshot()
    gallery.delete(7)
    gallery.add(unit_vectors(1, 16, 9), items(1))
    gallery.store.close()  # as if killed: no final snapshot
    loaded = GalleryIndex.load(tmp_path / "idx", database=database)
    assert len(loaded) == 200 and loaded.consistent() and loaded.last_change == 202
    assert 7 not in ids_of(loaded.search(VECTORS[6], 10))[0]
    loaded.close()


@pytest.mark.parametrize("damage", ["truncate", "other model", "delete"])
def test_a_bad_snapshot_is_rebuilt_loudly(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    gallery = filled(tmp_path)
    gallery.close()
    info = json.loads((tmp_path / INFO_FILE).read_text())
    if damage == "truncate":
        (tmp_path / info["file"]).write_bytes(b"\0" * 100)
    elif damage == "other model":
        (tmp_path / INFO_FILE).write_text(json.dumps({**info, "fingerprint": "zzz"}))
    else:
        (tmp_path / INFO_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="index.recovery"):
        loaded = GalleryIndex.load(tmp_path, fingerprint="abc")
    assert "REBUILDING" in caplog.text
    assert len(loaded) == 200 and loaded.consistent()
    assert loaded.search(VECTORS[3], 1)[0][0].id == 4


def test_another_models_index_is_refused(tmp_path: Path, database: Database | None) -> None:
    filled(tmp_path, database=database).close()
    with pytest.raises(ModelMismatch, match="imgsim index"):
        GalleryIndex.load(tmp_path, fingerprint="other", database=database)
    with pytest.raises(FileExistsError):  # nor is a second collection made in its place
        GalleryIndex.create(16, "other", tmp_path, database=database)
    GalleryIndex.load(tmp_path, fingerprint="abc", database=database).close()


def test_missing_old_and_empty_indexes(tmp_path: Path) -> None:
    with pytest.raises(IndexMissing):
        GalleryIndex.load(tmp_path)
    (tmp_path / "CURRENT").write_text("v-1")
    with pytest.raises(IndexMissing, match="old format"):
        GalleryIndex.load(tmp_path)
    with pytest.raises(EmptyIndex):
        GalleryIndex.create(4, "x").search(np.ones((1, 4), np.float32), 3)
    with pytest.raises(FileExistsError):
        filled(tmp_path / "idx")
        GalleryIndex.create(16, "abc", tmp_path / "idx")


def test_shapes_are_checked(gallery: GalleryIndex) -> None:
    with pytest.raises(ValueError, match=r"shape \(n, 16\)"):
        gallery.add(np.zeros((1, 8), np.float32), [NewItem("x")])
    with pytest.raises(ValueError, match="not empty"):  # fill builds a new collection only
        gallery.fill(VECTORS[:1], items(1))


def flat_bytes(n: int, dim: int) -> int:
    """What n embeddings of size dim take in a Flat index: the floats and an int64 id each."""
    return n * (dim * 4 + 8)


def test_a_memory_limit_below_flat_gives_ivf_pq(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vectors = unit_vectors(1_000, 16, seed=7)
    gallery = GalleryIndex.create(16, "abc", tmp_path / "idx")
    gallery.add(vectors, items(1_000))
    assert gallery.info()["index_type"] == "Flat"
    gallery.limit_memory(flat_bytes(1_000, 16) // 2)
    assert gallery.info()["index_type"] == "IVF16,PQ8np" and gallery.consistent()
    assert gallery.info()["search_params"]["nprobe"] >= 1
    found = [row[0].id for row in gallery.search(vectors[:50], 1)]
    assert np.mean(np.array(found) == np.arange(1, 51)) >= 0.9  # each finds itself
    with pytest.raises(ValueError, match="cannot hold"):
        gallery.limit_memory(1_000)  # a byte per embedding: nothing fits, nothing recorded
    gallery.close()
    with caplog.at_level(logging.WARNING):
        reloaded = GalleryIndex.load(tmp_path / "idx")  # the limit is kept with the collection
    assert reloaded.info()["index_type"] == "IVF16,PQ8np" and "REBUILDING" not in caplog.text
    reloaded.close()


def test_too_few_to_train_codes_stay_flat_under_any_limit() -> None:
    gallery = GalleryIndex.create(16, "abc", max_index_memory=1)
    gallery.add(VECTORS, items(200))  # PQ needs 256 vectors to train its 256 centroids
    assert gallery.info()["index_type"] == "Flat" and len(gallery) == 200


class StubBundle:
    """What index_folder needs of a model bundle; an embedding per file content, and files
    that are not PNGs reported unreadable, as Bundle.encode(skip_unreadable=True) does."""

    embedding_dim = 16
    fingerprint = "stub"

    def __init__(self) -> None:
        self.encoded: list[list[Path]] = []

    def encode(
        self, inputs: Sequence[Path], batch_size: int, workers: int, skip_unreadable: bool
    ) -> Encoded:
        assert skip_unreadable
        self.encoded.append(list(inputs))
        rows, failed = [], []
        for position, path in enumerate(inputs):
            data = path.read_bytes()
            if not data.startswith(b"\x89PNG"):
                failed.append((position, "cannot identify image file"))
                continue
            seed = int.from_bytes(hashlib.sha256(data).digest()[:4], "little")
            rows.append(unit_vectors(1, 16, seed)[0])
        embeddings = np.array(rows, np.float32).reshape(-1, 16)
        return Encoded(embeddings, np.zeros((len(rows), 2), np.float32), failed)


def test_index_folder_decodes_once_and_builds_the_final_kind_once(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    database: Database | None,
) -> None:
    photos = tmp_path / "photos"
    for seed in range(300):
        (photos / ("a" if seed % 2 else "b")).mkdir(parents=True, exist_ok=True)
        (photos / ("a" if seed % 2 else "b") / f"{seed}.png").write_bytes(noise_png(seed, 4))
    (photos / "a" / "broken.png").write_bytes(b"not an image")
    bundle = StubBundle()
    tunings = []

    def no_reading_back(*args: object, **kwargs: object) -> None:
        raise AssertionError("the new index was built by reading the embeddings back")

    def counted(*args: object, **kwargs: object) -> dict:
        tunings.append(args[0])
        return tune_search(*args, **kwargs)

    tune_search = kinds.tune_search
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="app.stages"):
        patch.setattr(BaseItemStore, "embeddings", no_reading_back)
        patch.setattr(kinds, "tune_search", counted)
        gallery = index_folder(
            photos,
            bundle,
            tmp_path / "index",
            max_index_memory=flat_bytes(300, 16) // 2,
            database=database,
        )
    assert len(bundle.encoded) == 1 and len(bundle.encoded[0]) == 301  # one decode pass
    assert len(tunings) == 1  # one index built, of the final kind, tuned once
    [warning] = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert "skipping 1 unreadable file(s)" in warning and "broken.png (cannot identify" in warning
    reopened = GalleryIndex.load(tmp_path / "index", "stub", database=database)
    assert reopened.info()["index_type"].startswith("IVF") and len(reopened) == len(gallery) == 300
    assert reopened.labels() == {"a": 150, "b": 150} and reopened.consistent()
    reopened.close()
    # nothing new: only the broken file again
    index_folder(photos, bundle, tmp_path / "index", database=database)
    assert [p.name for p in bundle.encoded[1]] == ["broken.png"]
    # a rebuild is made aside and put in place of the collection: the same items, anew
    rebuilt = index_folder(photos, bundle, tmp_path / "index", rebuild=True, database=database)
    assert len(rebuilt) == 300 and len(bundle.encoded[2]) == 301
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "photos"]  # none left aside
    if database is not None:
        schemas = "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'imgsim%'"
        assert behind_imgsims_back(tmp_path, database, schemas) == [("imgsim",)]
    reopened = GalleryIndex.load(tmp_path / "index", "stub", database=database)
    # in PostgreSQL, which replicas share, the new collection's changes come after the old one's
    # 300 and the replacement's own: a replica that follows sees the log does not reach back
    assert len(reopened) == 300 and reopened.consistent()
    assert reopened.last_change == (300 if database is None else 601)
    reopened.close()
