"""What checking a collection's item database costs at start: SQLite's quick_check, its
integrity_check (which also reads every index) and imgsim's row check (every row's CRC-32
against its stored checksum, index/integrity.py), at 10k, 100k and 1M items.

Each collection is made once in --work through ItemStore.insert (random unit embeddings of
--dim floats, a path, a label and a sha256 per row), then closed; each check is timed on a
cold page cache where the OS lets us drop it (as root), else warm (the report says which).

    python -m benchmarks.row_check [--sizes 10000 100000 1000000] [--dim 512] [--work DIR]

Writes benchmarks/row_check.md.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import cpu_model
from index.integrity import damaged_rows
from index.sqlite_store import ItemStore
from index.store import NewItem

OUT = Path(__file__).with_name("row_check.md")
BATCH = 10_000


def build(path: Path, size: int, dim: int) -> None:
    """A closed item database of `size` rows, unless one is there already."""
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    store = ItemStore(path)
    store.set_meta({"fingerprint": "benchmark", "dim": str(dim)})
    rng = np.random.default_rng(0)
    for start in range(0, size, BATCH):
        count = min(BATCH, size - start)
        vectors = rng.standard_normal((count, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        items = [
            NewItem(f"/data/images/{i:064x}.jpg", f"class-{i % 100}", None, f"{i:064x}")
            for i in range(start, start + count)
        ]
        store.insert(items, vectors)
    store.close()


def drop_caches() -> bool:
    """Drop the OS page cache (root only); whether it could."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(path: Path, check: str) -> tuple[float, bool]:
    """Seconds one check takes on a fresh connection, and whether the cache was cold."""
    cold = drop_caches()
    connection = sqlite3.connect(path)
    started = time.perf_counter()
    if check == "rows":
        assert damaged_rows(connection) == []
    else:
        assert connection.execute(f"PRAGMA {check}").fetchone()[0] == "ok"
    seconds = time.perf_counter() - started
    connection.close()
    return seconds, cold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", type=int, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--work", type=Path, default=Path("/tmp/imgsim-row-check"))
    args = parser.parse_args()
    rows, cold_all = [], True
    for size in args.sizes:
        path = args.work / f"{size}-{args.dim}" / "items.sqlite"
        build(path, size, args.dim)
        cells = []
        for check in ("quick_check", "integrity_check", "rows"):
            seconds, cold = timed(path, check)
            cold_all &= cold
            cells.append(f"{seconds:.2f}")
        mb = path.stat().st_size / 2**20
        rows.append(f"| {size:,} | {mb:,.0f} | {' | '.join(cells)} |")
        print(rows[-1], flush=True)
    cache = "cold page cache (dropped before each check)" if cold_all else "warm page cache"
    OUT.write_text(
        "# Checking the item database at start\n\n"
        f"`python -m benchmarks.row_check --dim {args.dim}`\n\n"
        f"Rows of a {args.dim}-float embedding, a path, a label and a sha256; one check at a "
        f"time, {cache}; {os.cpu_count()} cores, {cpu_model()}.\n\n"
        "| items | file MB | quick_check s | integrity_check s | row check s |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


if __name__ == "__main__":
    main()
