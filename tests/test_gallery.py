"""The gallery index: exact search, metadata, atomic saves, and the model check."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from index.errors import EmptyIndex, IndexMissing, ModelMismatch
from index.gallery import CURRENT, GalleryIndex


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture
def gallery() -> GalleryIndex:
    gallery = GalleryIndex.create(16, "abc")
    vectors = unit_vectors(200, 16, seed=0)
    gallery.add(
        vectors,
        [f"/g/{i}.png" for i in range(200)],
        ["odd" if i % 2 else "even" for i in range(200)],
    )
    return gallery


def test_search_equals_brute_force(gallery: GalleryIndex) -> None:
    vectors = unit_vectors(200, 16, seed=0)
    queries = unit_vectors(5, 16, seed=1)
    expected = np.argsort(-(queries @ vectors.T), axis=1)[:, :7]
    found = gallery.search(queries, 7)
    assert [[n.id for n in row] for row in found] == expected.tolist()
    best = found[0][0]
    assert best.path == f"/g/{best.id}.png" and best.label == ("odd" if best.id % 2 else "even")
    assert best.score == pytest.approx(float(queries[0] @ vectors[best.id]), abs=1e-5)


def test_an_item_finds_itself_first(gallery: GalleryIndex) -> None:
    vectors = unit_vectors(200, 16, seed=0)
    top = gallery.search(vectors[42], 1)[0][0]
    assert top.id == 42 and top.score == pytest.approx(1.0, abs=1e-5)


def test_save_load_round_trip(gallery: GalleryIndex, tmp_path: Path) -> None:
    gallery.save(tmp_path / "idx")
    loaded = GalleryIndex.load(tmp_path / "idx", fingerprint="abc")
    queries = unit_vectors(3, 16, seed=2)
    assert loaded.search(queries, 5) == gallery.search(queries, 5)
    assert loaded.labels() == {"even": 100, "odd": 100}


def test_ids_continue_after_reload(gallery: GalleryIndex, tmp_path: Path) -> None:
    gallery.save(tmp_path)
    loaded = GalleryIndex.load(tmp_path)
    assert loaded.add(unit_vectors(2, 16, 5), ["a", "b"], [None, None]) == [200, 201]


def test_another_models_index_is_refused(gallery: GalleryIndex, tmp_path: Path) -> None:
    gallery.save(tmp_path)
    with pytest.raises(ModelMismatch, match="imgsim index"):
        GalleryIndex.load(tmp_path, fingerprint="other")


def test_missing_and_empty_indexes(tmp_path: Path) -> None:
    with pytest.raises(IndexMissing):
        GalleryIndex.load(tmp_path)
    with pytest.raises(EmptyIndex):
        GalleryIndex.create(4, "x").search(np.ones((1, 4), np.float32), 3)


def test_a_crash_mid_write_leaves_the_previous_index(
    gallery: GalleryIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gallery.save(tmp_path)
    before = (tmp_path / CURRENT).read_text()
    gallery.add(unit_vectors(1, 16, 9), ["/new.png"], ["new"])

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", crash)
    with pytest.raises(OSError, match="disk full"):
        gallery.save(tmp_path)
    assert (tmp_path / CURRENT).read_text() == before
    assert len(GalleryIndex.load(tmp_path)) == 200


def test_shapes_are_checked(gallery: GalleryIndex) -> None:
    with pytest.raises(ValueError, match=r"shape \(n, 16\)"):
        gallery.add(np.zeros((1, 8), np.float32), ["x"], [None])
