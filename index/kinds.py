"""Which FAISS index a gallery gets, how it is built and tuned, and how to reach inside it.

Every look through FAISS's wrappers (IDMap, pre-transforms, IVF) goes through `unwrapped` and
`ivf_of`; `held_ids` and `search_parameters` use them for what the gallery needs of any kind.

Embeddings are L2-normalised float32 and searched by inner product (cosine similarity).
Three kinds, chosen by `choose_factory` from the gallery size and an optional memory budget:

- exact (``Flat``): every query scans every embedding. Perfect recall, nothing to tune.
- HNSW (``HNSW32,Flat``): a neighbour graph over the full vectors; ``efSearch`` is tuned.
- IVF-PQ (``IVF{nlist},PQ{m}np``): compressed codes in inverted lists, for when the full
  vectors do not fit the memory budget; ``nprobe`` is tuned. IVF kinds are built with the L2
  metric: on unit vectors it ranks exactly as inner product, and PQ estimates it better
  (Recall@10 0.95 against 0.88 for the same IVF128,PQ32 on 20k x 64 test embeddings). Use
  `similarities` to turn any kind's distances into cosine similarities.

Ids are the caller's int64 ids (the service's SQLite row ids) for every kind. Deletes:

- exact: ``IndexIDMap2`` over ``IndexFlat``; FAISS removes in place, O(n) per call.
- IVF-PQ: the inverted lists store the ids themselves, so the IVF index is used unwrapped and
  removes in place. It is *not* wrapped in ``IndexIDMap2``: that wrapper assumes the index below
  renumbers like ``IndexFlat`` after a removal, which IVF does not, so ids would go stale.
- HNSW: FAISS cannot unlink a node from the graph (``remove_ids`` raises), so deleted ids are
  hidden at search time until the next rebuild (see index/vectors.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

logger = logging.getLogger(__name__)

METRIC = faiss.METRIC_INNER_PRODUCT
FLOAT_BYTES = 4
ID_BYTES = 8

# Exact search stays while a query scans at most this many floats (gallery size x dimension).
# Measured here (2-core AMD EPYC VM, faiss-cpu 1.15.1, batch 1, one thread) with
# `python benchmarks/index_scale.py --flat-sweep --queries 300`: at 2**24 floats Flat p50 was
# 4.5 ms (32k x 512) and 5.3 ms (16k x 1024); 2**25 took 9-10 ms. About 5 ms is small beside
# the CNN forward pass that made the query embedding; past it HNSW answers in well under 1 ms.
FLAT_MAX_FLOATS = 2**24

HNSW_NEIGHBOURS = 32
# Level-0 links are 2 * M int32 per vector, plus level and offset bookkeeping.
HNSW_LINK_BYTES = 2 * HNSW_NEIGHBOURS * 4 + 8

IVF_LISTS_PER_SQRT_N = 4
IVF_MIN_TRAIN_PER_LIST = 39  # below this FAISS warns that k-means is under-trained
IVF_TRAIN_PER_LIST = 50
KMEANS_ITERATIONS = 10
PQ_CENTROIDS = 256  # 8-bit codes: one byte per sub-quantizer
PQ_TRAIN_PER_CENTROID = 64  # FAISS default is 256; 64 keeps hundreds of k-means runs cheap
# Dimensions per code byte, finest first: finer codes cost memory and buy recall.
PQ_DIMS_PER_BYTE = (2, 4, 8, 16)

SEARCH_PARAMETERS = {"hnsw": "efSearch", "ivf": "nprobe"}
EF_SEARCH_MAX = 4096
RECALL_PLATEAU = 0.002  # doubling nprobe/efSearch gains less than this: recall has topped out
TUNING_QUERIES = 200  # a gallery's own vectors used as queries when it is tuned


@dataclass(frozen=True)
class KindChoice:
    """How a collection's index kind is picked: the factory asked for, else `choose_factory`
    from its size, within max_memory bytes when given."""

    dim: int
    asked: str | None = None
    max_memory: int | None = None

    def for_size(self, n: int) -> str:
        """The factory string for an index of n items."""
        return self.asked or choose_factory(max(n, 1), self.dim, self.max_memory)


def choose_factory(n: int, dim: int, memory_budget_bytes: int | None = None) -> str:
    """FAISS factory string for `n` embeddings of size `dim` within an optional memory budget.

    Over the budget, IVF-PQ; but fewer than PQ_CENTROIDS embeddings cannot train its codes, and
    take little memory anyway, so they keep the kind chosen by size."""
    if n < 1 or dim < 1:
        raise ValueError(f"need n >= 1 and dim >= 1, got n={n}, dim={dim}")
    flat_bytes = dim * FLOAT_BYTES + ID_BYTES
    if n * dim <= FLAT_MAX_FLOATS:
        factory, bytes_per_vector = "Flat", flat_bytes
    else:
        factory, bytes_per_vector = f"HNSW{HNSW_NEIGHBOURS},Flat", flat_bytes + HNSW_LINK_BYTES
    fits = memory_budget_bytes is None or n * bytes_per_vector <= memory_budget_bytes
    if fits or n < PQ_CENTROIDS:
        return factory
    return _ivf_pq_factory(n, dim, memory_budget_bytes)


def _ivf_pq_factory(n: int, dim: int, memory_budget_bytes: int) -> str:
    """IVF-PQ with the finest codes that fit the budget (`np`: no polysemous training)."""
    code_bytes = memory_budget_bytes // n - ID_BYTES
    for dims_per_byte in PQ_DIMS_PER_BYTE:
        m = dim // dims_per_byte
        if dim % dims_per_byte == 0 and m <= code_bytes:
            return f"IVF{ivf_lists(n)},PQ{m}np"
    raise ValueError(
        f"a memory budget of {memory_budget_bytes} bytes cannot hold {n} embeddings of size {dim}"
    )


def ivf_lists(n: int) -> int:
    """Number of IVF lists for `n` embeddings: ~4 sqrt(n), a power of two, trainable from `n`."""
    wanted = round(math.log2(IVF_LISTS_PER_SQRT_N * math.sqrt(n)))
    trainable = math.floor(math.log2(max(1, n // IVF_MIN_TRAIN_PER_LIST)))
    return 2 ** min(wanted, trainable)


def build_index(dim: int, factory: str) -> faiss.Index:
    """Empty index for unit embeddings from `factory`, taking the caller's int64 ids."""
    index = faiss.index_factory(dim, factory, METRIC)
    if ivf_of(index) is not None:
        # IVF keeps ids in its lists; L2 for PQ's sake (see the module docstring).
        return faiss.index_factory(dim, factory, faiss.METRIC_L2)
    if factory.startswith("IDMap"):
        return index
    return faiss.index_factory(dim, f"IDMap2,{factory}", METRIC)


def similarities(index: faiss.Index, distances: np.ndarray) -> np.ndarray:
    """Cosine similarities from `index.search` distances (unit vectors: |x - q|^2 = 2 - 2 x.q)."""
    if index.metric_type == faiss.METRIC_L2:
        return 1.0 - distances / 2.0
    return distances


def index_kind(index: faiss.Index) -> str:
    """'ivf', 'hnsw' or 'flat': which search parameter, if any, the index has."""
    if ivf_of(index) is not None:
        return "ivf"
    if isinstance(unwrapped(index), faiss.IndexHNSW):
        return "hnsw"
    return "flat"


def unwrapped(index: faiss.Index) -> faiss.Index:
    """The index under any IDMap / pre-transform wrappers, as its own class."""
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexIDMap | faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index


def ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IVF index inside `index` as its own class (e.g. IndexIVFPQ), or None."""
    ivf = faiss.try_extract_index_ivf(index)
    return None if ivf is None else faiss.downcast_index(ivf)


def held_ids(index: faiss.Index) -> np.ndarray:
    """Every id the index holds: from the IDMap, or from the lists of an unwrapped IVF index."""
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexIDMap):
        return faiss.vector_to_array(top.id_map).astype(np.int64)
    lists = ivf_of(index).invlists
    parts = [np.zeros(0, np.int64)]
    for number in range(lists.nlist):
        if size := lists.list_size(number):
            parts.append(faiss.rev_swig_ptr(lists.get_ids(number), size).astype(np.int64))
    return np.concatenate(parts)


def search_parameters(index: faiss.Index, selector: faiss.IDSelector) -> faiss.SearchParameters:
    """Search parameters carrying a selector and the index's own tuned settings; made afresh
    for each search, since IndexIDMap swaps the selector inside them while it searches."""
    ivf = ivf_of(index)
    if ivf is not None:
        return faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe)
    inner = unwrapped(index)
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)
    return faiss.SearchParameters(sel=selector)


def build_filled(
    dim: int, factory: str, ids: np.ndarray, vectors: np.ndarray
) -> tuple[faiss.Index, dict]:
    """An index of kind `factory` holding `vectors` under `ids`: trained on them, filled, and
    tuned to the recall target on a sample of them; returns it and its search parameters."""
    index = build_index(dim, factory)
    if not len(ids):
        return index, {}
    train_if_needed(index, vectors)
    index.add_with_ids(vectors, ids)
    return index, tune_on_sample(index, ids, vectors)


def tune_on_sample(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray) -> dict:
    """Tune an approximate index on up to TUNING_QUERIES of its own vectors as queries, against
    exact search over all of them; an exact index has nothing to tune ({})."""
    if index_kind(index) == "flat":
        return {}
    rng = np.random.default_rng(0)
    queries = vectors[rng.choice(len(vectors), min(TUNING_QUERIES, len(vectors)), replace=False)]
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(queries, 10)
    return tune_search(index, queries, ids[truth])


def train_if_needed(index: faiss.Index, sample: np.ndarray) -> None:
    """Train an untrained index on a seeded subsample of `sample` (sized for IVF k-means)."""
    if index.is_trained:
        return
    size = len(sample)
    ivf = ivf_of(index)
    if ivf is not None:
        ivf.cp.niter = KMEANS_ITERATIONS
        if isinstance(ivf, faiss.IndexIVFPQ):
            ivf.pq.cp.niter = KMEANS_ITERATIONS
            ivf.pq.cp.max_points_per_centroid = PQ_TRAIN_PER_CENTROID
        size = min(size, IVF_TRAIN_PER_LIST * max(ivf.nlist, PQ_CENTROIDS))
    rows = np.sort(np.random.default_rng(0).choice(len(sample), size, replace=False))
    logger.info("training on %d of %d embeddings", size, len(sample))
    index.train(np.ascontiguousarray(sample[rows], dtype=np.float32))


def neighbour_overlap_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Fraction of the true top-`k` ids present in the found top-`k`, over all queries."""
    hits = found[:, :k, None] == truth[:, None, :k]
    return float(hits.any(axis=2).sum() / (len(truth) * k))


def apply_search_params(index: faiss.Index, params: dict) -> None:
    """Set the saved efSearch (HNSW) or nprobe (IVF) on `index`; other keys are ignored."""
    name = SEARCH_PARAMETERS.get(index_kind(index))
    if name in params:
        faiss.ParameterSpace().set_index_parameter(index, name, params[name])


def tune_search(
    index: faiss.Index,
    queries: np.ndarray,
    truth_ids: np.ndarray,
    target_recall: float = 0.95,
    k: int = 10,
) -> dict:
    """Set the smallest efSearch / nprobe reaching `target_recall` against `truth_ids`; return it.

    Doubles the parameter, then bisects. Where recall stops rising first (PQ's quantisation
    error caps it whatever nprobe is), keeps the smallest value at that plateau, logs a warning
    and returns ``reached: False``.
    """
    kind = index_kind(index)

    def recall_with(value: int | None) -> float:
        if value is not None:
            apply_search_params(index, {name: value})
        return neighbour_overlap_at_k(index.search(queries, k)[1], truth_ids, k)

    if kind == "flat":
        recall = recall_with(None)
        return {"recall": recall, "reached": recall >= target_recall, "k": k}
    if kind == "hnsw":
        name, value, limit = "efSearch", k, EF_SEARCH_MAX
    else:
        name, value, limit = "nprobe", 1, ivf_of(index).nlist
    value, recall, failed = _double_until(recall_with, value, limit, target_recall)
    if recall >= target_recall:
        value, recall = _bisect(recall_with, failed, value, recall, target_recall)
    else:
        logger.warning(
            "%s=%d tops out at Recall@%d %.3f < %.3f", name, value, k, recall, target_recall
        )
    apply_search_params(index, {name: value})
    return {name: value, "recall": recall, "reached": recall >= target_recall, "k": k}


def _double_until(
    recall_with: Callable[[int], float], value: int, limit: int, target: float
) -> tuple[int, float, int]:
    """Double `value` until recall reaches `target`, `limit`, or stops improving."""
    recall, failed = recall_with(value), value - 1
    while recall < target and value < limit:
        bigger = min(2 * value, limit)
        bigger_recall = recall_with(bigger)
        if bigger_recall - recall < RECALL_PLATEAU and bigger_recall < target:
            break
        failed, value, recall = value, bigger, bigger_recall
    return value, recall, failed


def _bisect(
    recall_with: Callable[[int], float], failed: int, value: int, recall: float, target: float
) -> tuple[int, float]:
    """Smallest value in (failed, value] whose recall reaches `target`, and that recall."""
    while value - failed > 1:
        middle = (failed + value) // 2
        middle_recall = recall_with(middle)
        if middle_recall >= target:
            value, recall = middle, middle_recall
        else:
            failed = middle
    return value, recall
