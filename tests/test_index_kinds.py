"""Index kinds on seeded synthetic embeddings: exact against brute force, ANN against a floor."""

import json
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest

from index import kinds

N, DIM, K = 20_000, 64, 10
RECALL_FLOOR = 0.95


def embeddings(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors from a Gaussian mixture on an 8-dim latent space, lifted to `dim`."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((32, 8), dtype=np.float32)[rng.integers(32, size=n)]
    latent += 0.5 * rng.standard_normal((n, 8), dtype=np.float32)
    x = latent @ rng.standard_normal((8, dim), dtype=np.float32)
    x += 0.1 * rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """PQ's many tiny k-means runs train ~3x faster here without OpenMP start-up costs."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module")
def gallery() -> dict:
    """Base embeddings with sparse ids, queries, and their exact top-K ids."""
    x = embeddings(N + 500, DIM, seed=0)
    base, queries = x[:N], x[N:]
    ids = 1_000 + 7 * np.arange(N, dtype=np.int64)
    truth = ids[np.argsort(-(queries @ base.T), axis=1)[:, :K]]
    return {"base": base, "ids": ids, "queries": queries, "truth": truth}


def built(factory: str, base: np.ndarray, ids: np.ndarray) -> faiss.Index:
    """Trained index of kind `factory` holding `base` under `ids`."""
    index = kinds.build_index(base.shape[1], factory)
    kinds.train_if_needed(index, base)
    index.add_with_ids(base, ids)
    return index


def test_choose_factory_by_size_and_budget() -> None:
    flat_limit = kinds.FLAT_MAX_FLOATS // DIM
    assert kinds.choose_factory(flat_limit, DIM) == "Flat"
    assert kinds.choose_factory(flat_limit + 1, DIM) == "HNSW32,Flat"
    n = 1_000_000
    assert kinds.choose_factory(n, DIM, memory_budget_bytes=10 * n * DIM) == "HNSW32,Flat"
    assert kinds.choose_factory(n, DIM, n * (DIM // 2 + 8)) == "IVF4096,PQ32np"
    assert kinds.choose_factory(n, DIM, n * (DIM // 2 + 7)) == "IVF4096,PQ16np"
    assert kinds.choose_factory(1_000, DIM, 1_000 * 20) == "IVF16,PQ8np"
    assert kinds.choose_factory(kinds.PQ_CENTROIDS - 1, DIM, 1) == "Flat"  # too few to train PQ
    with pytest.raises(ValueError, match="cannot hold"):
        kinds.choose_factory(n, DIM, memory_budget_bytes=n)


def test_flat_equals_brute_force(gallery: dict) -> None:
    index = built("Flat", gallery["base"], gallery["ids"])
    scores, found = index.search(gallery["queries"], K)
    np.testing.assert_array_equal(found, gallery["truth"])
    rows = (found - 1_000) // 7
    expected = np.einsum("qd,qkd->qk", gallery["queries"], gallery["base"][rows])
    np.testing.assert_allclose(kinds.similarities(index, scores), expected, atol=1e-5)
    assert kinds.tune_search(index, gallery["queries"], gallery["truth"])["recall"] == 1.0


@pytest.mark.parametrize("factory", ["HNSW32,Flat", "IVF512,PQ32np"])
def test_tuned_search_reaches_recall_floor(gallery: dict, factory: str) -> None:
    index = built(factory, gallery["base"], gallery["ids"])
    params = kinds.tune_search(index, gallery["queries"], gallery["truth"], RECALL_FLOOR, K)
    assert params["reached"] and params["recall"] >= RECALL_FLOOR
    found = index.search(gallery["queries"], K)[1]
    assert kinds.neighbour_overlap_at_k(found, gallery["truth"], K) == params["recall"]


def test_memory_budget_picks_the_ivf_pq_tested_above() -> None:
    assert kinds.choose_factory(N, DIM, N * (DIM // 2 + 8)) == "IVF512,PQ32np"


def test_similarities_from_l2_ivf_are_cosines(gallery: dict) -> None:
    index = built("IVF16,Flat", gallery["base"], gallery["ids"])
    assert index.metric_type == faiss.METRIC_L2
    kinds.apply_search_params(index, {"nprobe": 16})
    scores, found = index.search(gallery["queries"], K)
    np.testing.assert_array_equal(found, gallery["truth"])
    expected = np.sort(gallery["queries"] @ gallery["base"].T, axis=1)[:, ::-1][:, :K]
    np.testing.assert_allclose(kinds.similarities(index, scores), expected, atol=1e-5)


@pytest.mark.parametrize("factory", ["HNSW32,Flat", "IVF64,PQ16np"])
def test_search_params_survive_save_and_load(gallery: dict, factory: str, tmp_path: Path) -> None:
    base, ids = gallery["base"][:5_000], gallery["ids"][:5_000]
    queries = gallery["queries"]
    truth = ids[np.argsort(-(queries @ base.T), axis=1)[:, :K]]
    index = built(factory, base, ids)
    params = kinds.tune_search(index, queries, truth, target_recall=0.9)
    expected = index.search(queries, K)[1]
    faiss.write_index(index, str(tmp_path / "gallery.faiss"))
    (tmp_path / "search.json").write_text(json.dumps(params))

    loaded = faiss.read_index(str(tmp_path / "gallery.faiss"))
    kinds.apply_search_params(loaded, {"efSearch": 1, "nprobe": 1})
    kinds.apply_search_params(loaded, json.loads((tmp_path / "search.json").read_text()))
    np.testing.assert_array_equal(loaded.search(queries, K)[1], expected)


def test_neighbour_overlap_at_k_counts_shared_ids() -> None:
    truth = np.array([[1, 2, 3], [4, 5, 6]])
    found = np.array([[3, 2, 9], [-1, -1, -1]])
    assert kinds.neighbour_overlap_at_k(found, truth, 3) == pytest.approx(2 / 6)
    assert kinds.neighbour_overlap_at_k(found, truth, 1) == 0.0
