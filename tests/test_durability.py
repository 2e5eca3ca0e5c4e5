"""kill -9 during writes: after a restart every acknowledged image is there and the index agrees
with SQLite.

Each round starts `imgsim serve`, lets a client POST images for a random 0.5-2.5 s (snapshots are
taken every 5 changes, so kills also land inside snapshot writes), SIGKILLs the server, restarts
it and checks. A round's kill lands at a uniformly random point of the write cycle (decode,
embed, keep the file, SQLite commit, FAISS add, snapshot, respond); if a fraction f of that
cycle were unsafe, n rounds would all miss it with probability (1 - f)^n: 6 rounds here catch a
window of a fifth of the cycle 74% of the time, and benchmarks/crash_recovery.py runs 50 rounds
(a window of 6% of the cycle: 95%). It runs with the items in SQLite and in PostgreSQL.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from index.database import Database
from index.gallery import GalleryIndex
from models.bundle import Bundle
from tests.postgres import behind_imgsims_back
from tests.servers import free_port, start_server
from tests.synthetic import noise_png

ROUNDS = 6
SNAPSHOT_OFTEN = {"IMGSIM_SNAPSHOT_EVERY": "5"}


def write_until_killed(
    url: str, seeds: Iterator[int], acknowledged: dict[int, str], errors: list[BaseException]
) -> None:
    """POST one or two images at a time; record (id -> sha256) of each 201 answer."""
    try:
        post_until_killed(url, seeds, acknowledged)
    except BaseException as err:  # re-raised by the test thread
        errors.append(err)


def post_until_killed(url: str, seeds: Iterator[int], acknowledged: dict[int, str]) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        while True:
            blobs = [noise_png(next(seeds), 24) for _ in range(random.randint(1, 2))]
            files = [("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
            try:
                response = client.post("/images", files=files)
            except httpx.TransportError:
                return  # killed mid-request: neither acknowledged nor refused
            assert response.status_code == 201, response.text
            for image in response.json()["images"]:
                acknowledged[image["id"]] = image["sha256"]


def check_recovered(
    url: str, index_dir: Path, acknowledged: dict[int, str], database: Database | None
) -> None:
    """Every acknowledged item is stored and indexed, and the index agrees with the store."""
    stored = {row[0] for row in behind_imgsims_back(index_dir, database, "SELECT id FROM items")}
    with httpx.Client(base_url=url, timeout=30) as client:
        info = client.get("/index").json()
        assert info["size"] == len(stored), "FAISS and SQLite disagree"
        for item_id, sha256 in acknowledged.items():
            item = client.get(f"/images/{item_id}")
            assert item.status_code == 200, f"acknowledged image {item_id} was lost"
            assert item.json()["sha256"] == sha256
            stored_file = client.get(item.json()["url"])
            assert hashlib.sha256(stored_file.content).hexdigest() == sha256
        if not stored:
            return
        probe = max(stored)
        found = client.get(f"/images/{probe}/similar", params={"k": 100}).json()["neighbours"]
        assert {n["id"] for n in found} <= stored, "search returned an id SQLite does not hold"
        assert len(found) == min(100, len(stored) - 1)


def crash_rounds(
    bundle_dir: Path,
    index_dir: Path,
    rounds: int,
    seed: int = 0,
    database: Database | None = None,
) -> int:
    """Run rounds of write / kill -9 / restart / check; returns how many images were acked."""
    rng = random.Random(seed)
    seeds = iter(range(10**9))
    acknowledged: dict[int, str] = {}
    errors: list[BaseException] = []
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = SNAPSHOT_OFTEN | ({} if database is None else {"IMGSIM_DATABASE_URL": database.url})
    server = start_server(bundle_dir, index_dir, port, env)
    try:
        for _ in range(rounds):
            writer = threading.Thread(
                target=write_until_killed, args=(url, seeds, acknowledged, errors)
            )
            writer.start()
            time.sleep(rng.uniform(0.5, 2.5))
            os.kill(server.pid, signal.SIGKILL)
            server.wait()
            writer.join()
            if errors:
                raise errors[0]
            server = start_server(bundle_dir, index_dir, port, env)
            check_recovered(url, index_dir, acknowledged, database)
    finally:
        server.kill()
        server.wait()
    return len(acknowledged)


@pytest.mark.slow
def test_acknowledged_images_survive_kill_9(
    trained_bundle_dir: Path, tmp_path: Path, database: Database | None
) -> None:
    bundle = Bundle.load(trained_bundle_dir, "cpu")
    index_dir = tmp_path / "index"
    GalleryIndex.create(
        bundle.embedding_dim, bundle.fingerprint, index_dir, database=database
    ).close()
    acknowledged = crash_rounds(trained_bundle_dir, index_dir, ROUNDS, database=database)
    assert acknowledged >= ROUNDS  # writes really were in flight when the kills came
    reopened = GalleryIndex.load(index_dir, bundle.fingerprint, database=database)
    assert reopened.consistent() and len(reopened) >= acknowledged
    reopened.close()
