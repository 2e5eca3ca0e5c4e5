"""Replicas of one collection on PostgreSQL, on this machine, against the targets of issue 32.

Everything runs here: a throwaway PostgreSQL 15 cluster (tests/postgres.py), `imgsim serve`
replicas of efficientnet_lite0 with its ImageNet weights (no training: the speed is the trained
model's), HAProxy with the repository's haproxy.cfg in front of them, and the clients. So the
replicas, the database, the balancer and the clients share this machine's cores, and more
replicas cannot serve more here: the figures show what a replica costs, not how far it scales.

- per write and per start-up, in-process: GalleryIndex.add of one image (SQLite, PostgreSQL),
  and GalleryIndex.load of a collection of --items embeddings, from its snapshot and rebuilt;
- served: /similar through HAProxy at 16 clients with 1, 2 and 3 replicas;
- write to visible: an image POSTed to one replica, then the time until each other replica's
  index holds it (its /index last_change reaches the write's), idle and under search load;
- a retry storm on one replica of densenet121 (as issue 32 measured it): 64 clients POST
  /classify; when answered 503 they either wait the Retry-After they were given, or send again
  at once; /health and /ready are probed every 50 ms from a process of their own meanwhile.

    python -m benchmarks.replicas [--quick]

It writes benchmarks/replicas.md.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from benchmarks.machine import cpu_model
from index.database import Database
from index.gallery import GalleryIndex
from index.store import NewItem
from models.bundle import Bundle
from tests.postgres import Cluster, throwaway_cluster
from tests.servers import free_port, start_server
from tests.synthetic import noise_png

REPORT = Path(__file__).with_suffix(".md")
HAPROXY_CFG = Path(__file__).parents[1] / "haproxy.cfg"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def ms(values: list[float]) -> str:
    return f"{percentile(values, 50) * 1000:.1f} / {percentile(values, 99) * 1000:.1f}"


# -- in-process: a write and a start-up, SQLite against PostgreSQL -------------------------------


def store_costs(cluster: Cluster, dim: int, writes: int, items: int, lines: list[str]) -> None:
    """ms per single-image add, and seconds to open a collection of `items`, for both stores."""
    rng = np.random.default_rng(0)
    lines += [
        "## Per write and per start-up, in-process",
        "",
        f"GalleryIndex.add of one image ({writes} in a row, p50 / p99 ms) and GalleryIndex.load "
        f"of a collection of {items:,} embeddings of size {dim} (s): from its snapshot (caught "
        "up with the store), and rebuilt from the store when there is no snapshot.",
        "",
        "| store | add one image, p50 / p99 ms | load from snapshot, s | load, rebuilt, s |",
        "|---|---|---|---|",
    ]
    for name in ("SQLite", "PostgreSQL"):
        with tempfile.TemporaryDirectory() as tmp:
            database = Database(cluster.new_database()) if name == "PostgreSQL" else None
            folder = Path(tmp) / "index"
            vectors = rng.normal(size=(items + writes, dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            gallery = GalleryIndex.create(
                dim, "fp", folder, snapshot_every=10**9, database=database
            )
            gallery.fill(vectors[:items], [NewItem(f"/{i}.png") for i in range(items)])
            took = []
            for i in range(items, items + writes):
                start = time.perf_counter()
                gallery.add(vectors[i : i + 1], [NewItem(f"/{i}.png")])
                took.append(time.perf_counter() - start)
            gallery.close()
            start = time.perf_counter()
            GalleryIndex.load(folder, "fp", database=database).close()
            from_snapshot = time.perf_counter() - start
            (folder / "snapshot.json").unlink()
            start = time.perf_counter()
            GalleryIndex.load(folder, "fp", database=database).close()
            rebuilt = time.perf_counter() - start
        lines.append(f"| {name} | {ms(took)} | {from_snapshot:.2f} | {rebuilt:.2f} |")
        print(lines[-1], flush=True)
    lines.append("")


# -- served ----------------------------------------------------------------------------------------


@contextmanager
def replicas(bundle_dir: Path, index_dir: Path, url: str, count: int) -> Iterator[list[str]]:
    """`count` imgsim serve replicas of one collection; their base URLs."""
    env = {"IMGSIM_DATABASE_URL": url}
    ports = [free_port() for _ in range(count)]
    servers = []
    try:
        for port in ports:
            servers.append(start_server(bundle_dir, index_dir, port, env))
        yield [f"http://127.0.0.1:{port}" for port in ports]
    finally:
        for server in servers:
            server.kill()
            server.wait()


@contextmanager
def balancer(urls: list[str]) -> Iterator[str]:
    """HAProxy with haproxy.cfg in front of up to three replicas (the missing ones repeat the
    first, so that the configuration is the one deployed)."""
    port = free_port()
    addresses = [u.removeprefix("http://") for u in urls]
    addresses += [addresses[0]] * (3 - len(addresses))
    env = {f"REPLICA_{i + 1}": a for i, a in enumerate(addresses)}
    process = subprocess.Popen(
        ["haproxy", "-db", "-f", str(HAPROXY_CFG)],
        env={**os.environ, "LISTEN": f"127.0.0.1:{port}", **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        time.sleep(2.5)  # every replica's checks have risen
        yield url
    finally:
        process.terminate()
        process.wait()


async def load(url: str, path: str, clients: int, seconds: float, resend: bool = False) -> dict:
    """Closed-loop clients POSTing an image to path for `seconds`: answers per status, rate.
    On 503 a client waits the Retry-After it was given, or sends again at once (resend)."""
    image = noise_png(1, 64)
    statuses: dict[int, int] = {}
    stop = time.monotonic() + seconds

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            while time.monotonic() < stop:
                answer = await http.post(path, files={"file": ("q.png", image, "image/png")})
                statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
                if answer.status_code == 503 and not resend:
                    await asyncio.sleep(float(answer.headers.get("Retry-After", "1")))

    await asyncio.gather(*(client() for _ in range(clients)))
    return {"statuses": statuses, "rate": statuses.get(200, 0) / seconds}


def served(bundle_dir: Path, cluster: Cluster, seconds: float, lines: list[str]) -> None:
    """/similar through HAProxy at 16 clients with 1, 2 and 3 replicas."""
    lines += [
        "## /similar through HAProxy, 16 clients",
        "",
        f"{seconds:.0f} s per row after a warm-up, a collection of 200 images.",
        "",
        "| replicas | answered 200 per s | other answers |",
        "|---|---|---|",
    ]
    for count in (1, 2, 3):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "index"
            url = collection(bundle_dir, folder, cluster, 200)
            with replicas(bundle_dir, folder, url, count) as urls, balancer(urls) as lb:
                asyncio.run(load(lb, "/similar", 16, 3))
                result = asyncio.run(load(lb, "/similar", 16, seconds))
        others = {k: v for k, v in result["statuses"].items() if k != 200} or "none"
        lines.append(f"| {count} | {result['rate']:.1f} | {others} |")
        print(lines[-1], flush=True)
    lines.append("")


def collection(bundle_dir: Path, folder: Path, cluster: Cluster, size: int) -> str:
    """A new collection of `size` noise images' embeddings on a new database; its URL."""
    bundle = Bundle.load(bundle_dir, "cpu")
    url = cluster.new_database()
    gallery = GalleryIndex.create(
        bundle.embedding_dim, bundle.fingerprint, folder, database=Database(url)
    )
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(size, bundle.embedding_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    gallery.fill(vectors, [NewItem(f"/{i}.png") for i in range(size)])
    gallery.close()
    return url


def visible(bundle_dir: Path, cluster: Cluster, writes: int, lines: list[str]) -> None:
    """Write to visible on the other replicas, idle and with 8 clients searching."""
    lines += [
        "## Write to visible, 3 replicas",
        "",
        f"{writes} images POSTed one at a time, each to the next replica; after each 201, the "
        "time until each other replica's index holds it (its /index last_change reaches the "
        "write's, polled every 2 ms). Deletes likewise, for every fourth image. Under load: "
        "8 more clients search through HAProxy meanwhile.",
        "",
        "| | adds seen, p50 / p99 ms | deletes seen, p50 / p99 ms | slowest, ms |",
        "|---|---|---|---|",
    ]
    for loaded in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            url = collection(bundle_dir, Path(tmp) / "index", cluster, 200)
            with replicas(bundle_dir, Path(tmp) / "index", url, 3) as urls, balancer(urls) as lb:
                searching = None
                if loaded:
                    searching = multiprocessing.Process(target=_search_load, args=(lb, 1e9))
                    searching.start()
                    time.sleep(3)
                try:
                    adds, deletes = _write_and_watch(urls, writes)
                finally:
                    if searching is not None:
                        searching.terminate()
                        searching.join()
        name = "under search load" if loaded else "idle"
        slowest = max(adds + deletes) * 1000
        lines.append(f"| {name} | {ms(adds)} | {ms(deletes)} | {slowest:.0f} |")
        print(lines[-1], flush=True)
    lines.append("")


def _search_load(url: str, seconds: float) -> None:
    asyncio.run(load(url, "/similar", 8, seconds))


def _write_and_watch(urls: list[str], writes: int) -> tuple[list[float], list[float]]:
    adds: list[float] = []
    deletes: list[float] = []
    with httpx.Client(timeout=60) as http:
        for n in range(writes):
            writer = urls[n % len(urls)]
            files = {"files": (f"{n}.png", noise_png(10_000 + n, 32), "image/png")}
            answer = http.post(f"{writer}/images", files=files)
            answer.raise_for_status()
            adds += _seen(http, urls, writer)
            if n % 4 == 0:
                http.delete(f"{writer}/images/{answer.json()['images'][0]['id']}")
                deletes += _seen(http, urls, writer)
    return adds, deletes


def _seen(http: httpx.Client, urls: list[str], writer: str) -> list[float]:
    """After a write answered on writer: the seconds until each other replica applied it."""
    acknowledged = time.perf_counter()
    change = http.get(f"{writer}/index").json()["last_change"]
    took = []
    for other in urls:
        if other == writer:
            continue
        while http.get(f"{other}/index").json()["last_change"] < change:
            time.sleep(0.002)
        took.append(time.perf_counter() - acknowledged)
    return took


def storm(bundle_dir: Path, cluster: Cluster, seconds: float, lines: list[str]) -> None:
    """/health and /ready latency on one replica while 64 clients POST /classify."""
    lines += [
        "## A retry storm on one replica",
        "",
        "densenet121 (random weights: its speed, not its answers) under the default runtime. "
        f"64 clients POST /classify for {seconds:.0f} s (queue of 16 images: most are answered "
        "503); /health and /ready probed every 50 ms from a process of their own.",
        "",
        "| clients answered 503 | /classify 200 per s | 503s | /health p50 / p99 ms | "
        "/ready p50 / p99 ms |",
        "|---|---|---|---|---|",
    ]
    for resend in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            url = collection(bundle_dir, Path(tmp) / "index", cluster, 200)
            with replicas(bundle_dir, Path(tmp) / "index", url, 1) as [replica]:
                results = multiprocessing.Queue()
                prober = multiprocessing.Process(
                    target=_probe, args=(replica, seconds + 2, results)
                )
                prober.start()
                result = asyncio.run(load(replica, "/classify", 64, seconds, resend))
                health, ready = results.get()
                prober.join()
        name = "send again at once" if resend else "wait Retry-After"
        lines.append(
            f"| {name} | {result['rate']:.1f} | {result['statuses'].get(503, 0)} | "
            f"{ms(health)} | {ms(ready)} |"
        )
        print(lines[-1], flush=True)
    lines.append("")


def _probe(url: str, seconds: float, results: multiprocessing.Queue) -> None:
    health: list[float] = []
    ready: list[float] = []
    stop = time.monotonic() + seconds
    with httpx.Client(timeout=30) as http:
        while time.monotonic() < stop:
            for path, into in (("/health", health), ("/ready", ready)):
                start = time.perf_counter()
                http.get(f"{url}{path}")
                into.append(time.perf_counter() - start)
            time.sleep(0.05)
    results.put((health, ready))


ON_PAPER = """## On paper: how far this design goes

- **Reads** scale with replicas: a search touches the replica's own FAISS index and one
  PostgreSQL query for the rows of its results. Here all replicas share 2 cores, so the table
  above is flat; on machines of their own, N replicas answer about N times one.
- **Writes** take turns on the database (a write locks `changes`, index/pg_store.py), so one
  collection takes writes one transaction at a time: at the per-write cost above (a few ms on
  loopback) a few hundred single-image writes per second; POST /images of many files at once is
  one transaction. Each replica also applies every write, a FAISS add of the written vectors.
- **Connections**: each replica holds up to 8 pooled connections and one that LISTENs. With
  PostgreSQL's default max_connections (100) that is about 11 replicas; beyond, raise it or put
  PgBouncer in front (the LISTEN connection needs session pooling).
- **Collection size**: every replica holds the whole index in memory (index/kinds.py chooses
  IVF-PQ within a memory limit: benchmarks/index_scale.md), and a replica that starts without a
  usable snapshot rebuilds it from PostgreSQL, which the rows above show costs about a minute for
  50,000 embeddings, mostly the index build: a collection of tens of millions needs its
  snapshots (they are shared with the folder) or a long start.
- **After this design**: shard the index (each replica a part of the collection, a search
  scattered to all and merged), move the change stream to logical replication or a log such as
  Kafka when NOTIFY's at-most-once delivery and the periodic catch-up are not enough, and keep
  snapshots and images in an object store.
"""


def main() -> None:
    """Run every part and write benchmarks/replicas.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer writes, shorter runs")
    parser.add_argument("--items", type=int, default=50_000, help="collection size at start-up")
    args = parser.parse_args()
    writes, seconds = (40, 5.0) if args.quick else (200, 15.0)
    lines = [
        "# Replicas of one collection on PostgreSQL",
        "",
        f"`python -m benchmarks.replicas{' --quick' if args.quick else ''}` on "
        f"{os.cpu_count()} cores ({cpu_model()}), {time.strftime('%Y-%m-%d')}: replicas, "
        "PostgreSQL 15, HAProxy and clients all on these cores.",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp, throwaway_cluster() as cluster:
        bundle_dir = Path(tmp) / "bundle"
        bundle = Bundle.pretrained("efficientnet_lite0", "imagenet", "cpu")
        bundle.save(bundle_dir)
        os.environ.setdefault("IMGSIM_CACHE_DIR", str(Path(tmp) / "cache"))  # exports, once
        store_costs(cluster, bundle.embedding_dim, writes, args.items, lines)
        visible(bundle_dir, cluster, writes, lines)
        served(bundle_dir, cluster, seconds, lines)
        heavy_dir = Path(tmp) / "densenet121"  # the model issue 32 saw the storm with
        Bundle.pretrained("densenet121", "none", "cpu").save(heavy_dir)
        storm(heavy_dir, cluster, seconds, lines)
    lines.append(ON_PAPER)
    REPORT.write_text("\n".join(lines))
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
