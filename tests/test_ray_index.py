"""`imgsim index --engine ray` on local Ray: the same collection as the in-process index, and
a run killed half way, then resumed, gives the collection of an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from app.embedding_shards import dataset_folder
from index.sqlite_store import ItemStore
from tests.servers import finished

# Runs one imgsim command with small shards and load chunks, so a small folder makes several;
# KILL_AT: "embedding" dies (SIGKILL) once the first shard is written, "loading" once the
# first chunk is in the collection; a shard written then waits, so the kill lands half way.
DRIVER = """\
import os, sys, time
import app.embedding_shards as embedding_shards
import app.ray_index as ray_index
from app.cli import main
ray_index.SHARD_ROWS = embedding_shards.LOAD_ROWS = 8
kill_at = os.environ.get("KILL_AT")
write, add = ray_index.write_shard, ray_index.GalleryIndex.add

def write_then_wait(*args):
    write(*args)
    if kill_at == "embedding":
        os.kill(os.getpid(), 9)
    time.sleep(0.5)

def add_then_die(self, *args, **kwargs):
    added = add(self, *args, **kwargs)
    if kill_at == "loading":
        os.kill(os.getpid(), 9)
    return added

ray_index.write_shard = write_then_wait
ray_index.GalleryIndex.add = add_then_die
sys.exit(main(sys.argv[1:]))
"""
TIMEOUT = 300  # seconds for one command, Ray's start included


def _imgsim(argv: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    """One imgsim command in its own session (its Ray workers killed with it)."""
    env = {**os.environ, "KILL_AT": kill_at or ""}
    return finished([sys.executable, "-c", DRIVER, *argv], TIMEOUT, env)


def _collection(index_dir: Path) -> dict[str, tuple[str | None, str | None, np.ndarray]]:
    """path -> (label, sha256, embedding) of every item."""
    store = ItemStore(index_dir / "items.sqlite")
    try:
        items = {}
        for ids, embeddings in store.embeddings(store_dim(store)):
            for item_id, embedding in zip(ids, embeddings, strict=True):
                item = store.get(int(item_id))
                assert item is not None
                items[item.path] = (item.label, item.sha256, embedding)
        return items
    finally:
        store.close()


def store_dim(store: ItemStore) -> int:
    return int(store.meta()["dim"])


@pytest.fixture(scope="module")
def gallery(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shapes, a file outside any class folder, and three files that cannot be indexed."""
    root = tmp_path_factory.mktemp("ray-gallery") / "gallery"
    shutil.copytree(shapes_dir, root)
    first = next(root.rglob("*.png"))
    shutil.copy(first, root / "loose.png")
    (root / "circle" / "broken.png").write_bytes(b"not a png")
    (root / "square" / "empty.jpg").write_bytes(b"")
    (root / "square" / "truncated.png").write_bytes(first.read_bytes()[:100])
    return root


@pytest.fixture(scope="module")
def in_process(gallery: Path, trained_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("in-process") / "index"
    done = _imgsim(["index", str(gallery), "--model", str(trained_bundle_dir), "--out", str(out)])
    assert done.returncode == 0, done.stderr
    return _collection(out)


def _same(collection: dict, expected: dict) -> None:
    assert collection.keys() == expected.keys()
    for path, (label, sha, embedding) in expected.items():
        assert collection[path][:2] == (label, sha), path
        np.testing.assert_allclose(collection[path][2], embedding, atol=1e-5)


@pytest.mark.slow
def test_ray_gives_the_in_process_collection(
    gallery: Path, trained_bundle_dir: Path, in_process: dict, tmp_path: Path
) -> None:
    out = tmp_path / "index"
    argv = ["index", str(gallery), "--model", str(trained_bundle_dir), "--out", str(out)]
    done = _imgsim([*argv, "--engine", "ray"])
    assert done.returncode == 0, done.stderr
    _same(_collection(out), in_process)
    assert len(in_process) == len(list(gallery.rglob("*.png"))) - 2  # broken, truncated
    assert "skipping 3 unreadable file(s)" in done.stderr
    assert any(label is None for label, _, _ in in_process.values())  # loose.png
    shards = sorted(dataset_folder(out).glob("*.parquet"))
    assert shards and (dataset_folder(out) / "_COMPLETE").exists()

    again = _imgsim([*argv, "--engine", "ray"])  # only the unreadable files are tried again
    assert again.returncode == 0 and "3 to embed" in again.stderr
    _same(_collection(out), in_process)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["embedding", "loading"])
def test_a_run_killed_half_way_resumes_to_the_same_collection(
    kill_at: str, gallery: Path, trained_bundle_dir: Path, in_process: dict, tmp_path: Path
) -> None:
    out = tmp_path / "index"
    argv = ["index", str(gallery), "--model", str(trained_bundle_dir), "--out", str(out)]
    argv += ["--engine", "ray", "--batch-size", "4"]
    killed = _imgsim(argv, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    shards = list(dataset_folder(out).glob("*.parquet"))
    assert shards and not (dataset_folder(out) / "_COMPLETE").exists()
    if kill_at == "loading":
        assert 0 < len(_collection(out)) < len(in_process)

    resumed = _imgsim(argv)
    assert resumed.returncode == 0, resumed.stderr
    if kill_at == "embedding":  # the shards on disk are not embedded again
        rows = sum(pq.read_metadata(shard).num_rows for shard in shards)
        assert f"{rows} embedded by an earlier run" in resumed.stderr
    _same(_collection(out), in_process)
