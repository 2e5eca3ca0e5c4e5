"""Index scale benchmark: build time, memory, batch-1 latency and Recall@10 per index kind.

The embeddings are synthetic but clustered: a Gaussian mixture on a 64-dim latent space, lifted
to `dim` by a random linear map, plus small isotropic noise, then L2-normalised. Real image
embeddings are clustered and of low intrinsic dimension; uniform random vectors in 512-D have
nearly equidistant neighbours, which makes every approximate index look artificially bad.

For each (n, dim) the exact Flat inner-product index gives the ground truth. Each index kind
(exact Flat, `choose_factory`'s automatic choice, and the IVF-PQ it picks when the memory budget
is a quarter of the flat vectors) is built (training included), tuned to Recall@10 >= 0.95 on
tuning queries, then measured on separate held-out queries:

- memory per vector: bytes of `faiss.serialize_index(index)` / n, i.e. the index as saved;
  in RAM it is the same up to small headers (and IndexIDMap2's id -> row hash map);
- search p50 / p99: one query per `search` call, one OpenMP thread (the service searches per
  request); Flat at large n is slow, so each kind is timed for at most --latency-seconds;
- Recall@10: top-10 overlap with exact search on the held-out queries.

Usage:
    python benchmarks/index_scale.py --sizes 100000 1000000 --dims 512 1024
    python benchmarks/index_scale.py --flat-sweep    # Flat p50 against n, for FLAT_MAX_FLOATS
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from index import kinds

logger = logging.getLogger("index_scale")

K = 10
TARGET_RECALL = 0.95
CLUSTERS = 1_000
LATENT_DIM = 64
CLUSTER_SPREAD = 0.5
NOISE = 0.05
CHUNK = 65_536
FLAT_SWEEP_FLOATS = (2**22, 2**23, 2**24, 2**25, 2**26)


@dataclass
class Gallery:
    """Base embeddings with their ids, tuning and held-out queries, and exact top-K ids."""

    base: np.ndarray
    ids: np.ndarray
    tune_queries: np.ndarray
    queries: np.ndarray
    tune_truth: np.ndarray | None = None
    truth: np.ndarray | None = None


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--latency-seconds", type=float, default=30.0)
    parser.add_argument(
        "--budget-fraction",
        type=float,
        default=0.25,
        help="memory budget for the IVF-PQ row, as a fraction of flat float32",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/index_scale.json"))
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    parser.add_argument("--flat-sweep", action="store_true")
    return parser.parse_args()


def synthetic_embeddings(n: int, dim: int, seed: int) -> np.ndarray:
    """`n` clustered unit vectors of size `dim` (see the module docstring), seeded."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, LATENT_DIM), dtype=np.float32)
    lift = rng.standard_normal((LATENT_DIM, dim), dtype=np.float32) / float(np.sqrt(LATENT_DIM))
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, CHUNK):
        size = min(CHUNK, n - start)
        latent = centres[rng.integers(CLUSTERS, size=size)]
        latent += CLUSTER_SPREAD * rng.standard_normal((size, LATENT_DIM), dtype=np.float32)
        chunk = latent @ lift
        chunk += NOISE * rng.standard_normal((size, dim), dtype=np.float32)
        faiss.normalize_L2(chunk)
        out[start : start + size] = chunk
    return out


def make_gallery(n: int, dim: int, queries: int, seed: int) -> Gallery:
    """Synthetic gallery of `n` with `queries` tuning and `queries` held-out queries."""
    x = synthetic_embeddings(n + 2 * queries, dim, seed)
    return Gallery(
        base=x[:n],
        ids=np.arange(n, dtype=np.int64),
        tune_queries=x[n : n + queries],
        queries=x[n + queries :],
    )


def batch1_latency_ms(index: faiss.Index, queries: np.ndarray, budget_s: float) -> np.ndarray:
    """Per-query latencies (ms), one query per call on one thread, within `budget_s`."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    latencies, started = [], time.perf_counter()
    for query in queries:
        begin = time.perf_counter()
        index.search(query[None, :], K)
        latencies.append(time.perf_counter() - begin)
        if begin - started > budget_s:
            break
    faiss.omp_set_num_threads(threads)
    return 1e3 * np.array(latencies)


def measure(
    label: str,
    factory: str,
    index: faiss.Index,
    build_s: float,
    gallery: Gallery,
    args: argparse.Namespace,
) -> dict:
    """Tune `index`, then measure memory, batch-1 latency and held-out recall."""
    params = kinds.tune_search(index, gallery.tune_queries, gallery.tune_truth, TARGET_RECALL, K)
    recall = kinds.neighbour_overlap_at_k(index.search(gallery.queries, K)[1], gallery.truth, K)
    latencies = batch1_latency_ms(index, gallery.queries, args.latency_seconds)
    n, dim = gallery.base.shape
    row = {
        "n": n,
        "dim": dim,
        "kind": label,
        "factory": factory,
        "build_s": build_s,
        "bytes_per_vector": faiss.serialize_index(index).nbytes / n,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "timed_queries": len(latencies),
        "recall_at_10": recall,
        "tune_recall": params["recall"],
        "search_params": {k: v for k, v in params.items() if k in ("efSearch", "nprobe")},
    }
    logger.info("%s", json.dumps(row))
    return row


def build(factory: str, base: np.ndarray, ids: np.ndarray) -> tuple[faiss.Index, float]:
    """Index of kind `factory` holding `base` under `ids`, and its build time (s)."""
    started = time.perf_counter()
    index = kinds.build_index(base.shape[1], factory)
    kinds.train_if_needed(index, base)
    index.add_with_ids(base, ids)
    return index, time.perf_counter() - started


def benchmark_size(n: int, dim: int, args: argparse.Namespace) -> list[dict]:
    """Rows for one (n, dim): exact, the automatic choice, and memory-short IVF-PQ."""
    gallery = make_gallery(n, dim, args.queries, args.seed)
    exact, build_s = build("Flat", gallery.base, gallery.ids)
    gallery.tune_truth = exact.search(gallery.tune_queries, K)[1]
    gallery.truth = exact.search(gallery.queries, K)[1]
    rows = [measure("exact", "Flat", exact, build_s, gallery, args)]
    del exact
    budget = int(args.budget_fraction * n * dim * kinds.FLOAT_BYTES)
    for label, factory in (
        ("auto", kinds.choose_factory(n, dim)),
        ("memory-short", kinds.choose_factory(n, dim, budget)),
    ):
        if factory != "Flat":
            index, build_s = build(factory, gallery.base, gallery.ids)
            rows.append(measure(label, factory, index, build_s, gallery, args))
            del index
    return rows


def markdown_table(rows: list[dict]) -> str:
    """Rows as a Markdown table."""
    lines = [
        "| n | dim | kind | factory | build s | bytes/vector | p50 ms | p99 ms | timed q "
        "| search params | Recall@10 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["search_params"].items()) or "-"
        lines.append(
            f"| {r['n']:,} | {r['dim']} | {r['kind']} | `{r['factory']}` | {r['build_s']:.1f} "
            f"| {r['bytes_per_vector']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['timed_queries']} | {params} | {r['recall_at_10']:.3f} |"
        )
    return "\n".join(lines)


def flat_sweep(args: argparse.Namespace) -> None:
    """Print Flat batch-1 p50 against gallery size, the figure behind FLAT_MAX_FLOATS."""
    for dim in args.dims:
        x = synthetic_embeddings(max(FLAT_SWEEP_FLOATS) // dim + args.queries, dim, args.seed)
        for floats in FLAT_SWEEP_FLOATS:
            index = faiss.IndexFlatIP(dim)
            index.add(x[: floats // dim])
            p50 = np.percentile(batch1_latency_ms(index, x[-args.queries :], 10.0), 50)
            print(
                f"dim={dim} n={floats // dim} floats=2**{floats.bit_length() - 1} p50={p50:.2f} ms"
            )


def main() -> None:
    """Run the benchmark grid, print the table, write JSON (and Markdown if asked)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args()
    faiss.omp_set_num_threads(args.threads)
    if args.flat_sweep:
        flat_sweep(args)
        return
    started = time.perf_counter()
    rows = [row for n in args.sizes for dim in args.dims for row in benchmark_size(n, dim, args)]
    header = (
        f"FAISS {faiss.__version__}, {args.threads} OpenMP threads for build/tuning, "
        f"1 for batch-1 latency; {os.cpu_count()} CPU cores; {args.queries} tuning + "
        f"{args.queries} held-out queries; wall time {time.perf_counter() - started:.0f} s"
    )
    table = f"{header}\n\n{markdown_table(rows)}\n"
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
